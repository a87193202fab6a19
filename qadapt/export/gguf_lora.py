"""A run's LoRA as llama.cpp's adapter file, beside the base it was trained against, checked in llama.cpp.

    qadapt export RUN_DIR --format gguf-lora --out DIR [--type f16|q8_0|q4_k_m|...]
    llama-cli -m DIR/base.gguf --lora DIR/adapter.gguf

adapter.gguf holds each wrapped linear's A and B in float32 under the base's GGUF tensor names
(`blk.0.attn_q.weight.lora_a`), B's rows laid out as the base's rows are (qadapt.export.gguf_families),
and an alpha that makes llama.cpp's scale (alpha / rank) the run's. base.gguf is the base the adapter was
trained against, its quantized linears de-quantized (written by qadapt.export.merge.merge_run), in --type: one file
serves every adapter trained on that base with that quantization. Before the folder appears, llama.cpp
runs base + adapter beside the merged model in transformers; this needs the llamacpp extra, since no
other reader applies a GGUF adapter.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from qadapt.errors import QadaptError
from qadapt.export import llamacpp
from qadapt.export.gguf_families import GgufFamily, gguf_family, to_gguf_layout
from qadapt.files import refuse_existing

BASE_NAME, ADAPTER_NAME = "base.gguf", "adapter.gguf"


def export_gguf_lora(run_dir: str | Path, out: str | Path, gguf_type: str = "f16") -> dict:
    from qadapt.export.gguf_export import (GGUF_TYPES, MERGE_DTYPE, refuse_below_floor, run_in_llamacpp,
                                           tokenizer_pre, write_gguf_as)
    from qadapt.adapters.kinds import adapter_kind
    from qadapt.export.merge import merge_run, refuse_unmergeable
    from qadapt.models import meta_model
    from qadapt.run_dir import RunDir

    if gguf_type not in GGUF_TYPES:
        raise QadaptError(f"--type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    run_dir, out = Path(run_dir), Path(out)
    recipe = RunDir(run_dir).trained_recipe
    refuse_unmergeable(recipe, "gguf", "export to GGUF")
    if not adapter_kind(recipe.adapter.kind).llamacpp_adapter:
        raise QadaptError(f"llama.cpp's adapter files hold LoRA only, not {recipe.adapter.kind}; export the "
                          "merged model instead (--format gguf)")
    llamacpp.require("--format gguf-lora (checked by running base + adapter)")
    refuse_existing(out)
    config = meta_model(recipe.model).config.to_dict()
    family = gguf_family(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-"))
    try:
        base, merged, building = scratch / "base", scratch / "merged", scratch / "out"
        merge_run(run_dir, merged, MERGE_DTYPE.get(gguf_type, "auto"), "dequantized", show_written=False,
                  base_out=base)
        building.mkdir()
        pre = tokenizer_pre(recipe.model.name, base, family)
        write_gguf_as(base, building / BASE_NAME, gguf_type, pre, f"{run_dir.resolve().name}-base", scratch)
        write_lora_gguf(run_dir, building / ADAPTER_NAME, family, config)
        check = run_in_llamacpp(merged, building / BASE_NAME, recipe.data.template, lora=building / ADAPTER_NAME)
        refuse_below_floor({"llama.cpp": check}, gguf_type, "llama.cpp's base + adapter")
        building.rename(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"wrote {out / BASE_NAME} and {out / ADAPTER_NAME}; run: llama-cli -m {out / BASE_NAME} "
          f"--lora {out / ADAPTER_NAME}")
    print("verified in llama.cpp (base + adapter), vs the merged model: "
          + "  ".join(f"{k} {v}" for k, v in check.items()))
    return check


def write_lora_gguf(run_dir: Path, out: Path, family: GgufFamily, config: dict) -> None:
    """The run's LoRA weights as a llama.cpp adapter GGUF (see the module's docstring)."""
    import gguf

    from qadapt.adapters.lora import lora_scale
    from qadapt.run_dir import RunDir

    run = RunDir(run_dir)
    adapter = run.trained_recipe.adapter
    weights = run.adapter.weights()
    arch = getattr(gguf.MODEL_ARCH, family.arch)
    names = gguf.get_tensor_name_map(arch, config.get("num_hidden_layers") or config["n_layer"])
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    # llama.cpp scales by alpha / rank; the run by lora_scale (alpha / √rank with rsLoRA).
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora_scale(adapter.alpha, adapter.rank, adapter.rslora)
                       * adapter.rank)
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in weights})
    for module in modules:
        key = module + ".weight"
        target = names.get_name(key.removeprefix(family.strip_prefix), try_suffixes=(".weight",))
        if target is None or target in ("token_embd.weight", "output.weight"):
            raise QadaptError(f"{module}: llama.cpp's adapter file cannot hold a LoRA on it; export the merged "
                              "model instead (--format gguf)")
        lora_a = weights[f"{module}.lora_a.weight"].float()
        lora_b = to_gguf_layout(key, weights[f"{module}.lora_b.weight"].float(), family, config)
        writer.add_tensor(f"{target}.lora_a", lora_a.contiguous().numpy())
        writer.add_tensor(f"{target}.lora_b", lora_b.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
