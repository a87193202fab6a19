"""README stays true: CI runs its test command, and its recipe reference lists every recipe key."""

from __future__ import annotations

import re
from dataclasses import fields, is_dataclass

from conftest import REPO

from qadapt.recipe import Recipe

README = (REPO / "README.md").read_text()


def bash_blocks() -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", README, re.S)]


def test_ci_runs_the_readme_test_command():
    ci_command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in bash_blocks()


def test_readme_has_the_quickstart_command():
    assert "bash tools/setup.sh && .venv/bin/qadapt train recipes/quickstart.yaml" in bash_blocks()


def test_recipe_reference_lists_every_key():
    # Rows of the reference table start with a `section.key` (or a top-level key: task, output_dir).
    documented = set(re.findall(r"^\| `([a-z_]+\.[a-z_]+|task|output_dir)` \|", README, re.M))
    keys = set()
    for section in fields(Recipe):
        value = getattr(Recipe(), section.name)
        if is_dataclass(value):
            keys |= {f"{section.name}.{f.name}" for f in fields(value)}
        else:
            keys.add(section.name)
    assert documented == keys
