"""A merged model as one GGUF file for llama.cpp / Ollama, checked where it will run.

    qadapt export RUN_DIR --format gguf --out FILE [--type f16|bf16|q8_0|q5_1|q5_0|q4_1|q4_0|q4_k_m|...]
                  [--base dequantized|original]

The run is merged and verified first (qadapt.export.merge), then its safetensors are streamed into the GGUF
one tensor at a time (gguf-py's writer), laid out for the family's llama.cpp architecture
(qadapt.export.gguf_families), with what llama.cpp needs besides the weights: hyper-parameters,
vocabulary and merges, BOS/EOS/padding ids and the run's chat template. K-quants (q4_k_m, ...) are made
from a 16-bit GGUF by llama.cpp's own quantizer. Then the file is checked where it will run:
llama.cpp (the optional `qadapt[llamacpp]` extra) runs it beside the merged model in transformers;
without the extra, transformers reads it back (`gguf_file=`) for the architectures it knows, and refuses
the others. Below a type's floor of top-1 agreement, nothing is written.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from qadapt.errors import QadaptError
from qadapt.export import llamacpp
from qadapt.export.gguf_families import GgufFamily, add_hyperparameters, gguf_family, to_gguf_layout
from qadapt.files import atomic_file, describe_written, refuse_existing

PYTHON_TYPES = ("f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")  # written by gguf-py, tensor by tensor
GGUF_TYPES = PYTHON_TYPES + llamacpp.K_QUANTS
# The merged folder's dtype for each GGUF type: the same rounding, once; quantized types start from the
# checkpoint's.
MERGE_DTYPE = {"f16": "fp16", "bf16": "bf16"}
# Least top-1 agreement with the merged model on the check prompts, per type: below it the file is
# refused. A floor catches a broken file (a wrong layout or tokenizer gives another model), not a
# quality bar: what each type costs is measured in docs/benchmarks/exports.md. The 4- and 5-bit floors are set
# so that a tiny random model's flat logits pass (0.41 measured for q4_0 in the tests).
MIN_TOP1_AGREEMENT = {"f16": 0.99, "bf16": 0.98, "q8_0": 0.9, "q6_k": 0.9, "q5_1": 0.5, "q5_0": 0.5,
                      "q5_k_m": 0.5, "q5_k_s": 0.5, "q4_1": 0.3, "q4_0": 0.3, "q4_k_m": 0.3, "q4_k_s": 0.3,
                      "q3_k_l": 0.2, "q3_k_m": 0.2, "q3_k_s": 0.2, "q2_k": 0.1}
# The tensors that set every next token (the output head, or the embedding when tied to it) stay in
# q8_0 for 4- and 5-bit types: llama.cpp keeps them in Q6_K, which gguf-py cannot write.
HEAD_TYPE_FOR_LOW_BITS = "q8_0"


def export_gguf(run_dir: str | Path, out: str | Path, gguf_type: str = "f16", base: str = "dequantized") -> dict:
    from qadapt.export.merge import merge_run, refuse_unmergeable
    from qadapt.models import meta_model
    from qadapt.run_dir import RunDir

    if gguf_type not in GGUF_TYPES:
        raise QadaptError(f"--type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    run_dir, out = Path(run_dir), Path(out)
    recipe = RunDir(run_dir).trained_recipe
    refuse_unmergeable(recipe, "gguf", "export to GGUF")
    refuse_existing(out)
    config = meta_model(recipe.model).config.to_dict()
    family = gguf_family(config)
    if gguf_type in llamacpp.K_QUANTS:
        llamacpp.require(f"--type {gguf_type}")
    if not llamacpp.installed() and not transformers_reads(family):
        raise QadaptError(f"a {config['model_type']} GGUF can only be checked by running it in llama.cpp: "
                          f"{llamacpp.INSTALL_HINT}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".tmp-merge-") as tmp:
        merged = Path(tmp) / "merged"
        merge_run(run_dir, merged, MERGE_DTYPE.get(gguf_type, "auto"), base, show_written=False)
        pre = tokenizer_pre(recipe.model.name, merged, family)
        with atomic_file(out) as gguf_tmp:
            write_gguf_as(merged, gguf_tmp, gguf_type, pre, run_dir.resolve().name, scratch=Path(tmp))
            checks = verify_gguf(merged, gguf_tmp, recipe.data.template, family)
            refuse_below_floor(checks, gguf_type, "the GGUF")
    print(describe_written(out))
    for reader, check in checks.items():
        print(f"verified in {reader}, vs the merged model: " + "  ".join(f"{k} {v}" for k, v in check.items()))
    return checks


def write_gguf_as(folder: Path, out: Path, gguf_type: str, pre: str, name: str, scratch: Path) -> None:
    """write_gguf, or for a K-quant, a 16-bit file in `scratch` quantized by llama.cpp."""
    if gguf_type not in llamacpp.K_QUANTS:
        write_gguf(folder, out, gguf_type, pre, name=name)
        return
    sixteen = scratch / "16-bit.gguf"
    write_gguf(folder, sixteen, sixteen_bit_type(folder), pre, name=name)
    llamacpp.quantize(sixteen, out, gguf_type)
    sixteen.unlink()


def sixteen_bit_type(merged: Path) -> str:
    """The 16-bit type llama.cpp quantizes from: bf16 for a bf16 checkpoint (f16 would clip its range)."""
    dtype = json.loads((merged / "config.json").read_text()).get("dtype")
    return "bf16" if dtype == "bfloat16" else "f16"


def transformers_reads(family: GgufFamily) -> bool:
    """Whether transformers loads a GGUF of this architecture (gguf_file=) as the model it is."""
    import gguf
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, family.arch)]
    return family.transformers_reads_it and arch in GGUF_CONFIG_MAPPING


# How a byte-level BPE tokenizer, as transformers loads it, splits text before merging → llama.cpp's name for
# the same splitting. (transformers may replace tokenizer.json's pre-tokenizer by its class's own, as
# Qwen2Tokenizer does, so the loaded tokenizer is read, not the file.)
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = _QWEN2_SPLIT.replace(r"\p{N}|", r"\p{N}{1,3}|")
_PRE_TOKENIZERS = {
    (("Split", _QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Digits", True), ("ByteLevel", True)): "smollm",  # single digits, then GPT-2's regex
    (("ByteLevel", True),): "gpt-2",
}


def tokenizer_pre(model_name: str, folder: Path, family: GgufFamily) -> str:
    """llama.cpp's pre-tokenizer name: the source GGUF's when the base came from one; else the one whose
    splitting the tokenizer's matches; else the family's. The checks compare tokenizations after."""
    import gguf
    from transformers import AutoTokenizer

    from qadapt.models import EMBEDDED_MODELS, embedded_model

    source = embedded_model(model_name) if model_name in EMBEDDED_MODELS else Path(model_name)
    if source.suffix == ".gguf" and source.is_file():
        field = gguf.GGUFReader(source).get_field(gguf.Keys.Tokenizer.PRE)
        if field is not None:
            return field.contents()
    backend = getattr(AutoTokenizer.from_pretrained(folder), "_tokenizer", None)
    pre = (json.loads(backend.to_str()).get("pre_tokenizer") if backend is not None else None) or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    shape = tuple((step.get("type"), (step.get("pattern") or {}).get("Regex") if step.get("type") == "Split"
                   else bool(step.get("individual_digits", step.get("use_regex")))) for step in steps)
    return _PRE_TOKENIZERS.get(shape, family.pre_tokenizer)


def write_gguf(folder: Path, out: Path, gguf_type: str, pre: str = "default", name: str | None = None) -> None:
    """Stream the HF folder's weights into a GGUF file, with its hyper-parameters and tokenizer."""
    import gguf
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    family = gguf_family(config)
    arch = getattr(gguf.MODEL_ARCH, family.arch)
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name or folder.name)
    add_hyperparameters(writer, family, config)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{gguf_type.upper()}"))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, folder, config["vocab_size"], pre)
    names = gguf.get_tensor_name_map(arch, config.get("num_hidden_layers") or config["n_layer"])
    tensors = []  # (file, hf name, shape, gguf name)
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                target = names.get_name(_strip(key, family), try_suffixes=(".weight", ".bias"))
                if target is None:
                    raise QadaptError(f"{key}: no GGUF tensor name for it in the {family.arch.lower()} architecture")
                tensors.append((file, key, f.get_slice(key).get_shape(), target))
    tied = not any(target == "output.weight" for *_, target in tensors)
    plan = []  # (file, hf name, GGML type), in writing order
    for file, key, shape, target in tensors:
        sets_next_token = target == "output.weight" or (tied and target == "token_embd.weight")
        qtype = _tensor_type(shape, gguf_type, sets_next_token)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape)) // block * size
        writer.add_tensor_info(target, shape, np.float32 if qtype == gguf.GGMLQuantizationType.F32 else
                               np.float16, nbytes, raw_dtype=qtype)
        plan.append((file, key, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for file, key, qtype in plan:
        with safe_open(file, "pt") as f:
            tensor = to_gguf_layout(key, f.get_tensor(key).to(torch.float32), family, config)
        writer.write_tensor_data(gguf.quants.quantize(tensor.numpy(), qtype))
    writer.close()


def _strip(key: str, family: GgufFamily) -> str:
    return key.removeprefix(family.strip_prefix) if family.strip_prefix else key


def _tensor_type(shape: list[int], gguf_type: str, sets_next_token: bool):
    import gguf

    types = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return types.F32  # norms and biases stay exact, as llama.cpp keeps them
    if sets_next_token and gguf_type[:2] in ("q4", "q5"):
        gguf_type = HEAD_TYPE_FOR_LOW_BITS
    wanted = getattr(types, gguf_type.upper())
    if shape[-1] % gguf.GGML_QUANT_SIZES[wanted][0] != 0:
        return types.F16  # rows that do not split into the type's blocks
    return wanted


def _add_tokenizer(writer, folder: Path, vocab_size: int, pre: str) -> None:
    """Vocabulary, merges, special ids and chat template from the folder's tokenizer files."""
    import gguf

    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = tokenizer_json["model"]
    byte_level = model["type"] == "BPE" and (tokenizer_json.get("decoder") or {}).get("type") == "ByteLevel"
    if byte_level:
        tokens, types = _byte_level_vocab(tokenizer_json, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    else:  # a SentencePiece-style LLaMA tokenizer (byte fallback), as gguf-py reads it
        vocab = gguf.LlamaHfVocab(folder)
        tokens, scores, types = zip(*vocab.all_tokens())
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(list(tokens))
        writer.add_token_scores(list(scores))
        writer.add_token_types(list(types))
    special = gguf.SpecialVocab(folder, load_merges=byte_level, n_vocab=vocab_size)
    if "bos" not in special.add_special_token:  # say it either way: llama.cpp's default differs by vocab type
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        special.add_special_token["bos"] = tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
    special.add_to_gguf(writer, quiet=True)


def _byte_level_vocab(tokenizer_json: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id, and their types: special added tokens are CONTROL, other added ones USER_DEFINED."""
    import gguf

    by_id = {index: token for token, index in tokenizer_json["model"]["vocab"].items()}
    types = {index: gguf.TokenType.NORMAL for index in by_id}
    for added in tokenizer_json.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    size = max(vocab_size, max(by_id) + 1)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    return tokens, [int(types.get(i, gguf.TokenType.UNUSED)) for i in range(size)]


def verify_gguf(merged: Path, gguf_file: Path, template: str, family: GgufFamily) -> dict[str, dict]:
    """The GGUF against the merged folder on the check prompts, {reader: figures}: run in llama.cpp when
    it is installed (where the file will run), else read back by transformers where it can."""
    from transformers import AutoTokenizer

    from qadapt.export.merge import probe_texts

    if not llamacpp.installed():
        texts = probe_texts(template, AutoTokenizer.from_pretrained(merged))
        return {"transformers": read_back_in_transformers(merged, gguf_file, texts)}
    return {"llama.cpp": run_in_llamacpp(merged, gguf_file, template)}


def run_in_llamacpp(merged: Path, gguf_file: Path, template: str, lora: Path | None = None) -> dict:
    """The GGUF (with a LoRA GGUF applied, if given) run in llama.cpp beside the merged folder on the check
    prompts: their figures; a prompt llama.cpp tokenizes otherwise is an error."""
    from transformers import AutoTokenizer

    from qadapt.export.merge import probe_texts

    tokenizer = AutoTokenizer.from_pretrained(merged)
    texts, prompts = (probe_texts(template, tokenizer, answered=answered) for answered in (True, False))
    rows = llamacpp.run_side_by_side(merged, gguf_file, texts, prompts, lora=lora)
    split = [row["text"] for row in rows if not row["same_tokenization"]]
    if split:
        raise QadaptError(f"llama.cpp splits {split[0]!r}... differently from the model's tokenizer "
                          "(its pre-tokenizer name may be wrong); nothing was written")
    return llamacpp.summary(rows)


def refuse_below_floor(checks: dict[str, dict], gguf_type: str, what: str) -> None:
    """An error naming every reader whose top-1 agreement is below the type's floor."""
    floor = MIN_TOP1_AGREEMENT[gguf_type]
    failed = {reader: check for reader, check in checks.items() if check["top1_agreement"] < floor}
    if failed:
        raise QadaptError(f"{what} disagrees with the merged model (top-1 floor for {gguf_type}: {floor:.0%}): "
                          f"{failed}; nothing was written")


def read_back_in_transformers(merged: Path, gguf_file: Path, texts: list[str]) -> dict:
    """Load the GGUF with transformers; compare tokenization and logits with the merged folder's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qadapt.export.merge import compare_logits, logits_on

    tokenizer = AutoTokenizer.from_pretrained(merged)
    read_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    for text in texts:
        if tokenizer(text).input_ids != read_tokenizer(text).input_ids:
            raise QadaptError(f"the GGUF's tokenizer splits {text[:60]!r}... differently from the model's")
    if read_tokenizer.eos_token_id != tokenizer.eos_token_id:
        raise QadaptError(f"the GGUF's EOS is {read_tokenizer.eos_token_id}, the model's {tokenizer.eos_token_id}")
    reference = logits_on(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), tokenizer, texts)
    read_back = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    return compare_logits(reference, logits_on(read_back, tokenizer, texts))
