"""Does the design card hold on one GPU? The real CLI on a LLaMA-2-7B-shaped model, and PEFT beside it.

    python tools/gpu_check.py [--shape llama2-7b] [--out docs/results] [--work /tmp/gpu-check] [--tokenizer FOLDER]

1. build    a LLaMA-2-7B-shaped model with random weights (bf16), saved once as a model folder with the
            embedded SmolLM2 tokenizer, whose 49,152 tokens size the embeddings: nothing is downloaded;
2. plan     `qadapt plan recipes/llama2-7b-qlora-24gb.yaml` on it: the predicted peak;
3. train    `qadapt train` with that recipe (NF4, paged 8-bit AdamW, checkpointing; the built-in word
            problems packed into rows of the recipe's 512 tokens, so every step is as long as the plan's),
            stopped by SIGTERM after its first step, then `--resume`d to the end: peak allocated and
            reserved memory (counted after loading), tokens/s;
4. eval     `qadapt eval --limit 64`: decoding throughput;
5. export   `qadapt export RUN --format peft`: the adapter as a PEFT folder;
6. merge    `qadapt merge` with its logit checks (it works on the host);
7. peft     qadapt's training step against PEFT + bitsandbytes on the same folder, batch and sequence
            (tools/bench_train.py: each side in its own process, checkpointing asserted on both); then, in
            qadapt's process, one step at 32k tokens (batch 1): its peak memory, or out of memory. On a GPU
            both sides may use 24 GiB, a consumer card's memory.
The command line a user runs comes first (1-6), the comparison with PEFT last.
After each phase the figures so far are written to OUT/gpu-check-SHAPE.json and .md, so a run cut
short keeps what it measured; the model folder, the run, the merged model and the eval go under WORK
(a 7B's two model folders are ~28 GB). `--shape tiny` runs every phase in about a minute on a CPU (the test suite
does, so that the script cannot rot); figures from a CPU are not GPU figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
RECIPE = REPO / "recipes" / "llama2-7b-qlora-24gb.yaml"
sys.path.insert(0, str(TOOLS))
import bench_train  # noqa: E402

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, max_position_embeddings=32768),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048),
}
# What each phase runs at each shape: the recipe's own batch on a GPU, a few small steps on a CPU.
PROFILES = {
    "llama2-7b": dict(train_steps=6, overrides=[], batch=2, seq=2048, steps=4, warmup=1, probe_seq=32768,
                      eval_limit=64, max_new_tokens=256),
    "tiny": dict(train_steps=12, overrides=["data.cutoff_len=128", "train.micro_batch_size=2", "train.grad_accum=1",
                                            "model.compute_dtype=auto"],
                 batch=2, seq=64, steps=2, warmup=1, probe_seq=1024, eval_limit=8, max_new_tokens=16),
}
# A user's command line first; the comparison with PEFT, which loads the base twice more, last.
PHASES = ("build", "plan", "train", "eval", "export", "merge", "peft")


def build_model_folder(shape: str, folder: Path, tokenizer_source: str | None) -> Path:
    """A LLaMA of `shape` with random bf16 weights (normal, std 0.02; norms 1) and the SmolLM2 tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    if tokenizer_source:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    else:
        from qadapt.models import load_tokenizer
        from qadapt.recipe import ModelConfig

        tokenizer = load_tokenizer(ModelConfig())
    config = LlamaConfig(**SHAPES[shape], vocab_size=len(tokenizer), tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.to_empty(device=device)  # drawn where it is fastest; saved tensor by tensor
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if name.endswith("norm.weight") else param.normal_(0, 0.02, generator=generator)
    model.save_pretrained(folder, max_shard_size="5GB")
    tokenizer.save_pretrained(folder)
    return folder


def qadapt(*args: str, **popen) -> subprocess.Popen:
    """`qadapt ARGS` (python -m qadapt) in its own process, from the repository root."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "qadapt", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def finished(process: subprocess.Popen, what: str, expected: int = 0) -> float:
    """Wait for `process`; raise with the end of its output unless it exits with `expected`."""
    output, _ = process.communicate()
    if process.returncode != expected:
        raise RuntimeError(f"{what} exited with {process.returncode}, not {expected}:\n{output[-4000:]}")
    return process.returncode


def timed(action) -> tuple[object, float]:
    start = time.perf_counter()
    result = action()
    return result, round(time.perf_counter() - start, 1)


def train_overrides(folder: Path, run: Path, profile: dict) -> list[str]:
    return [f"model.name={folder}", "data.path=builtin:word-problems", "data.packing=true", "data.val_size=0",
            f"train.max_steps={profile['train_steps']}", "train.save_every=2", "train.eval_every=0",
            "train.warmup_steps=1", f"output_dir={run}", *profile["overrides"]]


def phase_plan(folder: Path, out: Path, profile: dict) -> dict:
    from qadapt.training.plan import plan_memory
    from qadapt.recipe import load_recipe

    overrides = train_overrides(folder, out / "run", profile)
    _, seconds = timed(lambda: finished(qadapt("plan", str(RECIPE), *overrides), "qadapt plan"))
    plan = plan_memory(load_recipe(RECIPE, overrides))
    return {"predicted_allocated_gib": round(plan.allocated / 2**30, 2),
            "predicted_with_context_gib": round(plan.needed / 2**30, 2), "fits_24gb": plan.fits, "seconds": seconds}


def phase_train(folder: Path, out: Path, profile: dict) -> dict:
    """Train, stop it with SIGTERM once its first step is logged, resume to the end; the run's own figures."""
    from qadapt.training.stop_signals import EXIT_CODES

    run = out / "run"
    shutil.rmtree(run, ignore_errors=True)  # this script's own scratch, from an earlier check
    overrides = train_overrides(folder, run, profile)
    started = time.perf_counter()
    process = qadapt("train", str(RECIPE), *overrides)
    metrics = run / "metrics.jsonl"
    while process.poll() is None and not (metrics.is_file() and '"loss"' in metrics.read_text()):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    finished(process, "qadapt train (stopped by SIGTERM)", EXIT_CODES["SIGTERM"])
    stopped_after = sum('"loss"' in line for line in metrics.read_text().splitlines())
    finished(qadapt("train", str(RECIPE), *overrides, "--resume"), "qadapt train --resume")
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {"stopped_after_step": stopped_after, "steps": [row["step"] for row in rows if "loss" in row],
            "losses": [round(row["loss"], 4) for row in rows if "loss" in row],
            "peak_allocated_mb": round(summary["peak_memory_mb"]),
            "peak_reserved_mb": round(summary["peak_reserved_mb"]) if "peak_reserved_mb" in summary else None,
            "s_per_step_resumed": round(summary["s_per_step"], 3), "tokens_seen": summary["tokens_seen"],
            "tokens_per_s": round(rows[-1]["tokens_per_s"], 1),
            "seconds_with_loading": round(time.perf_counter() - started, 1)}


def phase_merge(out: Path) -> dict:
    """`qadapt merge` as a user runs it; if its check refuses the 16-bit merge, what it said, then `--dtype fp32`
    as the refusal advises. A few steps of a random-weight model is where a 16-bit merge is refused: the
    adapter's update is about one rounding step of the base's weights, and the logits' top-1 rests on near-ties
    (the H200's first run: docs/how-to/gpu.md)."""
    from qadapt.export.merge import MERGE_INFO_FILE

    merged, figures = out / "merged", {}
    for dtype in ("auto", "fp32"):
        shutil.rmtree(merged, ignore_errors=True)
        started = time.perf_counter()
        process = qadapt("merge", str(out / "run"), "--out", str(merged), "--dtype", dtype)
        output, _ = process.communicate()
        if process.returncode == 2 and dtype == "auto" and "nothing was written" in output:
            figures["refused_in_16_bits"] = next(line for line in output.splitlines() if line.startswith("error:"))
            continue
        if process.returncode != 0:
            raise RuntimeError(f"qadapt merge --dtype {dtype} exited with {process.returncode}:\n{output[-4000:]}")
        info = json.loads((merged / MERGE_INFO_FILE).read_text())
        return {**figures, "dtype": info["dtype"], "folded_layers": info["folded_layers"],
                "vs_adapter_on_same_base": info["vs_adapter_on_same_base"],
                "vs_trained_model": info["vs_trained_model"], "seconds": round(time.perf_counter() - started, 1)}


def phase_export(out: Path) -> dict:
    exported = out / "peft-export"
    shutil.rmtree(exported, ignore_errors=True)
    command = ["export", str(out / "run"), "--format", "peft", "--out", str(exported)]
    _, seconds = timed(lambda: finished(qadapt(*command), "qadapt export --format peft"))
    return {"files": sorted(path.name for path in exported.iterdir()), "seconds": seconds}


def phase_eval(folder: Path, out: Path, profile: dict) -> dict:
    from transformers import AutoTokenizer

    evaluation = out / "eval"
    shutil.rmtree(evaluation, ignore_errors=True)
    command = ["eval", str(out / "run"), "--data", "builtin:word-problems", "--limit", str(profile["eval_limit"]),
               "--max-new-tokens", str(profile["max_new_tokens"]), "--out", str(evaluation)]
    _, seconds = timed(lambda: finished(qadapt(*command), "qadapt eval"))
    metrics = json.loads((evaluation / "metrics.json").read_text())
    row = next(iter(metrics["sets"].values()))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    outputs = [json.loads(line)["output"] for line in (evaluation / "predictions.jsonl").read_text().splitlines()]
    generated = sum(len(tokenizer(text, add_special_tokens=False).input_ids) for text in outputs)
    return {"problems": row["total"], "decode_seconds": round(row["seconds"], 1),
            "problems_per_s": round(row["total"] / row["seconds"], 2),
            "generated_tokens_per_s": round(generated / row["seconds"], 1), "seconds_with_loading": seconds}


def phase_peft(folder: Path, profile: dict) -> dict:
    report = bench_train.compare(bench_train.parse_args([
        "--model", str(folder), "--quant", "nf4", "--compute-dtype", "auto", "--gradient-checkpointing", "on",
        "--rank", "16", "--batch", str(profile["batch"]), "--seq", str(profile["seq"]), "--steps", str(profile["steps"]),
        "--warmup", str(profile["warmup"]), "--rounds", "1", "--optimizer", "paged_adamw_8bit",
        "--probe-seq", str(profile["probe_seq"]), *(["--gpu-memory", "24"] if torch.cuda.is_available() else [])]))
    keep = ("step_time_s", "tokens_per_s", "peak_memory_mb", "peak_reserved_mb", "mfu", "ops_per_step")
    return {"batch": profile["batch"], "seq": profile["seq"],
            **{side: {k: report[side][k] for k in keep if k in report[side]} for side in ("qadapt", "peft")},
            "step_time_ratio": report["step_time_ratio"], "peak_memory_ratio": report["peak_memory_ratio"],
            "probe": report["qadapt"]["probe"]}


def markdown(report: dict) -> str:
    """The figures as a table a person reads: phase, what was measured."""
    lines = [f"# gpu_check: {report['shape']} on {report['device']}", "",
             f"`{report['command']}`, {report['date']}; {report['machine']}", "",
             "| phase | figures |", "|---|---|"]
    for phase in PHASES:
        if phase in report["phases"]:
            figures = report["phases"][phase]
            text = ", ".join(f"{key}: {value}" for key, value in figures.items()) if isinstance(figures, dict) else figures
            lines.append(f"| {phase} | {text} |")
    if report.get("failed"):
        lines += ["", f"Stopped at {report['failed']['phase']}: {report['failed']['error'].splitlines()[0]}"]
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    name = f"gpu-check-{report['shape']}"
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{name}.md").write_text(markdown(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help="where the report is written")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu-check"), help="models, run, merge, eval")
    parser.add_argument("--tokenizer", help="a tokenizer folder (default: the embedded SmolLM2's)")
    parser.add_argument("--phases", default=",".join(PHASES), help="a comma-separated subset, in this order")
    args = parser.parse_args()
    from qadapt.machine import describe, one_line

    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    folder, profile = args.work / f"model-{args.shape}", PROFILES[args.shape]
    report = {"shape": args.shape, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "command": " ".join(["python", "tools/gpu_check.py", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d"),
              "machine": one_line(describe()), "phases": {}}
    actions = {
        "build": lambda: {"seconds": timed(lambda: build_model_folder(args.shape, folder, args.tokenizer))[1]},
        "plan": lambda: phase_plan(folder, args.work, profile),
        "train": lambda: phase_train(folder, args.work, profile),
        "export": lambda: phase_export(args.work),
        "merge": lambda: phase_merge(args.work),
        "eval": lambda: phase_eval(folder, args.work, profile),
        "peft": lambda: phase_peft(folder, profile),
    }
    for phase in args.phases.split(","):
        try:
            report["phases"][phase] = actions[phase]()
        except Exception as error:  # keep what was measured, say where it stopped
            report["failed"] = {"phase": phase, "error": f"{type(error).__name__}: {error}"}
            write(report, args.out)
            raise
        print(f"{phase}: {json.dumps(report['phases'][phase])}", flush=True)
        write(report, args.out)


if __name__ == "__main__":
    main()
