"""Batched greedy decoding: padding must not change a single token."""

from __future__ import annotations

import pytest
import torch

from qadapt.decoding.generation import cut_at_stop, greedy_generate, sample_generate

PROMPTS = [
    "Maya has 5 apples.",
    "A much longer prompt about a shop that sells pencils in boxes of twelve, and a boy who buys three boxes.",
    "Hi",
    "Ravi shares 24 stickers among 4 friends. How many does each friend get?",
    "Two plus two",
]


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_batched_answers_equal_one_at_a_time(load_tiny, smol_tokenizer, quant):
    model = load_tiny(quant)
    model.eval()
    batched = greedy_generate(model, smol_tokenizer, PROMPTS, max_new_tokens=12, batch_size=4)
    alone = [greedy_generate(model, smol_tokenizer, [p], max_new_tokens=12, batch_size=1)[0] for p in PROMPTS]
    assert batched == alone
    assert all(batched)  # a random model never stops early: every row really decoded 12 tokens


def test_answers_equal_transformers_generate(load_tiny, smol_tokenizer):
    model = load_tiny("nf4")
    model.eval()
    # 150 tokens: the KV cache outgrows the room it leaves itself (64 columns at first) twice.
    ours = greedy_generate(model, smol_tokenizer, PROMPTS, max_new_tokens=150, batch_size=8)
    encoded = smol_tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        sequences = model.generate(**encoded, max_new_tokens=150, do_sample=False,
                                   pad_token_id=smol_tokenizer.pad_token_id)
    width = encoded["input_ids"].shape[1]
    theirs = [smol_tokenizer.decode(s[width:], skip_special_tokens=True) for s in sequences]
    assert ours == theirs


def test_a_stop_string_ends_the_row_and_is_cut(load_tiny, smol_tokenizer):
    model = load_tiny("none")
    model.eval()
    full = greedy_generate(model, smol_tokenizer, PROMPTS[:2], max_new_tokens=16, batch_size=2)
    stop = full[0][len(full[0]) // 2:][:3]  # a piece from the middle of the first answer
    stopped = greedy_generate(model, smol_tokenizer, PROMPTS[:2], max_new_tokens=16, batch_size=2,
                              stop_strings=[stop])
    assert stopped[0] == full[0][:full[0].find(stop)]
    assert stopped[1] == cut_at_stop(full[1], [stop])


def test_progress_reports_every_prompt(load_tiny, smol_tokenizer):
    model = load_tiny("none")
    done = []
    greedy_generate(model, smol_tokenizer, PROMPTS, max_new_tokens=2, batch_size=2, on_done=done.append)
    assert sum(done) == len(PROMPTS)


def test_prompts_joining_a_running_batch_decode_as_if_alone(load_tiny, smol_tokenizer):
    """Rows that end early (a stop string) make room; later prompts are prefilled and join mid-decode."""
    model = load_tiny("nf4")
    model.eval()
    free_run = [greedy_generate(model, smol_tokenizer, [p], max_new_tokens=14, batch_size=1)[0] for p in PROMPTS]
    stop = free_run[2][4:7]  # ends the third prompt's row early, and perhaps others
    alone = [greedy_generate(model, smol_tokenizer, [p], max_new_tokens=14, batch_size=1, stop_strings=[stop])[0]
             for p in PROMPTS]
    assert any(len(a) < len(f) for a, f in zip(alone, free_run))
    for batch_size in (2, 3):
        assert greedy_generate(model, smol_tokenizer, PROMPTS, max_new_tokens=14, batch_size=batch_size,
                               stop_strings=[stop]) == alone


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma4_text", "smollm3",
                                    "granite", "olmo2", "phi3", "lfm2", "qwen3_5_text", "qwen3_moe", "gpt_oss", "bloom",
                                    "gptj", "gpt_neox", "opt", "gpt2"])
def test_every_family_decodes_as_transformers_generate(tiny_family_dir, family):
    """80 tokens, so each family's attention reads a KV cache that has outgrown its first room (64 columns)."""
    from transformers import AutoModelForCausalLM, ByT5Tokenizer

    from qadapt.decoding.generation import eos_ids, regroupable

    tokenizer = ByT5Tokenizer()  # bytes: ids below the tiny models' 256, no files needed
    model = AutoModelForCausalLM.from_pretrained(tiny_family_dir(family)).eval()
    prompts = ["Maya has 5 apples.", "Two plus two", "A shop sells pencils in boxes of twelve."]
    ours = greedy_generate(model, tokenizer, prompts, max_new_tokens=80, batch_size=2)
    # A linear-attention state cannot be regrouped: such a model decodes one prompt at a time, unpadded.
    alone = not regroupable(model)
    batches = [[prompt] for prompt in prompts] if alone else [prompts]
    expected = []
    for batch in batches:
        encoded = tokenizer(batch, return_tensors="pt", padding=True, padding_side="left")
        with torch.no_grad():
            sequences = model.generate(**encoded, max_new_tokens=80, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos_ids(model, tokenizer)))
        width = encoded["input_ids"].shape[1]
        expected += [tokenizer.decode(s[width:], skip_special_tokens=True) for s in sequences]
    assert ours == expected
    assert alone == (family in ("qwen3_5_text", "lfm2"))


def test_a_cache_layer_reads_back_what_the_decoder_assigned_keys_first_then_values():
    """Joining batches assigns keys, then builds values from the layer: values must not see the keys' width."""
    from transformers import DynamicCache, LlamaConfig

    from qadapt.decoding.generation import _with_room

    config = LlamaConfig(hidden_size=8, num_attention_heads=1, num_key_value_heads=1, num_hidden_layers=1)
    layer = _with_room(DynamicCache(config=config)).layers[0]
    keys, values = torch.randn(2, 1, 3, 8), torch.randn(2, 1, 3, 8)
    layer.update(keys, values)  # 3 columns filled, room for more
    wider = torch.randn(2, 1, 5, 8)
    layer.keys = wider
    assert torch.equal(layer.values, values)  # still 3 columns, not 3 + 2 of the empty room
    layer.values = torch.cat([torch.zeros(2, 1, 2, 8), layer.values], dim=2)
    new_keys, new_values = torch.randn(2, 1, 1, 8), torch.randn(2, 1, 1, 8)
    all_keys, all_values = layer.update(new_keys, new_values)
    assert torch.equal(all_keys, torch.cat([wider, new_keys], dim=2))
    assert torch.equal(all_values[:, :, 2:5], values) and torch.equal(all_values[:, :, 5:], new_values)


@pytest.mark.slow
def test_the_calculator_writes_true_sums_and_the_model_goes_on_from_them(smol_tokenizer):
    """The embedded model continues "17 + 25 = 42, ..." with sums of its own and gets one wrong; with the
    calculator each of its sums is right, and the text equals the plain definition: decode one token at a
    time over the whole sequence (no cache, no batch), writing the calculator's tokens after each "=", and
    no digit right after them."""
    import re

    from qadapt.decoding.calculator import calculator_result
    from qadapt.models import load_base
    from qadapt.recipe import ModelConfig

    model = load_base(ModelConfig(quant="none", compute_dtype="fp32"))
    model.eval()
    prompts = ["Additions: 17 + 25 = 42, 38 + 47 = 85, 26 + 59 = 85,", PROMPTS[3]]
    plain = greedy_generate(model, smol_tokenizer, prompts, max_new_tokens=30, batch_size=2)
    calculated = greedy_generate(model, smol_tokenizer, prompts, max_new_tokens=30, batch_size=2,
                                 calculator=calculator_result)

    sums = re.findall(r"(\d+) \+ (\d+) = (\d+)", calculated[0])
    assert len(sums) >= 2 and all(int(a) + int(b) == int(c) for a, b, c in sums)
    assert any(int(a) + int(b) != int(c) for a, b, c in re.findall(r"(\d+) \+ (\d+) = (\d+)", plain[0]))
    assert calculated[1] == plain[1]  # a row with no sum in it decodes as without the calculator

    ids = smol_tokenizer(prompts[0])["input_ids"]
    digits = [i for i in range(len(smol_tokenizer)) if smol_tokenizer.decode([i])[:1].isdigit()]
    generated, forced, after_result = [], [], False
    with torch.no_grad():
        while len(generated) < 30:
            logits = model(torch.tensor([ids + generated])).logits[0, -1]
            if after_result:  # the model may not go on with the number the calculator wrote
                logits[digits] = float("-inf")
            after_result = len(forced) == 1
            token = forced.pop(0) if forced else int(logits.argmax())
            generated.append(token)
            if not forced and smol_tokenizer.decode([token]).endswith("="):
                result = calculator_result(smol_tokenizer.decode(generated))
                forced = smol_tokenizer(result, add_special_tokens=False)["input_ids"] if result else []
    assert calculated[0] == smol_tokenizer.decode(generated)


def test_a_state_the_decoder_cannot_regroup_is_refused_for_sampling_and_the_calculator(tiny_family_dir):
    """Qwen3.5 decodes one prompt at a time; what needs the batched decoder says why, in one line."""
    from transformers import AutoModelForCausalLM, ByT5Tokenizer

    from qadapt.decoding.sampling import Sampling
    from qadapt.errors import QadaptError

    model = AutoModelForCausalLM.from_pretrained(tiny_family_dir("qwen3_5_text")).eval()
    tokenizer = ByT5Tokenizer()
    with pytest.raises(QadaptError, match="sampling runs in qadapt's batched decoder, which cannot regroup "
                                          "qwen3_5_text's sequence state"):
        sample_generate(model, tokenizer, ["Two plus two"], Sampling(temperature=0.8, samples=2), max_new_tokens=4)
    with pytest.raises(QadaptError, match="the calculator needs qadapt's batched decoder"):
        greedy_generate(model, tokenizer, ["Two plus two"], max_new_tokens=4, calculator=lambda text: None)

