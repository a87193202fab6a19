"""A run's GGUF export run in llama.cpp (through llama-cpp-python), against the merged model in transformers.

    pip install llama-cpp-python        # builds llama.cpp from source: minutes
    .venv/bin/python tools/check_gguf_llamacpp.py RUN_DIR [--type f16|bf16|q8_0] [--tokens 32] [--json out.json]

The run is merged and written as GGUF exactly as `qadapt export --format gguf` writes it; then both models
read the check prompts (the run's template around built-in test problems). Per prompt: whether the two
tokenize it alike, the top-1 agreement and mean |Δlogit| of llama.cpp's logits against transformers' at
every prompt position, and whether greedy continuations of --tokens tokens are the same tokens. The
machine is recorded beside the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from qadapt.export.gguf_export import MERGE_DTYPE, tokenizer_pre, write_gguf
from qadapt.export.merge import merge_run, probe_texts
from qadapt.machine import describe, one_line
from qadapt.run_dir import load_run_recipe


def transformers_side(folder: Path, text: str, tokens: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].numpy()
        greedy = model.generate(ids, max_new_tokens=tokens, do_sample=False, eos_token_id=None,
                                pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    return ids[0].tolist(), logits, greedy


def llamacpp_side(llm, text: str, tokens: int):
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[:len(ids)])
    greedy = []
    for _ in range(tokens):  # argmax, never stopping at EOS: the same rule as the transformers side
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(token)
        llm.eval([token])
    return ids, logits, greedy


def main() -> None:
    from llama_cpp import Llama

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--type", default="f16", choices=sorted(MERGE_DTYPE))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(f"machine: {one_line()}")
    recipe = load_run_recipe(args.run)
    with tempfile.TemporaryDirectory() as tmp:
        merged, gguf_file = Path(tmp) / "merged", Path(tmp) / "model.gguf"
        merge_run(args.run, merged, MERGE_DTYPE[args.type], show_written=False)
        write_gguf(merged, gguf_file, args.type, tokenizer_pre(recipe.model.name))
        from transformers import AutoTokenizer

        texts = probe_texts(recipe.data.template, AutoTokenizer.from_pretrained(merged))
        llm = Llama(str(gguf_file), n_ctx=1024, logits_all=True, verbose=False, n_threads=2)
        rows = []
        for text in texts:
            hf_ids, hf_logits, hf_greedy = transformers_side(merged, text, args.tokens)
            cpp_ids, cpp_logits, cpp_greedy = llamacpp_side(llm, text, args.tokens)
            same_ids = hf_ids == cpp_ids
            n = min(len(hf_logits), len(cpp_logits))
            rows.append({"same_tokenization": same_ids,
                         "top1_agreement": float((hf_logits[:n].argmax(-1) == cpp_logits[:n].argmax(-1)).mean()),
                         "mean_abs_diff": float(np.abs(hf_logits[:n] - cpp_logits[:n]).mean()),
                         "greedy_same": hf_greedy == cpp_greedy,
                         "greedy_same_prefix": next((i for i, (a, b) in enumerate(zip(hf_greedy, cpp_greedy))
                                                     if a != b), len(hf_greedy))})
        size = gguf_file.stat().st_size
    summary = {"run": str(args.run), "type": args.type, "gguf_bytes": size, "prompts": len(rows),
               "same_tokenization": sum(r["same_tokenization"] for r in rows),
               "greedy_same": sum(r["greedy_same"] for r in rows),
               "top1_agreement": float(np.mean([r["top1_agreement"] for r in rows])),
               "mean_abs_diff": float(np.mean([r["mean_abs_diff"] for r in rows])),
               "machine": describe(), "rows": rows}
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
