"""FSDP's loading on N CPU ranks (gloo): every rank reading the base, or rank 0 alone (cpu-ram-efficient loading).

    .venv/bin/python tools/fsdp_loading.py [--model smollm2-135m] [--quant nf4] [--ranks 2] [--json out.json]

For each way, `--ranks` processes (torch.distributed.run, gloo) load the base as qadapt.training.distributed
does for FSDP, each measuring the growth of its peak resident set while loading (Linux VmHWM, reset before)
and the bytes of real (not meta) tensors its model holds. Then what FSDP's sync_module_states does on
GPUs is done here by hand (FSDP refuses it on a CPU): the ranks without weights allocate them empty,
and every parameter and buffer is broadcast from rank 0; each rank's logits on a fixed batch are
compared with rank 0's. Prints a table per rank and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
from peer_bench import peak_rss_mb, reset_peak_rss  # noqa: E402

WAYS = ("every-rank", "rank-0")


def worker(args) -> dict:
    import torch.distributed as dist

    from qadapt.machine import describe
    from qadapt.models import load_base
    from qadapt.quant import disable_cpu_weight_repacking
    from qadapt.recipe import ModelConfig
    from qadapt.training.distributed import HOST, load_base_on_rank_0

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = ModelConfig(name=args.model, quant=args.quant, compute_dtype=args.compute_dtype)
    before_mb = peak_rss_mb()
    reset_peak_rss()
    if args.way == "rank-0":
        model, _ = load_base_on_rank_0(cfg, rank, HOST)
    else:
        model = load_base(cfg, HOST, quant_storage_like_compute=True)
    loading_peak_mb = peak_rss_mb() - before_mb
    real_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
                     if t.device.type != "meta")
    sync_from_rank_0(model)
    disable_cpu_weight_repacking(model)  # as training does: the kernels training computes with
    logits = model(input_ids=torch.arange(1, 17)[None] % model.config.vocab_size).logits.float()
    gathered = [torch.empty_like(logits) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, logits)
    dist.barrier()  # no rank tears its connections down while another still reads from them
    dist.destroy_process_group()
    return {"way": args.way, "rank": rank, "loading_peak_growth_mb": round(loading_peak_mb, 1),
            "real_tensor_mb": round(real_bytes / 2**20, 2),
            "logits_equal_rank_0": bool(torch.equal(gathered[0], logits)), "machine": describe()}


def sync_from_rank_0(model: torch.nn.Module) -> None:
    """What FSDP's sync_module_states (with accelerate's param_init_fn, which ties tied weights again) does:
    modules on the meta device are allocated empty, then every parameter and buffer is broadcast from rank 0."""
    import torch.distributed as dist

    for module in model.modules():
        if any(t.device.type == "meta" for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]):
            module.to_empty(device=torch.device("cpu"), recurse=False)
    model.tie_weights()
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def launch(args, way: str) -> list[dict]:
    with socket.socket() as probe:  # a free port, so that parallel runs never collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = Path(args.scratch) / f"{way}.jsonl"
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
               "--master_port", str(port), __file__, "--worker", "--way", way, "--out", str(out),
               "--model", args.model, "--quant", args.quant, "--compute-dtype", args.compute_dtype]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
    return sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda row: row["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "none"])
    parser.add_argument("--compute-dtype", default="bf16")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--scratch", default=None, help="where the ranks write their rows (default: a new temporary folder)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(1)
        row = worker(args)
        with open(args.out, "a") as out:
            out.write(json.dumps(row) + "\n")
        # The row is written; leave without the interpreter's teardown, where torch's gloo group sometimes
        # aborts the process ('terminate called without an active exception', SIGABRT) after its work is
        # done: 3 runs of ~28 on two busy cores, each with both ranks' rows already written.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    args.scratch = args.scratch or tempfile.mkdtemp(prefix="fsdp-loading-")
    report = {way: launch(args, way) for way in args.ways.split(",")}
    print(f"{'way':12} {'rank':>4} {'loading peak +MB':>17} {'real tensors MB':>16} {'logits = rank 0':>16}")
    for way, rows in report.items():
        for row in rows:
            print(f"{way:12} {row['rank']:>4} {row['loading_peak_growth_mb']:>17,.1f} {row['real_tensor_mb']:>16,.1f} "
                  f"{str(row['logits_equal_rank_0']):>16}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
