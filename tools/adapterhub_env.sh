#!/usr/bin/env bash
# The reference environment for qadapt's Series and Parallel block placements: AdapterHub's `adapters`
# library (Pfeiffer / Houlsby / parallel bottlenecks), which pins transformers 4.57, so it lives apart from
# qadapt's .venv in ./.venv-adapterhub, with the same torch 2.13.0 CPU build. tools/setup.sh runs this;
# tests/test_adapterhub_reference.py calls tools/adapterhub_reference.py in it and skips, saying why, when
# it is absent. Safe to run again: an environment that already imports adapters is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ENV=.venv-adapterhub
if [ -x "$ENV/bin/python" ] && "$ENV/bin/python" -c "import adapters" 2>/dev/null; then
  exit 0
fi
[ -x "$ENV/bin/python" ] || "$PYTHON" -m venv "$ENV"
"$ENV/bin/python" -m pip install --quiet --upgrade pip
"$ENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$ENV/bin/python" -m pip install --quiet "adapters==1.3.0" safetensors
"$ENV/bin/python" -c "import adapters, transformers; print(f'adapters {adapters.__version__} on transformers {transformers.__version__}: {__import__(\"os\").path.abspath(\"$ENV\")}')"
