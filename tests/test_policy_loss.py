"""GRPO's advantages and policy losses (qadapt.tasks.policy_loss): against values worked by hand, and against
TRL's GRPOTrainer computing the same loss on the same model and tensors."""

from __future__ import annotations

import math

import pytest
import torch

from qadapt.tasks.policy_loss import completion_logps, group_advantages, policy_loss


def test_advantages_are_each_reward_against_its_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt(1 / 3)  # the first group's sample std: mean 0.5, squared gaps 0.25 each, / (4 - 1)
    scaled = group_advantages(rewards, 4, scale_by_std=True)
    a = 0.5 / (std + 1e-4)
    assert scaled.tolist() == pytest.approx([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    assert group_advantages(rewards, 4, scale_by_std=False).tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="7 rewards do not split into groups of 4"):
        group_advantages(rewards[:7], 4, scale_by_std=True)


def test_the_clipped_surrogate_and_its_normalisations_by_hand():
    # Two completions of up to 3 tokens; the second has 2. Ratios: e^0.5 = 1.65 (above 1 + 0.28), 1, e^-0.5 = 0.61.
    logps = torch.tensor([[0.5, 0.0, -0.5], [0.5, 0.0, 0.0]])
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages = torch.tensor([1.0, -2.0])
    r = math.exp(0.5)
    # A > 0: min(ρA, clip(ρ)A) takes 1.28 for ρ = 1.65, 1 for 1, 0.61 for 0.61 (the clip keeps the lower one).
    first = [-1.28, -1.0, -math.exp(-0.5)]
    # A < 0: min(ρA, clip(ρ)A) = the more negative: ρ = 1.65 gives −2ρ; 1 gives −2.
    second = [2 * r, 2.0]
    by_kind = {
        "grpo": ((sum(first) / 3 + sum(second) / 2), 2),
        "dr_grpo": ((sum(first) + sum(second)) / 4, 2),
        "dapo": (sum(first) + sum(second), 5),
    }
    for kind, (summed, count) in by_kind.items():
        loss = policy_loss(logps, old, advantages, mask, kind=kind, epsilon_low=0.2, epsilon_high=0.28,
                           max_new_tokens=4)
        assert float(loss.summed) == pytest.approx(summed, rel=1e-6) and loss.count == count, kind
        assert loss.clipped_tokens == 1 and loss.tokens == 5 and loss.kl_summed == 0  # only ρ = 1.65 with A > 0


def test_the_kl_term_is_k3_weighted_by_the_ratio_unless_asked_not_to():
    logps, old, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.2]]), torch.tensor([[-1.5]])
    gap = -0.5
    k3 = math.exp(gap) - gap - 1
    for weighted, kl in ((True, math.exp(0.2) * k3), (False, k3)):
        loss = policy_loss(logps, old, torch.tensor([0.0]), torch.ones(1, 1), kind="dapo", epsilon_low=0.2,
                           epsilon_high=0.2, beta=0.1, ref_logps=ref, kl_importance_weighted=weighted)
        assert float(loss.summed) == pytest.approx(0.1 * kl) and loss.kl_summed == pytest.approx(kl)


def test_what_a_loss_needs_is_asked_for():
    one = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="beta > 0 needs the reference"):
        policy_loss(one, one, torch.zeros(1), one, kind="grpo", epsilon_low=0.2, epsilon_high=0.2, beta=0.1)
    with pytest.raises(ValueError, match="dr_grpo divides by max_new_tokens"):
        policy_loss(one, one, torch.zeros(1), one, kind="dr_grpo", epsilon_low=0.2, epsilon_high=0.2)
    with pytest.raises(ValueError, match="unknown policy loss 'ppo'; choose one of grpo, dr_grpo, dapo"):
        policy_loss(one, one, torch.zeros(1), one, kind="ppo", epsilon_low=0.2, epsilon_high=0.2)


@pytest.fixture(scope="module")
def trl_trainer(tiny_llama_dir, smol_tokenizer, tmp_path_factory):
    """TRL's GRPOTrainer on the tiny LLaMA (fp32, CPU): its `_compute_loss` is the reference."""
    pytest.importorskip("trl", reason="TRL is a test dependency: pip install -e '.[test]'")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, epsilon=0.2, epsilon_high=0.28, beta=0.1, report_to=[],
                      use_cpu=True, bf16=False, save_strategy="no")
    return GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                       train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}), processing_class=smol_tokenizer)


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta, weighted", [(0.0, True), (0.1, True), (0.1, False)])
def test_each_loss_is_trls_on_the_same_model_and_tensors(trl_trainer, kind, beta, weighted):
    """Left-padded prompts, completions of unequal length, a rollout from an older policy (ratios away from 1,
    some clipped) and a reference: the loss, every gradient, the clipped share and the KL agree with TRL's."""
    model = trl_trainer.model
    trl_trainer.loss_type, trl_trainer.beta = kind, beta
    trl_trainer.args.use_bias_correction_kl = weighted
    generator = torch.Generator().manual_seed(1)
    count, prompt_len, new_tokens = 4, 5, 6
    prompt_ids = torch.randint(5, 1000, (count, prompt_len), generator=generator)
    prompt_mask = torch.ones(count, prompt_len, dtype=torch.long)
    prompt_mask[0, :2] = 0
    completion_ids = torch.randint(5, 1000, (count, new_tokens), generator=generator)
    completion_mask = torch.ones(count, new_tokens, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[3, 2:] = 0
    ids, attention = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)

    def our_logps():
        return completion_logps(model(input_ids=ids, attention_mask=attention).logits[:, prompt_len - 1:-1],
                                completion_ids)

    with torch.no_grad():
        now = our_logps()
    old = now + 0.3 * torch.randn(now.shape, generator=generator)
    ref = now + 0.2 * torch.randn(now.shape, generator=generator)
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, scale_by_std=True)

    model.zero_grad()
    trl_trainer._metrics["eval"].clear()
    reference = trl_trainer._compute_loss(model, {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old,
        "ref_per_token_logps": ref, "num_items_in_batch": completion_mask.sum()})
    reference.backward()
    reference_grads = [p.grad.clone() for p in model.parameters()]
    metrics = trl_trainer._metrics["eval"]

    model.zero_grad()
    ours = policy_loss(our_logps(), old, advantages, completion_mask, kind=kind, epsilon_low=0.2, epsilon_high=0.28,
                       beta=beta, ref_logps=ref, max_new_tokens=new_tokens, kl_importance_weighted=weighted)
    loss = ours.summed / ours.count
    loss.backward()
    # Terms of ~1 cancel to a loss of ~0.03: the two sums' orders round apart by ~1e-7 of the terms.
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), abs=1e-6)
    for ours_grad, reference_grad in zip((p.grad for p in model.parameters()), reference_grads):
        torch.testing.assert_close(ours_grad, reference_grad, rtol=1e-5, atol=1e-6)
    assert ours.clipped_tokens / ours.tokens == pytest.approx(metrics["clip_ratio/region_mean"][-1])
    assert 0 < ours.clipped_tokens < ours.tokens
    if beta:
        assert ours.kl_summed / ours.tokens == pytest.approx(metrics["kl"][-1], rel=1e-5)
