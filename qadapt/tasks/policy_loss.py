"""The policy-gradient objective of GRPO and its variants, over completions sampled from the policy itself.

For each prompt, G completions are sampled and rewarded; each completion's advantage is its reward against
its group's (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300):

    A_i    = r_i − mean(r_group)                 grpo: divided by std(r_group) + 1e-4; dr_grpo and dapo: not
    ρ_t    = exp(logπ_t − logπ_old,t)            the importance ratio (1 on the first pass over a rollout)
    loss_t = −min(ρ_t·A, clip(ρ_t, 1 − ε_low, 1 + ε_high)·A) + β·KL_t
    KL_t   = ρ_t · (exp(logπ_ref,t − logπ_t) − (logπ_ref,t − logπ_t) − 1)

KL_t is Schulman's k3 estimator (≥ 0) of the reverse KL to the reference, weighted by the importance ratio so
that its gradient is the reverse KL's without bias when the rollout came from an older policy (DeepSeek-V3.2,
arXiv 2512.02556; TRL's default); `kl_importance_weighted=False` leaves ρ_t out, as DeepSeekMath wrote it.

How the token losses become one number is what the variants differ in:

    grpo     each completion's mean over its tokens, then the mean over completions
    dr_grpo  the sum over every token / (completions × max_new_tokens): no length bias (Liu et al. 2025,
             arXiv 2503.20783)
    dapo     the sum over every token / the tokens in the batch; ε_high above ε_low (Yu et al. 2025,
             arXiv 2503.14476)

The loss is returned as a sum and the count it is to be divided by, so that the training loop adds the sums
and counts of a step's micro-batches (and processes) and divides once, as it does for supervised targets:
the step is then the one large batch's, whatever the micro-batches. TRL's GRPOTrainer computes the same
numbers (tests/test_policy_loss.py compares the two on the same model and tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

PolicyLossKind = Literal["grpo", "dr_grpo", "dapo"]
STD_EPSILON = 1e-4  # keeps a group with (nearly) one shared reward from dividing by zero, as TRL does


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool) -> torch.Tensor:
    """Each reward against its group's mean (and std): `rewards` holds the groups one after another."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.float().view(-1, group_size)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (groups.std(dim=1, keepdim=True) + STD_EPSILON)
    return advantages.reshape(-1)


@dataclass
class PolicyLoss:
    """A micro-batch's loss as `summed / count`, and what the step logs about it."""

    summed: torch.Tensor  # the loss summed over this micro-batch's share (differentiable)
    count: float  # what the step's sums are divided by: completions (grpo, dr_grpo) or tokens (dapo)
    clipped_tokens: int  # tokens the clip held: ρ < 1 − ε_low with A < 0, or ρ > 1 + ε_high with A > 0
    tokens: int
    kl_summed: float  # Σ KL_t over the completion tokens (0 without a reference)


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                kind: PolicyLossKind, epsilon_low: float, epsilon_high: float, beta: float = 0.0,
                ref_logps: torch.Tensor | None = None, max_new_tokens: int | None = None,
                kl_importance_weighted: bool = True) -> PolicyLoss:
    """The clipped surrogate (with its KL term) of completions: `logps`, `old_logps`, `ref_logps` and `mask`
    are (completions, tokens), the log-probabilities of the sampled tokens under the policy now, under the
    policy that sampled them, and under the reference; `advantages` is one per completion."""
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    advantage = advantages.to(logps.dtype).unsqueeze(1)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    token_loss = -torch.min(ratio * advantage, clipped_ratio * advantage)
    kl = torch.zeros_like(logps)
    if beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference policy's log-probabilities")
        gap = ref_logps - logps
        kl = torch.exp(gap) - gap - 1
        if kl_importance_weighted:
            kl = kl * ratio
        token_loss = token_loss + beta * kl
    masked = token_loss * mask
    completions = logps.shape[0]
    if kind == "grpo":
        summed, count = (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum(), completions
    elif kind == "dr_grpo":
        if max_new_tokens is None:
            raise ValueError("dr_grpo divides by max_new_tokens: give it")
        summed, count = masked.sum() / max_new_tokens, completions
    elif kind == "dapo":
        summed, count = masked.sum(), float(mask.sum())
    else:
        raise ValueError(f"unknown policy loss {kind!r}; choose one of grpo, dr_grpo, dapo")
    held = ((ratio < 1 - epsilon_low) & (advantage < 0)) | ((ratio > 1 + epsilon_high) & (advantage > 0))
    return PolicyLoss(summed=summed, count=count, clipped_tokens=int((held * mask.bool()).sum()),
                      tokens=int(mask.sum()), kl_summed=float((kl.detach() * mask).sum()))


def completion_logps(logits: torch.Tensor, completion_ids: torch.Tensor) -> torch.Tensor:
    """log π(token) of each completion token, from the logits at the positions that predict them:
    `logits` (completions, tokens, vocab) where position t predicts `completion_ids[:, t]`."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
