"""llama.cpp itself, through llama-cpp-python (the optional `qadapt[llamacpp]` extra): K-quants, and the check
that a GGUF runs there as the merged model runs in transformers.

Without the extra, `installed()` is False and what needs it says how to get it.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch

from qadapt.errors import QadaptError

K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
INSTALL_HINT = ("pip install 'qadapt[llamacpp]' (llama-cpp-python, which builds llama.cpp from source: "
                "a few minutes and a C++ compiler)")


def installed() -> bool:
    try:
        require("")
    except QadaptError:
        return False
    return True


def require(what: str):
    try:
        import llama_cpp
    except ImportError:
        raise QadaptError(f"{what} needs llama.cpp: {INSTALL_HINT}") from None
    return llama_cpp


def quantize(source: Path, out: Path, gguf_type: str) -> None:
    """llama.cpp's own quantizer (its per-tensor mix, e.g. Q4_K_M keeps some ffn_down / attn_v in Q6_K)."""
    llama_cpp = require(f"--type {gguf_type}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}")
    params.nthread = torch.get_num_threads()
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise QadaptError(f"llama.cpp could not quantize {source} to {gguf_type}")


def run_side_by_side(merged: Path, gguf_file: Path, texts: list[str], prompts: list[str] | None = None,
                     tokens: int = 32, lora: Path | None = None) -> list[dict]:
    """Each text read by the merged model in transformers and by the GGUF in llama.cpp, per text:
    whether they tokenize it alike, top-1 agreement and mean |Δlogit| at every position, and whether the
    greedy reply to its prompt (`prompts`, one per text; default: the text) is the same: up to `tokens`
    tokens, to the model's first EOS included (past it, a reply is noise that any rounding reorders).
    `lora`: an adapter GGUF llama.cpp applies."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llama_cpp = require("running the GGUF")
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    longest = max(len(tokenizer(text).input_ids) for text in texts)
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=longest + tokens + 8, logits_all=True, verbose=False,
                          n_threads=torch.get_num_threads(), lora_path=str(lora) if lora else None)
    ends = model.generation_config.eos_token_id
    ends = set(ends if isinstance(ends, list) else [ends, tokenizer.eos_token_id])
    try:
        return [_side_by_side(model, tokenizer, llm, text, prompt, tokens, ends)
                for text, prompt in zip(texts, prompts or texts)]
    finally:
        llm.close()


@torch.no_grad()
def _side_by_side(model, tokenizer, llm, text: str, prompt: str, tokens: int, ends: set[int]) -> dict:
    ids = tokenizer(text, return_tensors="pt").input_ids
    reference = model(input_ids=ids).logits[0].numpy()
    from qadapt.decoding.generation import cache_keyword

    name = cache_keyword(model)  # the model's own cache (a hybrid family has its own kind) is passed back
    out = model(input_ids=tokenizer(prompt, return_tensors="pt").input_ids, use_cache=True)
    expected = []
    while len(expected) < tokens and not ends.intersection(expected[-1:]):
        expected.append(int(out.logits[0, -1].argmax()))
        out = model(input_ids=torch.tensor([expected[-1:]]), use_cache=True, **{name: getattr(out, name)})
    cpp_ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)  # add_bos: as the vocab says
    row = {"text": text[:60], "same_tokenization": cpp_ids == ids[0].tolist()}
    if not row["same_tokenization"]:
        return row
    llm.reset()
    llm.eval(cpp_ids)
    logits = np.array(llm.scores[:len(cpp_ids)])
    llm.reset()
    llm.eval(llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))
    greedy = []
    while len(greedy) < len(expected):
        greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([greedy[-1]])
    return {**row, "top1_agreement": float((reference.argmax(-1) == logits.argmax(-1)).mean()),
            "mean_abs_diff": float(np.abs(reference - logits).mean()),
            "same_greedy_replies": greedy == expected,
            "reply_tokens": len(expected),
            "greedy_tokens_alike": next((i for i, (a, b) in enumerate(zip(expected, greedy)) if a != b), len(expected))}


def summary(rows: list[dict]) -> dict:
    """The rows as one line of figures (agreement over the texts both sides tokenized alike)."""
    alike = [row for row in rows if row["same_tokenization"]]
    return {"texts": len(rows), "same_tokenization": len(alike),
            "same_greedy_replies": sum(row["same_greedy_replies"] for row in alike),
            "top1_agreement": round(float(np.mean([row["top1_agreement"] for row in alike])), 4) if alike else 0.0,
            "mean_abs_diff": round(float(np.mean([row["mean_abs_diff"] for row in alike])), 4) if alike else None}
