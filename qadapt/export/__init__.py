"""Taking a run elsewhere: its adapter merged into the base, a PEFT adapter folder, a GGUF file.

EXPORTERS is `qadapt export --format`'s table: each format's writer, called as
`write(run_dir, out, gguf_type, base)`. A new format is one module and one line here.
"""

from __future__ import annotations

from pathlib import Path

from qadapt.errors import QadaptError


def _peft(run_dir: Path, out: Path, gguf_type: str, base: str):
    from qadapt.export.peft_format import export_peft

    return export_peft(run_dir, out)


def _gguf(run_dir: Path, out: Path, gguf_type: str, base: str):
    from qadapt.export.gguf_export import export_gguf

    return export_gguf(run_dir, out, gguf_type, base)


def _gguf_lora(run_dir: Path, out: Path, gguf_type: str, base: str):
    from qadapt.export.gguf_lora import export_gguf_lora

    if base != "dequantized":
        raise QadaptError("--base is for merged exports; gguf-lora ships the base the adapter was trained "
                          "against (de-quantized) beside it")
    return export_gguf_lora(run_dir, out, gguf_type)


def _ollama(run_dir: Path, out: Path, gguf_type: str, base: str):
    from qadapt.export.ollama import export_ollama

    return export_ollama(run_dir, out, gguf_type, base)


EXPORTERS = {"peft": _peft, "gguf": _gguf, "gguf-lora": _gguf_lora, "ollama": _ollama}


def export_run(run_dir: Path, format: str, out: Path, gguf_type: str = "f16", base: str = "dequantized"):
    """Write run `run_dir` in `format` (a key of EXPORTERS) to `out`."""
    if format not in EXPORTERS:
        raise QadaptError(f"--format {format!r} is not one of {', '.join(EXPORTERS)} "
                          "(for a Hugging Face folder: qadapt merge)")
    return EXPORTERS[format](Path(run_dir), Path(out), gguf_type, base)
