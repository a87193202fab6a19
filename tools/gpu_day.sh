#!/usr/bin/env bash
# Prepares, on a machine with a package index, what tools/gpu_check.py needs on a GPU machine that has none
# (this workplace's lent H200 has torch 2.11+cu130, accelerate, peft, typer, pyyaml, safetensors and tokenizers
# 0.23, but neither bitsandbytes nor transformers 5.24): transformers' wheel in .whl/, bitsandbytes unpacked
# in .gpu/site/ with only its CPU and CUDA 13 libraries (its wheel carries one per CUDA version: 43 MB
# instead of ~5), and the embedded SmolLM2 tokenizer in .gpu/tokenizer/; all kept out of git
# (.git/info/exclude), ~28 MiB with the repository, under the device tool's 64 MiB. Then, on the GPU
# machine (the device tool: carry [".whl", ".gpu"], timeout 600 s), the command this script prints last.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info
for folder in /.whl/ /.gpu/; do grep -qxF "$folder" .git/info/exclude 2>/dev/null || echo "$folder" >> .git/info/exclude; done
rm -rf .whl .gpu/site
download() {
  .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$1" "$2"
}
download .whl transformers==5.24.0
download .gpu/wheel bitsandbytes==0.50.2
.venv/bin/python -m zipfile -e .gpu/wheel/bitsandbytes-*.whl .gpu/site
rm -rf .gpu/wheel
find .gpu/site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda13*.so' -delete  # the rest: other CUDA versions, ROCm, XPU
.venv/bin/python - <<'PY'
from qadapt.models import load_tokenizer
from qadapt.recipe import ModelConfig

load_tokenizer(ModelConfig()).save_pretrained(".gpu/tokenizer")
PY
du -sh .whl .gpu
cat <<'COMMAND'
set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/.gpu/site:$PWD PYTHONUNBUFFERED=1 TQDM_DISABLE=1 && nvidia-smi -L && timeout 545 python3 tools/gpu_check.py --tokenizer .gpu/tokenizer --out $OUT 2>&1 | tee $OUT/log
COMMAND
