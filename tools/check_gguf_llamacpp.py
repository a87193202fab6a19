"""A run's GGUF exports run in llama.cpp, against the merged model in transformers: the figures behind
docs/benchmarks/exports.md.

    pip install 'qadapt[llamacpp]'        # builds llama.cpp from source: minutes
    .venv/bin/python tools/check_gguf_llamacpp.py RUN_DIR [--types f16 q8_0 q4_k_m ...] [--tokens 32] [--json out.json]

Each type is written exactly as `qadapt export --format gguf --type T` writes it, then both models read the
check prompts (the run's template around built-in test problems). Per type: file size, whether the two
tokenize every prompt alike, top-1 agreement and mean |Δlogit| of llama.cpp's logits against transformers'
at every position of the prompts with their answers, and how many greedy replies to the prompts (up to
--tokens tokens, to the first EOS included) are the same.
The machine is recorded beside the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from qadapt.export import llamacpp
from qadapt.export.gguf_export import GGUF_TYPES, MERGE_DTYPE, tokenizer_pre, write_gguf_as
from qadapt.export.gguf_families import gguf_family
from qadapt.export.merge import merge_run, probe_texts
from qadapt.machine import describe, one_line
from qadapt.run_dir import RunDir


def main() -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--types", nargs="+", default=["f16", "bf16", "q8_0", "q5_1", "q4_0", "q4_k_m"],
                        choices=GGUF_TYPES)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(f"machine: {one_line()}")
    recipe = RunDir(args.run).trained_recipe
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for gguf_type in args.types:
            merged, gguf_file = Path(tmp) / f"merged-{gguf_type}", Path(tmp) / f"{gguf_type}.gguf"
            merge_run(args.run, merged, MERGE_DTYPE.get(gguf_type, "auto"), show_written=False)
            config = json.loads((merged / "config.json").read_text())
            pre = tokenizer_pre(recipe.model.name, merged, gguf_family(config))
            write_gguf_as(merged, gguf_file, gguf_type, pre, args.run.name, scratch=Path(tmp))
            tokenizer = AutoTokenizer.from_pretrained(merged)
            texts, prompts = (probe_texts(recipe.data.template, tokenizer, answered=a) for a in (True, False))
            rows = llamacpp.run_side_by_side(merged, gguf_file, texts, prompts, args.tokens)
            result = {"type": gguf_type, "gguf_bytes": gguf_file.stat().st_size, **llamacpp.summary(rows),
                      "greedy_tokens_alike": [row.get("greedy_tokens_alike") for row in rows]}
            print(json.dumps(result), flush=True)
            results.append({**result, "rows": rows})
            gguf_file.unlink()
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "tokens": args.tokens, "machine": describe(),
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
