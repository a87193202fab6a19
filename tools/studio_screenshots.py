"""The studio's screenshots in docs/how-to/studio.md, taken of a real session in Chromium (Playwright):

    python tools/studio_screenshots.py --runs runs --recipe quickstart.yaml --steps 6 --beside quickstart \
        --chat quickstart dpo/rpo-lr-2e-5

serves a studio over --runs, starts --recipe (a file under recipes/) as the run `studio-live` for
--steps steps from the New run page, photographs the runs page once the run shows step --steps - 1, with the finished
run --beside ticked on the same axes, and then the chat page answering one question with the base and
with each --chat run. Writes docs/images/studio-runs.png and docs/images/studio-chat.png; the live run is
removed after.
"""

from __future__ import annotations

import argparse
import shutil
import threading
from pathlib import Path

from qadapt.studio.server import Studio, make_server

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "docs" / "images"
QUESTION = "Tom buys 3 boxes of 12 pens and gives away 5. How many pens are left?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=REPO / "runs")
    parser.add_argument("--recipe", default="quickstart.yaml", help="a recipe under recipes/ to start")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--beside", default="quickstart", help="a finished run to tick beside it")
    parser.add_argument("--chat", nargs="+", default=["quickstart"], help="finished runs to chat with")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    live = args.runs / "studio-live"
    studio = Studio(args.runs, REPO / "recipes", cwd=REPO)
    server = make_server(studio, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    IMAGES.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                             args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(900_000)
            page.goto(f"http://127.0.0.1:{server.server_port}/#new")
            page.select_option("#recipe", f"shipped:{args.recipe}")
            page.wait_for_selector(f'form[data-recipe="shipped:{args.recipe}"]')
            page.fill('[name="train.max_steps"]', str(args.steps))
            page.wait_for_selector('.key.changed[data-key="train.max_steps"]')
            page.fill("#name", live.name)
            page.wait_for_selector("#plan .fits")
            page.click("#start")
            page.wait_for_selector(f'tr[data-run="{args.beside}"] input')
            page.check(f'tr[data-run="{args.beside}"] input')
            page.wait_for_function(f"() => parseInt(document.querySelector('tr[data-run=\"{live.name}\"] .step')"
                                   f"?.textContent) >= {args.steps - 1}")
            page.screenshot(path=IMAGES / "studio-runs.png", full_page=True)
            page.click("#stop")
            page.goto(f"http://127.0.0.1:{server.server_port}/#chat")
            page.fill("#max-new-tokens", "96")
            page.fill("#prompt", QUESTION)
            for box in page.query_selector_all("input[data-run]"):
                box.set_checked(box.get_attribute("data-run") in args.chat)
            page.click("#send")
            page.wait_for_selector(f'.answer[data-name="{args.chat[-1]}"]')
            page.screenshot(path=IMAGES / "studio-chat.png", full_page=True)
            browser.close()
    finally:
        server.shutdown()
        for process in studio.processes.running:
            process.wait(timeout=600)
        shutil.rmtree(live, ignore_errors=True)
    print(f"wrote {IMAGES / 'studio-runs.png'} and {IMAGES / 'studio-chat.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
