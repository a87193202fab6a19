"""The objectives of learning from preference pairs: for each prompt an answer preferred (chosen) and one not
(rejected), scored by their log-probabilities under the policy (and, for DPO and IPO, under a reference).

With c, r the chosen and rejected answers' summed log-probabilities, c̄, r̄ their means per token, and ref_
the reference's, each pair's loss is

    dpo    −(1 − ε)·log σ(β·m) − ε·log σ(−β·m),   m = (c − ref_c) − (r − ref_r)
           (Rafailov et al. 2023; ε: label smoothing, the conservative DPO of Mitchell 2023)
    ipo    (m̄ − 1/(2β))²,   m̄ = (c − ref_c)/|c| − (r − ref_r)/|r|
           (Azar et al. 2023; per token, as TRL and the paper's authors compute it)
    orpo   NLL(chosen) − β·log σ(log odds(c̄) − log odds(r̄)),   odds(p) = p / (1 − p)
           (Hong et al. 2024: no reference; the chosen answer's own SFT loss is part of it)
    simpo  −(1 − ε)·log σ(β·(c̄ − r̄) − γ) − ε·log σ(−(β·(c̄ − r̄) − γ))
           (Meng et al. 2024: no reference, length-normalised, a target margin γ)

With sft_weight α > 0, α·NLL(chosen), the chosen answer's own loss (mean per token), is added to a dpo, ipo or
simpo pair's loss: RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"), which found DPO alone
lowering the chosen answers' likelihood on math. TRL's DPOTrainer has it as loss_type [sigmoid, sft] with
loss_weights [1, α], though its NLL is a mean over the batch's tokens rather than each pair's.

The implicit rewards logged beside the loss are β·(c − ref_c) and β·(r − ref_r) (β·c̄ and β·r̄ without a
reference). TRL implements the same objectives (DPOTrainer, ORPOTrainer, CPOTrainer with loss_type simpo);
tests/test_preference_loss.py compares them on the same log-probabilities.

Like qadapt.tasks.policy_loss, the loss comes back as a sum over the pairs and the count it is divided by,
so that micro-batches and processes add up to the one large batch's mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

PreferenceLossKind = Literal["dpo", "ipo", "orpo", "simpo"]
NEEDS_REFERENCE = frozenset({"dpo", "ipo"})


@dataclass
class PairScores:
    """Log-probabilities of a batch of pairs, one value per pair (tensors of shape (pairs,))."""

    chosen: torch.Tensor  # summed over the chosen answer's tokens
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor  # how many tokens each answer has
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None  # the reference's sums (dpo, ipo)
    ref_rejected: torch.Tensor | None = None


@dataclass
class PreferenceLoss:
    """A micro-batch's loss as `summed / count`, and what the step logs about it."""

    summed: torch.Tensor  # differentiable
    count: int  # pairs
    chosen_rewards: torch.Tensor  # each pair's implicit reward of the chosen answer (detached)
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor  # each pair's chosen answer's mean log-probability per token (detached)
    rejected_logps: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> float:
        """The share of pairs whose chosen answer has the higher implicit reward."""
        return float((self.margins > 0).float().mean())


def preference_loss(scores: PairScores, *, kind: PreferenceLossKind, beta: float, label_smoothing: float = 0.0,
                    simpo_gamma: float = 0.5, sft_weight: float = 0.0) -> PreferenceLoss:
    """Each pair's loss (module docstring), summed."""
    chosen, rejected = scores.chosen.float(), scores.rejected.float()
    chosen_mean = chosen / scores.chosen_tokens.clamp(min=1)
    rejected_mean = rejected / scores.rejected_tokens.clamp(min=1)
    if kind in NEEDS_REFERENCE:
        if scores.ref_chosen is None or scores.ref_rejected is None:
            raise ValueError(f"{kind} needs the reference's log-probabilities")
        chosen_ratio = chosen - scores.ref_chosen.float()
        rejected_ratio = rejected - scores.ref_rejected.float()
        chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
        if kind == "dpo":
            losses = _smoothed_sigmoid_loss(beta * (chosen_ratio - rejected_ratio), label_smoothing)
        else:
            margin = chosen_ratio / scores.chosen_tokens.clamp(min=1) - rejected_ratio / scores.rejected_tokens.clamp(min=1)
            losses = (margin - 1 / (2 * beta)) ** 2
    elif kind == "orpo":
        log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
        losses = -chosen_mean - beta * F.logsigmoid(log_odds)
        chosen_rewards, rejected_rewards = beta * chosen_mean, beta * rejected_mean
    elif kind == "simpo":
        losses = _smoothed_sigmoid_loss(beta * (chosen_mean - rejected_mean) - simpo_gamma, label_smoothing)
        chosen_rewards, rejected_rewards = beta * chosen_mean, beta * rejected_mean
    else:
        raise ValueError(f"unknown preference loss {kind!r}; choose one of dpo, ipo, orpo, simpo")
    if sft_weight:
        if kind == "orpo":
            raise ValueError("orpo already holds the chosen answer's own loss; sft_weight applies to dpo, ipo, simpo")
        losses = losses - sft_weight * chosen_mean
    return PreferenceLoss(summed=losses.sum(), count=int(chosen.numel()),
                          chosen_rewards=chosen_rewards.detach(), rejected_rewards=rejected_rewards.detach(),
                          chosen_logps=chosen_mean.detach(), rejected_logps=rejected_mean.detach())


def _smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """−log σ(x), with a share ε of the pairs' labels taken as flipped."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, computed stably on both sides of log 2 (Mächler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
