"""README stays true and short: CI runs its test command, it keeps the quickstart command, it stays a page a
newcomer reads in five minutes, and every link in it leads somewhere."""

from __future__ import annotations

import re

from conftest import REPO

README = (REPO / "README.md").read_text()


def bash_blocks() -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", README, re.S)]


def test_ci_runs_the_readme_test_command():
    ci_command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in bash_blocks()


def test_readme_has_the_quickstart_command():
    assert "bash tools/setup.sh && .venv/bin/qadapt train recipes/quickstart.yaml" in bash_blocks()


def test_readme_stays_short():
    assert len(README.splitlines()) <= 250


def test_every_link_in_the_readme_leads_to_a_file_and_its_heading():
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert len(local) > 20
    for link in local:
        path, _, anchor = link.partition("#")
        target = REPO / path
        assert target.exists(), f"README links to {path}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(), re.M)
            assert anchor in {_slug(heading) for heading in headings}, f"{link}: no heading makes #{anchor}"


def _slug(heading: str) -> str:
    """The anchor mkdocs (and GitHub) give a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"\s+", "-", re.sub(r"[^\w\s-]", "", heading.lower()).strip())
