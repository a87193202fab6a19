"""qadapt studio driven in a real browser (Playwright in Debian's Chromium): a tiny training started from
the form, its chart advancing, stopped and resumed from the runs page, then chat and an export to PEFT;
screenshots of each."""

from __future__ import annotations

import shutil
import threading

import pytest
from conftest import write_tiny_recipe

from qadapt.studio.server import Studio, make_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (the test extra)")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="the browser tests need Chromium: apt-get install chromium "
                                                          "(tools/setup.sh installs it where it can)")]


@pytest.fixture
def page_on_studio(tmp_path, tiny_llama_dir):
    (tmp_path / "recipes").mkdir()
    write_tiny_recipe(tmp_path / "recipes" / "tiny.yaml", tiny_llama_dir,
                      train={"max_steps": 40, "save_every": 10, "eval_every": 10, "log_every": 1})
    studio = Studio(tmp_path / "runs", tmp_path / "recipes", cwd=tmp_path)
    (tmp_path / "runs").mkdir()
    server = make_server(studio, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(240_000)
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"http://127.0.0.1:{server.server_port}/")
        yield page, errors
        browser.close()
    server.shutdown()
    for process in studio.processes.running:
        process.kill()
        process.wait()


def last_step(page) -> int:
    value = page.get_attribute('svg[data-title="loss"]', "data-last-x")
    return int(float(value)) if value else 0


def test_start_from_the_form_watch_the_curve_stop_resume_chat_and_export(page_on_studio, tmp_path):
    page, errors = page_on_studio
    page.click('nav a[href="#new"]')
    page.select_option("#recipe", "shipped:tiny.yaml")
    page.wait_for_selector('form[data-recipe="shipped:tiny.yaml"]')  # typed before, it would go to the form it replaces
    page.fill('[name="train.lr"]', "oops")
    page.wait_for_selector('.key[data-key="train.lr"] .problem:has-text("expected a finite number")')
    assert page.is_disabled("#start")
    page.fill('[name="train.lr"]', "0.001")
    page.wait_for_selector("#plan .fits")
    page.fill("#name", "from-the-form")
    page.click("#start")
    page.wait_for_url("**#runs/from-the-form")

    page.wait_for_function("() => Number(document.querySelector('svg[data-title=\"loss\"]')?.dataset.lastX) >= 3")
    seen = last_step(page)
    page.wait_for_function(f"() => Number(document.querySelector('svg[data-title=\"loss\"]').dataset.lastX) > {seen}")
    assert page.is_visible('svg[data-title="lr"]') and page.is_visible('svg[data-title="grad_norm"]')
    page.screenshot(path=tmp_path / "training.png", full_page=True)

    page.click("#stop")
    page.wait_for_selector('tr[data-run="from-the-form"] .state-interrupted')
    page.click("#resume")
    page.wait_for_selector('tr[data-run="from-the-form"] .state-finished')
    assert page.inner_text('tr[data-run="from-the-form"] .step') == "40 / 40"
    page.wait_for_selector("text=final loss")  # the report table of the finished run
    page.screenshot(path=tmp_path / "finished.png", full_page=True)

    page.click('nav a[href="#chat"]')
    page.fill("#prompt", "What is 2 plus 3?")
    page.fill("#max-new-tokens", "8")
    page.click("#send")
    page.wait_for_selector('.answer[data-name="from-the-form"]')
    assert page.is_visible('.answer[data-name="base"]')
    page.screenshot(path=tmp_path / "chat.png", full_page=True)

    page.click('nav a[href="#export"]')
    page.select_option("#format", "peft")
    page.click("#export")
    page.wait_for_selector('.job[data-state="done"]')
    assert "adapter_model.safetensors" in page.inner_text(".job pre")
    assert (tmp_path / "runs" / "from-the-form" / "exports" / "peft" / "adapter_model.safetensors").is_file()
    for shot in ("training", "finished", "chat"):
        assert (tmp_path / f"{shot}.png").stat().st_size > 10_000
    assert not errors, errors


def test_a_recipe_chosen_while_another_still_loads_keeps_its_own_form(page_on_studio, tmp_path, tiny_llama_dir):
    """The first recipe's values answer late, after another recipe was chosen and drawn: the form stays the
    chosen one's (an answer that arrived late used to draw the first recipe's form over it)."""
    page, errors = page_on_studio
    write_tiny_recipe(tmp_path / "recipes" / "a-first.yaml", tiny_llama_dir, train={"max_steps": 7})
    held = []
    page.route("**/api/recipe?*", lambda route: route.continue_() if "tiny.yaml" in route.request.url
               else held.append(route))
    page.click('nav a[href="#new"]')
    page.wait_for_function("() => document.querySelector('#recipe')?.value === 'shipped:a-first.yaml'")
    page.select_option("#recipe", "shipped:tiny.yaml")
    page.wait_for_selector('form[data-recipe="shipped:tiny.yaml"]')
    assert len(held) == 1  # the first recipe's values, not yet answered
    with page.expect_response(lambda response: "a-first.yaml" in response.url):
        held[0].continue_()
    page.wait_for_timeout(500)
    assert page.get_attribute("form", "data-recipe") == "shipped:tiny.yaml"
    assert page.input_value('[name="train.max_steps"]') == "40"
    assert errors == []
