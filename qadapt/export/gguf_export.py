"""A merged LLaMA-family model as one GGUF file for llama.cpp / Ollama, read back and checked.

    qadapt export RUN_DIR --format gguf --out FILE [--type f16|bf16|q8_0] [--base dequantized|original]

The run is merged and verified first (qadapt.export.merge), then its safetensors are streamed into the GGUF
one tensor at a time (gguf-py's writer), with what llama.cpp needs besides the weights: the
architecture's hyper-parameters, the vocabulary and merges, BOS/EOS/padding ids and the chat template
(the Alpaca one for a run trained on Alpaca prompts). Finally transformers loads the GGUF
(`gguf_file=`), and its logits and tokenization are compared with the merged model's.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from qadapt.errors import QadaptError
from qadapt.files import atomic_file, describe_written, refuse_existing

GGUF_TYPES = ("f16", "bf16", "q8_0")
# The merged folder's dtype for each GGUF type: the same rounding, once; q8_0 starts from the checkpoint's.
MERGE_DTYPE = {"f16": "fp16", "bf16": "bf16", "q8_0": "auto"}
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama"}  # model_type → GGUF architecture
# Least top-1 agreement of the GGUF, read back by transformers, with the merged model. q8_0 rounds every
# weight (measured on the embedded model: 98% agreement); a wrong layout gives a different model entirely.
MIN_TOP1_AGREEMENT = {"f16": 0.99, "bf16": 0.99, "q8_0": 0.9}


def export_gguf(run_dir: str | Path, out: str | Path, gguf_type: str = "f16", base: str = "dequantized") -> dict:
    from qadapt.export.merge import merge_run, refuse_unmergeable
    from qadapt.models import meta_model
    from qadapt.run_dir import load_run_recipe

    if gguf_type not in GGUF_TYPES:
        raise QadaptError(f"--type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    run_dir, out = Path(run_dir), Path(out)
    recipe = load_run_recipe(run_dir)
    refuse_unmergeable(recipe, "gguf", "export to GGUF")
    refuse_existing(out)
    model_type = meta_model(recipe.model).config.model_type
    if model_type not in GGUF_ARCHITECTURES:
        raise QadaptError(f"GGUF export supports {', '.join(GGUF_ARCHITECTURES)} models, not {model_type}; "
                          "merge to a Hugging Face folder (qadapt merge) and convert it with llama.cpp")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".tmp-merge-") as tmp:
        merged = Path(tmp) / "merged"
        merge_run(run_dir, merged, MERGE_DTYPE[gguf_type], base, show_written=False)
        with atomic_file(out) as gguf_tmp:
            write_gguf(merged, gguf_tmp, gguf_type, tokenizer_pre(recipe.model.name), name=run_dir.resolve().name)
            check = verify_gguf(merged, gguf_tmp, recipe.data.template)
            if check["top1_agreement"] < MIN_TOP1_AGREEMENT[gguf_type]:
                raise QadaptError(f"the GGUF read back disagrees with the merged model: {check}; nothing was written")
    print(describe_written(out))
    print(f"verified: read back by transformers, vs the merged model: max |Δlogit| {check['max_abs_diff']:.4g}  "
          f"mean {check['mean_abs_diff']:.4g}  top-1 agreement {check['top1_agreement']:.2%}")
    return check


def tokenizer_pre(model_name: str) -> str:
    """llama.cpp's pre-tokenizer name: the source GGUF's when the base came from one, else 'default'."""
    import gguf

    from qadapt.models import EMBEDDED_MODELS, embedded_model

    source = embedded_model(model_name) if model_name in EMBEDDED_MODELS else Path(model_name)
    if source.suffix != ".gguf" or not source.is_file():
        return "default"
    field = gguf.GGUFReader(source).get_field(gguf.Keys.Tokenizer.PRE)
    return field.contents() if field is not None else "default"


def write_gguf(folder: Path, out: Path, gguf_type: str, pre: str = "default", name: str | None = None) -> None:
    """Stream the HF folder's weights into a GGUF file, with its hyper-parameters and tokenizer."""
    import gguf
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    arch = GGUF_ARCHITECTURES[config["model_type"]]
    writer = gguf.GGUFWriter(out, arch)
    _add_hyperparameters(writer, config, name or folder.name, gguf_type)
    _add_tokenizer(writer, folder, config["vocab_size"], pre)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    files = sorted(folder.glob("*.safetensors"))
    plan = []  # (file, hf name, gguf name, GGML type), in writing order
    for file in files:
        with safe_open(file, "pt") as f:
            for key in f.keys():
                target = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if target is None:
                    raise QadaptError(f"{key}: no GGUF tensor name for it in the {arch} architecture")
                shape = f.get_slice(key).get_shape()
                qtype = _tensor_type(shape, gguf_type)
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
            tensor = f.get_tensor(key).to(torch.float32)
        writer.write_tensor_data(_to_gguf(key, tensor, qtype, config))
    writer.close()


def _tensor_type(shape: list[int], gguf_type: str):
    import gguf

    types = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return types.F32  # norms and biases stay exact, as llama.cpp keeps them
    wanted = {"f16": types.F16, "bf16": types.BF16, "q8_0": types.Q8_0}[gguf_type]
    if shape[-1] % gguf.GGML_QUANT_SIZES[wanted][0] != 0:
        return types.F16  # rows that do not split into q8_0 blocks
    return wanted


def _to_gguf(key: str, tensor: torch.Tensor, qtype, config: dict) -> np.ndarray:
    """One tensor, laid out and encoded as GGUF stores it."""
    import gguf

    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if key.endswith("q_proj.weight"):
        tensor = _interleave_rotary_halves(tensor, config["num_attention_heads"], head_dim)
    elif key.endswith("k_proj.weight"):
        tensor = _interleave_rotary_halves(tensor, config["num_key_value_heads"], head_dim)
    return gguf.quants.quantize(tensor.numpy(), qtype)


def _interleave_rotary_halves(weight: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Hugging Face rotates the two halves of each head (rotate_half); llama.cpp rotates adjacent pairs.

    Reorder each head's rows from [x0..x(d/2-1), y0..y(d/2-1)] to [x0, y0, x1, y1, ...].
    """
    return weight.reshape(heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(weight.shape)


def _add_hyperparameters(writer, config: dict, name: str, gguf_type: str) -> None:
    import gguf

    rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        raise QadaptError(f"rope scaling {rope['rope_type']!r} is not written to GGUF by qadapt; convert the merged "
                          "folder with llama.cpp's convert_hf_to_gguf.py")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads", config["num_attention_heads"]))
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


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


def verify_gguf(merged: Path, gguf_file: Path, template: str) -> dict:
    """Load the GGUF with transformers; compare tokenization and logits with the merged folder's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qadapt.export.merge import compare_logits, logits_on, probe_texts

    tokenizer = AutoTokenizer.from_pretrained(merged)
    read_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    texts = probe_texts(template, tokenizer)
    for text in texts:
        if tokenizer(text).input_ids != read_tokenizer(text).input_ids:
            raise QadaptError(f"the GGUF's tokenizer splits {text[:60]!r}... differently from the model's")
    if read_tokenizer.eos_token_id != tokenizer.eos_token_id:
        raise QadaptError(f"the GGUF's EOS is {read_tokenizer.eos_token_id}, the model's {tokenizer.eos_token_id}")
    reference = logits_on(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), tokenizer, texts)
    read_back = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    return compare_logits(reference, logits_on(read_back, tokenizer, texts))
