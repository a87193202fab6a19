"""Sampled decoding speed: qadapt's decoder against transformers' generate, K samples per problem.

Same model (its 4-bit base unpacked for decoding, as `qadapt eval` runs it), same GSM8K test prompts in the
training template, same temperature, top-p, stop strings and token budget, one process, one after the other:
  qadapt   sample_generate: each prompt prefilled once and its cache copied per sample, finished rows
           leave the batch and new prompts join it (continuous batching), --batch-size rows at a time
  plain    model.generate(do_sample=True, num_return_sequences=K), --plain-prompts prompts (× K rows) per call

    .venv/bin/python tools/bench_sampling.py [--target smollm2-135m|RUN_DIR] [--limit 16] [--samples 8] \\
        [--max-new-tokens 128] [--out sampling.json]

The two draw different samples (different random streams), so their lengths differ: the table gives
samples/s and generated tokens/s of each, and qadapt's ratio on both. The machine is recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qadapt.data import prompt_text
from qadapt.decoding.generation import cut_at_stop, sample_generate
from qadapt.decoding.sampling import Sampling
from qadapt.inference.loader import load_target
from qadapt.machine import describe, one_line
from qadapt.tasks.math_sets import load_eval_set, stop_strings

GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


def plain_sample(model, tokenizer, prompts, sampling: Sampling, max_new_tokens, per_call, stops, special):
    torch.manual_seed(sampling.seed)
    outputs = []
    for start in range(0, len(prompts), per_call):
        batch = tokenizer(prompts[start:start + per_call], return_tensors="pt", padding=True, padding_side="left",
                          add_special_tokens=special)
        with torch.no_grad():
            sequences = model.generate(**batch.to(model.device), max_new_tokens=max_new_tokens, do_sample=True,
                                       temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                                       num_return_sequences=sampling.samples, stop_strings=list(stops) or None,
                                       tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id)
        width = batch["input_ids"].shape[1]
        outputs += [cut_at_stop(tokenizer.decode(s[width:], skip_special_tokens=True), stops) for s in sequences]
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--data", default=str(GSM8K_TEST))
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64, help="qadapt: rows (samples) decoded together")
    parser.add_argument("--plain-prompts", type=int, default=8, help="plain: prompts per generate call")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"machine: {one_line()}")
    loaded = load_target(args.target)
    model, tokenizer, template = loaded.model, loaded.tokenizer, loaded.template
    prompts = [prompt_text(r, template, tokenizer) for r in load_eval_set(args.data, args.limit).records]
    sampling = Sampling(args.temperature, args.top_p, 0, args.samples, seed=0)
    stops, special = stop_strings(template, tokenizer), template == "alpaca"

    def measure(label, decode):
        start = time.perf_counter()
        texts = decode()
        seconds = time.perf_counter() - start
        tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        print(f"{label}: {len(texts)} samples, {tokens} tokens in {seconds:.1f} s", flush=True)
        return {"method": label, "samples": len(texts), "tokens": tokens, "seconds": seconds,
                "samples_per_s": len(texts) / seconds, "tokens_per_s": tokens / seconds}

    ours = measure("qadapt sample_generate", lambda: [t for ts in sample_generate(
        model, tokenizer, prompts, sampling, args.max_new_tokens, args.batch_size, stops, special) for t in ts])
    plain = measure(f"generate(num_return_sequences={args.samples}), {args.plain_prompts} prompts per call",
                    lambda: plain_sample(model, tokenizer, prompts, sampling, args.max_new_tokens, args.plain_prompts,
                                         stops, special))
    ratios = {"samples_per_s": ours["samples_per_s"] / plain["samples_per_s"],
              "tokens_per_s": ours["tokens_per_s"] / plain["tokens_per_s"]}
    print(f"\n{args.target}, {len(prompts)} problems × {args.samples} samples, temperature {args.temperature}, "
          f"top-p {args.top_p}, max {args.max_new_tokens} new tokens, {args.threads} threads\n")
    print("| method | samples | generated tokens | seconds | samples/s | tokens/s |")
    print("|---|---|---|---|---|---|")
    for row in (ours, plain):
        print(f"| {row['method']} | {row['samples']} | {row['tokens']} | {row['seconds']:.1f} | "
              f"{row['samples_per_s']:.2f} | {row['tokens_per_s']:.1f} |")
    print(f"\nqadapt ÷ plain: {ratios['samples_per_s']:.2f}× samples/s, {ratios['tokens_per_s']:.2f}× tokens/s")
    if args.out:
        args.out.write_text(json.dumps({"machine": describe(), "settings": vars(args) | {"out": str(args.out)},
                                        "rows": [ours, plain], "qadapt_over_plain": ratios}, indent=2))


if __name__ == "__main__":
    main()
