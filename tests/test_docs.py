"""The documentation stays true: the site builds strictly, the generated reference pages match the code,
and every command in a `bash` block of the README or the docs is checked against the real command line.

A command is checked this way, without running it (CI runs the README's two set-up commands whole):
- `qadapt ...` (also under `.venv/bin/`, `python -m`, `accelerate launch ... -m`): parsed by the real typer
  command, so a renamed command or option fails; a recipe it names must exist and load with its overrides,
  exactly as `qadapt check` loads it;
- `python tools/X.py ...`: the tool exists and declares every option used;
- `python -c CODE`: the code compiles and every `from qadapt... import NAME` names something that exists;
- `bash tools/X.sh`: the script exists;
- `python -m pytest`: the suite, which CI runs.
Anything else (pip, huggingface-cli, ollama, llama-cli, several GPUs...) is allowed only in a block whose first
line says what it needs: `# needs: a GPU`, `# needs: the network`, `# needs: Ollama ...`.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

DOC_FILES = [REPO / "README.md", *sorted(p for p in (REPO / "docs").rglob("*.md") if "results" not in p.parts)]
NEEDS = re.compile(r"#\s*needs:\s*(.+)", re.I)
SHELL_FILTERS = {"sort", "head", "tail", "grep", "tee"}


def _tool_module():
    spec = importlib.util.spec_from_file_location("docs_reference", REPO / "tools" / "docs_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_reference_pages_match_the_code():
    for path, text in _tool_module().pages().items():
        assert path.is_file() and path.read_text() == text, \
            f"{path.relative_to(REPO)} differs from the code: run python tools/docs_reference.py"


def test_the_recipe_reference_has_every_key_of_the_schema():
    from dataclasses import fields, is_dataclass
    from typing import get_args, get_type_hints

    from qadapt.recipe import Recipe

    page = (REPO / "docs" / "reference" / "recipe.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+(?:\.[a-z_]+)?)` \|", page, re.M))
    keys = set()
    for section in fields(Recipe):
        hint = get_type_hints(Recipe)[section.name]
        members = [hint] if is_dataclass(hint) else [a for a in get_args(hint) if is_dataclass(a)]
        keys |= {f"{section.name}.{f.name}" for member in members for f in fields(member)} or {section.name}
    assert documented == keys


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
    pytest.importorskip("material", reason="the docs extra is not installed: pip install -e '.[docs]'")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "recipe" / "index.html").is_file()


def test_every_command_in_a_code_block_is_checked():
    problems, checked = [], 0
    for path in DOC_FILES:
        for line_number, code in _fenced_at(path, "bash"):
            block = code.splitlines()
            where = f"{path.relative_to(REPO)}:{line_number}"
            first = next((line for line in block if line.strip()), "")
            needs = NEEDS.match(first.strip())
            variables: dict[str, list[str]] = {}
            for command in _commands(block, variables):
                checked += 1
                problem = _check(command)
                if problem == "unchecked" and needs:
                    continue
                if problem:
                    shown = shlex.join(command)
                    problems.append(f"{where}: {shown[:120]}: " + (
                        "not a command the tests can check; mark the block '# needs: ...'" if problem == "unchecked"
                        else problem))
    assert checked > 50
    assert not problems, "\n".join(problems)


def test_every_python_block_compiles_and_imports_what_exists():
    blocks = [(path, block) for path in DOC_FILES for block in _fenced(path, "python")]
    assert blocks
    for path, block in blocks:
        problem = _check_python_code(block)
        assert problem is None, f"{path.relative_to(REPO)}: {problem}"


def test_every_recipe_shown_in_a_yaml_block_loads():
    import yaml

    from qadapt.recipe import recipe_from_dict

    recipes = [(path, yaml.safe_load(block)) for path in DOC_FILES for block in _fenced(path, "yaml")]
    assert recipes
    for path, raw in recipes:
        recipe_from_dict(raw, source=str(path.relative_to(REPO)))  # a wrong key raises, naming it


def test_a_wrong_option_in_a_doc_command_is_caught():
    assert "--dat" in _check(["qadapt", "eval", "runs/x", "--dat", "a.json"])
    assert "train.lrr" in _check(["qadapt", "train", "recipes/quickstart.yaml", "train.lrr=1"])
    assert "recipes/nope.yaml" in _check(["qadapt", "check", "recipes/nope.yaml"])
    assert "--nope" in _check([".venv/bin/python", "tools/bench_train.py", "--nope"])
    assert _check(["pip", "install", "x"]) == "unchecked"
    assert _check(["qadapt", "train", "recipes/quickstart.yaml", "train.lr=1e-4", "--resume"]) is None


def test_the_docs_carry_no_development_history():
    history = re.compile(r"\b(issue|session|sprint) \d+\b|\bbefore this work\b|\bwaiting for a GPU\b|"
                         r"\bthe issue'?s? (goal|that raised)", re.I)
    found = [f"{path.relative_to(REPO)}: {match.group(0)}" for path in DOC_FILES
             for match in history.finditer(path.read_text())]
    assert not found, found


# --- reading the blocks ------------------------------------------------------------------------------------

def _fenced_at(path: Path, language: str) -> list[tuple[int, str]]:
    """Each code block of `language` in a Markdown file, with the line its code starts on."""
    text = path.read_text()
    return [(text[:match.start()].count("\n") + 2, match.group(1))
            for match in re.finditer(rf"^```{language}\n(.*?)^```", text, re.S | re.M)]


def _fenced(path: Path, language: str) -> list[str]:
    return [code for _, code in _fenced_at(path, language)]


def _commands(block: list[str], variables: dict[str, list[str]]) -> list[list[str]]:
    """Each command of a block: continuation lines joined, comments dropped, `A && B` split, `$VAR` expanded
    from an assignment earlier in the block, a pipe's filters and redirections left out."""
    logical, pending = [], ""
    for line in block:
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        logical.append(pending)
        pending = ""
    commands = []
    for line in logical:
        tokens = shlex.split(line, comments=True)
        if len(tokens) == 1 and re.fullmatch(r"[A-Za-z_]\w*=.*", tokens[0]):
            name, _, value = tokens[0].partition("=")
            variables[name] = shlex.split(value)
            continue
        expanded = [piece for token in tokens
                    for piece in variables.get(token[1:] if token[:1] == "$" else None, [token])]
        command: list[str] = []
        for token in [*expanded, "&&"]:
            if token in ("&&", ";", "|"):
                if command and command[0] not in SHELL_FILTERS:
                    commands.append(command)
                command = []
            elif not re.fullmatch(r"\d?>&?\d?|2>&1", token):
                command.append(token)
    return commands


# --- checking one command ----------------------------------------------------------------------------------

def _check(command: list[str]) -> str | None:
    """None when the command checks out; "unchecked" when it is not one the tests can check; else the problem."""
    if command[:1] == ["/usr/bin/time"]:
        command = command[1:]
    program, args = command[0], command[1:]
    if program in ("qadapt", ".venv/bin/qadapt"):
        return _check_qadapt(args)
    if program == "accelerate" and "-m" in args and args[args.index("-m") + 1:][:1] == ["qadapt"]:
        return _check_qadapt(args[args.index("-m") + 2:])
    if program in ("python", "python3", ".venv/bin/python"):
        if args[:2] == ["-m", "qadapt"]:
            return _check_qadapt(args[2:])
        if args[:2] == ["-m", "pytest"]:
            return None  # the suite itself: CI runs it
        if args and args[0].startswith("tools/"):
            return _check_tool(args[0], args[1:])
        if "-c" in args:
            return _check_python_code(args[args.index("-c") + 1])
        return "unchecked"
    if program == "bash" and args and args[0].startswith("tools/"):
        return None if (REPO / args[0]).is_file() else f"{args[0]} does not exist"
    return "unchecked"


def _check_qadapt(args: list[str]) -> str | None:
    import typer

    from qadapt import cli_options
    from qadapt.cli import app
    from qadapt.errors import QadaptError
    from qadapt.recipe import load_recipe

    args = cli_options.with_resume_value(list(args))
    group = typer.main.get_command(app)
    context = type(group).context_class(group, info_name="qadapt")
    try:
        name, command, rest = group.resolve_command(context, args)
        parsed = command.make_context(name, rest, parent=context).params
    except Exception as error:  # typer's click raises its own UsageError family
        return f"qadapt does not accept it: {error}"
    if "recipe" not in parsed:
        return None
    recipe = REPO / str(parsed["recipe"])
    if not recipe.is_file():
        return f"recipe {parsed['recipe']} does not exist"
    try:
        load_recipe(recipe, parsed.get("overrides") or [])
    except QadaptError as error:
        return f"the recipe does not load: {error}"
    return None


def _check_tool(script: str, args: list[str]) -> str | None:
    path = REPO / script
    if not path.is_file():
        return f"{script} does not exist"
    source = path.read_text()
    # Flags a tool shares with others are declared in the sibling module it imports them from (peer_bench).
    for sibling in re.findall(r"^(?:from|import) (\w+)", source, flags=re.M):
        if (path.parent / f"{sibling}.py").is_file():
            source += (path.parent / f"{sibling}.py").read_text()

    def declared(option: str) -> bool:
        negated = option.startswith("--no-") and "BooleanOptionalAction" in source
        return any(f'"{name}"' in source or f"'{name}'" in source
                   for name in (option, "--" + option[5:] if negated else option))

    unknown = [arg.split("=")[0] for arg in args if arg.startswith("--") and not declared(arg.split("=")[0])]
    return f"{script} declares no {', '.join(unknown)}" if unknown else None


def _check_python_code(code: str) -> str | None:
    try:
        tree = ast.parse(code)
    except SyntaxError as error:
        return f"the code does not compile: {error}"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qadapt"):
            module = importlib.import_module(node.module)
            missing = [alias.name for alias in node.names if not hasattr(module, alias.name)]
            if missing:
                return f"{node.module} has no {', '.join(missing)}"
    return None
