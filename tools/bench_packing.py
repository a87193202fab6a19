"""Packing measured: one recipe trained unpacked and packed, the same steps on the same data, side by side.

    .venv/bin/python tools/bench_packing.py recipes/gsm8k-lora.yaml --steps 20 --out runs/bench-packing \\
        [--json docs/packing.json] [--packed KEY=VALUE ...] [override ...]

Each side is an ordinary `qadapt train` run in its own process (so each peak resident memory is its own),
with `data.packing` false, then true; nothing else changes but the `--packed` overrides (e.g. fewer,
longer rows per micro-batch: `--packed train.micro_batch_size=1` beside `data.cutoff_len=1024`). From each
run's summary: non-padding tokens per second, seconds per step, peak memory and the held-out loss at the
end, and the packed / unpacked ratios; and the mean padding share of each side's steps, with the gain that
removing padding alone allows (`padding_ceiling`: the tokens/s ratio if a computed token cost the same
packed and unpacked). The machine (CPU model and capability, or GPU) is recorded beside the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from qadapt.machine import describe
from qadapt.run_dir import RunDir

FIGURES = ("tokens_per_s", "s_per_step", "peak_memory_mb", "eval_loss")


def train(recipe: Path, out: Path, steps: int, packing: bool, overrides: list[str]) -> dict:
    """Train one side (skipped when its run is already finished); its figures."""
    if not RunDir(out).summary_file.is_file():
        command = [sys.executable, "-m", "qadapt", "train", str(recipe), *overrides, f"output_dir={out}",
                   f"data.packing={str(packing).lower()}", f"train.max_steps={steps}", "train.save_every=0",
                   "train.eval_every=0", "--skip-eval", "--overwrite"]
        subprocess.run(command, check=True)
    summary = json.loads(RunDir(out).summary_file.read_text())
    steps = [json.loads(line) for line in RunDir(out).training_log.read_text().splitlines()]
    padding = [row["padding_share"] for row in steps if "padding_share" in row]
    return {"tokens_per_s": summary["tokens_seen"] / summary["wall_s"], "s_per_step": summary["s_per_step"],
            "peak_memory_mb": summary["peak_memory_mb"], "eval_loss": summary["eval_loss"],
            "tokens_seen": summary["tokens_seen"], "steps": summary["steps"],
            "padding_share": sum(padding) / len(padding) if padding else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--packed", action="append", default=[], metavar="KEY=VALUE",
                        help="An override for the packed side only; repeatable.")
    args = parser.parse_args()
    sides = {"unpacked": train(args.recipe, args.out / "unpacked", args.steps, False, args.overrides),
             "packed": train(args.recipe, args.out / "packed", args.steps, True, args.overrides + args.packed)}
    ratios = {key: sides["packed"][key] / sides["unpacked"][key] for key in FIGURES
              if sides["packed"][key] is not None and sides["unpacked"][key]}
    real = {name: 1 - (side["padding_share"] or 0) for name, side in sides.items()}
    result = {"recipe": str(args.recipe), "overrides": args.overrides, "packed_overrides": args.packed,
              "steps": args.steps, "machine": describe(),
              **sides, "packed_over_unpacked": ratios, "padding_ceiling": real["packed"] / real["unpacked"]}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
