"""Sampled decoding: the right distribution, reproducible, independent of the batch, one prefill per prompt."""

from __future__ import annotations

import pytest
import torch

from qadapt.decoding.generation import greedy_generate, sample_completions, sample_generate
from qadapt.decoding.sampling import Sampling, filtered_probabilities, row_generator, sample_tokens
from qadapt.errors import QadaptError
from test_generation import PROMPTS


def test_draws_follow_the_softmax_of_the_scaled_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    sampling = Sampling(temperature=0.7)
    draws = [int(sample_tokens(logits, sampling, [row_generator(0, 0, k)])) for k in range(4000)]
    counts = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    expected = torch.softmax(logits[0] / 0.7, -1)
    assert torch.allclose(counts, expected, atol=0.025)  # 4,000 draws: ~3.5 standard errors at worst


def test_top_k_and_top_p_keep_only_the_most_likely_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])  # probabilities ~0.03, 0.64, 0.09, 0.24
    probs, order = filtered_probabilities(logits, Sampling(top_k=2))
    assert order[0, :2].tolist() == [1, 3] and probs[0, 2:].sum() == 0
    probs, order = filtered_probabilities(logits, Sampling(top_p=0.8))  # 0.64 < 0.8: the second stays too
    assert (probs[0] > 0).sum() == 2 and probs[0].sum() == pytest.approx(1.0)
    probs, _ = filtered_probabilities(logits, Sampling(top_p=0.1))  # the most likely token always stays
    assert probs[0].tolist()[0] == pytest.approx(1.0)
    for wrong in [{"temperature": 0}, {"top_p": 0}, {"top_k": -1}, {"samples": 0}]:
        with pytest.raises(QadaptError, match=f"sampling: {next(iter(wrong))}"):
            Sampling(**wrong)


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    from qadapt.models import load_base
    from qadapt.recipe import ModelConfig

    # fp32: the logits of a row do not depend on the batch it is in, so neither do its draws.
    loaded = load_base(ModelConfig(name=str(tiny_llama_dir), quant="nf4", compute_dtype="fp32"))
    return loaded.eval()


def test_samples_are_reproducible_and_differ_from_one_another(model, smol_tokenizer):
    sampling = Sampling(temperature=1.0, samples=4, seed=7)
    first = sample_generate(model, smol_tokenizer, PROMPTS, sampling, max_new_tokens=10, batch_size=8)
    assert sample_generate(model, smol_tokenizer, PROMPTS, sampling, max_new_tokens=10, batch_size=8) == first
    assert [len(samples) for samples in first] == [4] * len(PROMPTS)
    assert all(len(set(samples)) > 1 for samples in first)  # a random model at temperature 1
    other_seed = sample_generate(model, smol_tokenizer, PROMPTS, Sampling(samples=4, seed=8), max_new_tokens=10,
                                 batch_size=8)
    assert other_seed != first


def test_a_prompts_samples_do_not_depend_on_its_batch(model, smol_tokenizer):
    sampling = Sampling(temperature=0.9, top_p=0.95, samples=3, seed=1)
    together = sample_generate(model, smol_tokenizer, PROMPTS, sampling, max_new_tokens=12, batch_size=7)
    for key in (0, 3):  # alone, one row at a time, with the key it had among the others
        alone = sample_generate(model, smol_tokenizer, [PROMPTS[key]], sampling, max_new_tokens=12, batch_size=1,
                                prompt_keys=[key])
        assert alone[0] == together[key]
    reordered = sample_generate(model, smol_tokenizer, PROMPTS[::-1], sampling, max_new_tokens=12, batch_size=4,
                                prompt_keys=list(range(len(PROMPTS)))[::-1])
    assert reordered[::-1] == together


def test_the_samples_of_a_prompt_share_one_prefill_and_top_k_1_is_greedy(model, smol_tokenizer):
    prefill_rows = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: prefill_rows.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[1] > 1 else None, with_kwargs=True)
    try:
        sampled = sample_generate(model, smol_tokenizer, PROMPTS, Sampling(top_k=1, samples=3), max_new_tokens=12,
                                  batch_size=15)
    finally:
        hook.remove()
    assert sum(prefill_rows) == len(PROMPTS)  # one prefill row per prompt, not per sample
    greedy = greedy_generate(model, smol_tokenizer, PROMPTS, max_new_tokens=12, batch_size=5)
    assert sampled == [[answer] * 3 for answer in greedy]  # the copied cache continues exactly as the original


def test_a_completion_keeps_the_token_ids_it_was_sampled_as(model, smol_tokenizer):
    """What learning from rewards trains on: the ids chosen, ending with the EOS that ended the row, if one did."""
    sampling = Sampling(temperature=1.0, samples=2, seed=3)
    completions = sample_completions(model, smol_tokenizer, PROMPTS, sampling, max_new_tokens=10, batch_size=8)
    assert [[c.text for c in row] for row in completions] == sample_generate(
        model, smol_tokenizer, PROMPTS, sampling, max_new_tokens=10, batch_size=8)
    for row in completions:
        for completion in row:
            assert len(completion.token_ids) == 10
            assert smol_tokenizer.decode(completion.token_ids, skip_special_tokens=True) == completion.text
    # Make the third token the first sample of the first prompt chose an EOS: that row ends there, with it.
    ended = completions[0][0].token_ids[2]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [ended]
    try:
        again = sample_completions(model, smol_tokenizer, PROMPTS[:1], sampling, max_new_tokens=10)
    finally:
        model.generation_config.eos_token_id = saved
    first = again[0][0]
    assert first.token_ids == completions[0][0].token_ids[:3]
    assert first.text == smol_tokenizer.decode(first.token_ids[:2], skip_special_tokens=True)
