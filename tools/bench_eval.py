"""Evaluation speed: qadapt's decoding vs a plain batched `generate` vs the LLM-Adapters protocol.

Same model, same GSM8K test problems, one process, one after the other:
  qadapt      greedy_generate as `qadapt eval` runs it (sorted by length, finished rows leave the batch),
              with a 4-bit base unpacked for decoding
  packed      the same, from the packed 4-bit weights (--packed; as `qadapt eval` did before unpacking)
  plain       transformers' generate, greedy, KV cache, batch 16, left padding, same stop strings
  continuous  transformers' continuous batching (`generate_batch`, paged KV cache, transformers >= 5),
              greedy; it has no stop strings, so each answer runs to EOS or max_new_tokens and is cut after
  paper       the paper's evaluate.py protocol: one problem at a time, 4 beams, no KV cache
              (slow: run on the first --paper-limit problems only; its rate is per problem)

    .venv/bin/python tools/bench_eval.py [--target smollm2-135m|RUN_DIR] [--limit 64] [--paper-limit 2] [--packed]
        [--continuous]

Prints a markdown table (problems/s and ratios to qadapt) and how many answers equal qadapt's, and
writes it as JSON next to the predictions when --out is given.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qadapt.tasks import answers
from qadapt.data import prompt_text
from qadapt.inference.loader import load_target
from qadapt.lean_cpu import unpack_for_decoding
from qadapt.tasks.math_sets import ALPACA_STOPS, load_eval_set
from qadapt.decoding.generation import cut_at_stop, greedy_generate
from qadapt.machine import describe, one_line

GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


def plain_generate(model, tokenizer, prompts, max_new_tokens, batch_size, num_beams=1, use_cache=True):
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True, padding_side="left")
        with torch.no_grad():
            sequences = model.generate(**batch.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                                       num_beams=num_beams, use_cache=use_cache, stop_strings=list(ALPACA_STOPS),
                                       tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id)
        width = batch["input_ids"].shape[1]
        outputs += [cut_at_stop(tokenizer.decode(s[width:], skip_special_tokens=True), ALPACA_STOPS)
                    for s in sequences]
    return outputs


def continuous_generate(model, tokenizer, prompts, max_new_tokens):
    """transformers' continuous batching, greedy, each answer cut at the first stop string afterwards."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    inputs = [tokenizer(p)["input_ids"] for p in prompts]  # with the special tokens, as qadapt eval tokenizes
    with torch.no_grad():
        results = model.generate_batch(inputs, generation_config=config, progress_bar=False)
    by_prompt = sorted(results.values(), key=lambda r: int(r.request_id.rsplit("_", 1)[-1]))
    return [cut_at_stop(tokenizer.decode(r.generated_tokens, skip_special_tokens=True), ALPACA_STOPS)
            for r in by_prompt]


def timed(label, fn, problems):
    start = time.perf_counter()
    outputs = fn()
    seconds = time.perf_counter() - start
    print(f"{label}: {problems} problems in {seconds:.1f} s", flush=True)
    return outputs, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--data", default=str(GSM8K_TEST))
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--paper-limit", type=int, default=2, help="problems for the paper's protocol (0: skip)")
    parser.add_argument("--batch-size", type=int, default=64, help="qadapt eval's default (the plain one is 16)")
    parser.add_argument("--compute-dtype", default=None, help="e.g. fp32: answers independent of the batch")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--packed", action="store_true", help="also time decoding from the packed 4-bit weights")
    parser.add_argument("--continuous", action="store_true", help="also time transformers' continuous batching")
    parser.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True,
                        help="time transformers' plain batched generate (--no-plain: skip it)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"machine: {one_line()}")
    loaded = load_target(args.target, compute_dtype=args.compute_dtype, unpack=not args.packed)
    model, tokenizer, template = loaded.model, loaded.tokenizer, loaded.template
    eval_set = load_eval_set(args.data, args.limit)
    prompts = [prompt_text(r, template, tokenizer) for r in eval_set.records]
    n, m = len(prompts), min(args.paper_limit, len(prompts))

    def decode():
        return greedy_generate(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, ALPACA_STOPS)

    packed, packed_s = timed("packed", decode, n) if args.packed else ([], 0.0)
    if args.packed:
        unpack_for_decoding(model)
    ours, ours_s = timed("qadapt", decode, n)
    plain, plain_s = (timed("plain", lambda: plain_generate(model, tokenizer, prompts, args.max_new_tokens, 16), n)
                      if args.plain else ([], 0.0))
    continuous, continuous_s = (timed("continuous", lambda: continuous_generate(model, tokenizer, prompts,
                                                                                args.max_new_tokens), n)
                                if args.continuous else ([], 0.0))
    paper, paper_s = [], 0.0
    if m:  # --paper-limit 0 skips it
        paper, paper_s = timed("paper", lambda: plain_generate(model, tokenizer, prompts[:m], args.max_new_tokens, 1,
                                                               num_beams=4, use_cache=False), m)

    def extracted(outputs):
        return [answers.extract(o, eval_set.multiple_choice) for o in outputs]

    rows = [
        ("qadapt eval", n, ours_s, n, n),
        ("qadapt eval, 4-bit weights packed", n if args.packed else 0, packed_s,
         sum(a == b for a, b in zip(packed, ours)), sum(a == b for a, b in zip(extracted(packed), extracted(ours)))),
        ("plain generate, batch 16", n if args.plain else 0, plain_s, sum(a == b for a, b in zip(plain, ours)),
         sum(a == b for a, b in zip(extracted(plain), extracted(ours)))),
        ("transformers continuous batching (generate_batch)", n if args.continuous else 0, continuous_s,
         sum(a == b for a, b in zip(continuous, ours)),
         sum(a == b for a, b in zip(extracted(continuous), extracted(ours)))),
        ("paper protocol (batch 1, 4 beams, no cache)", m, paper_s, sum(a == b for a, b in zip(paper, ours)),
         sum(a == b for a, b in zip(extracted(paper), extracted(ours)))),
    ]
    ours_rate = n / ours_s
    print(f"\n{args.target}, {eval_set.name} first {n} problems, max {args.max_new_tokens} new tokens, "
          f"{args.threads} threads\n")
    print("| method | problems | seconds | problems/s | qadapt is × faster | same text as qadapt | same answer |")
    print("|---|---|---|---|---|---|---|")
    result = []
    for label, count, seconds, same_text, same_answer in rows:
        if not count:
            continue
        rate = count / seconds
        print(f"| {label} | {count} | {seconds:.1f} | {rate:.3f} | {ours_rate / rate:.1f} | "
              f"{same_text}/{count} | {same_answer}/{count} |")
        result.append({"method": label, "problems": count, "seconds": seconds, "problems_per_s": rate,
                       "speedup_of_qadapt": ours_rate / rate, "same_text": same_text, "same_answer": same_answer})
    if args.out:
        args.out.write_text(json.dumps({"machine": describe(), "rows": result}, indent=2))


if __name__ == "__main__":
    main()
