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
    from typing import get_args, get_type_hints

    keys = set()
    for section in fields(Recipe):
        hint = get_type_hints(Recipe)[section.name]
        members = [hint] if is_dataclass(hint) else [a for a in get_args(hint) if is_dataclass(a)]  # adapter: a union
        keys |= {f"{section.name}.{f.name}" for member in members for f in fields(member)} or {section.name}
    assert documented == keys
