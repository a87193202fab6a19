"""The preference objectives (qadapt.tasks.preference_loss) against hand-computed values, and against TRL's own
implementations called on the same log-probabilities."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from qadapt.tasks.preference_loss import PairScores, preference_loss

BETA = 0.1


def pairs(seed: int = 0) -> PairScores:
    """Four pairs of answers of unequal lengths, with plausible summed log-probabilities."""
    generator = torch.Generator().manual_seed(seed)
    chosen_tokens = torch.tensor([5.0, 12.0, 3.0, 30.0])
    rejected_tokens = torch.tensor([9.0, 4.0, 3.0, 18.0])

    def sums(tokens):
        return -(torch.rand(4, generator=generator) * 1.5 + 0.2) * tokens

    return PairScores(sums(chosen_tokens), sums(rejected_tokens), chosen_tokens, rejected_tokens,
                      ref_chosen=sums(chosen_tokens), ref_rejected=sums(rejected_tokens))


def trl(module: str, cls: str, **settings):
    """A TRL trainer's loss method, bound to just the settings it reads (no model, no data)."""
    import importlib
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO and CPO live in trl.experimental since TRL 1.0
    pytest.importorskip("trl")

    trainer = getattr(importlib.import_module(module), cls)
    fields = SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), alpha=0.0, **settings)
    return trainer, fields


def test_each_loss_is_its_hand_computed_value_on_one_pair():
    even = PairScores(torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([2.0]), torch.tensor([3.0]),
                      ref_chosen=torch.tensor([-5.0]), ref_rejected=torch.tensor([-5.0]))
    # m = (−4 + 5) − (−6 + 5) = 2
    assert float(preference_loss(even, kind="dpo", beta=0.5).summed) == pytest.approx(math.log1p(math.exp(-1.0)))
    smoothed = 0.9 * math.log1p(math.exp(-1.0)) + 0.1 * math.log1p(math.exp(1.0))
    assert float(preference_loss(even, kind="dpo", beta=0.5, label_smoothing=0.1).summed) == pytest.approx(smoothed)
    # m̄ = 1/2 − (−1)/3 = 5/6; (5/6 − 1/(2·0.5))² = 1/36
    assert float(preference_loss(even, kind="ipo", beta=0.5).summed) == pytest.approx(1 / 36)
    # c̄ = −2, r̄ = −2: β·0 − γ
    assert float(preference_loss(even, kind="simpo", beta=2.0, simpo_gamma=0.5).summed) == pytest.approx(
        math.log1p(math.exp(0.5)))
    # ORPO: NLL 2 − β·log σ(log odds(−2) − log odds(−2)) = 2 + β·log 2
    assert float(preference_loss(even, kind="orpo", beta=0.1).summed) == pytest.approx(2 + 0.1 * math.log(2))
    loss = preference_loss(even, kind="dpo", beta=0.5)
    assert loss.chosen_rewards.tolist() == [0.5] and loss.rejected_rewards.tolist() == [-0.5] and loss.accuracy == 1.0
    assert loss.chosen_logps.tolist() == [-2.0] and loss.rejected_logps.tolist() == [-2.0]
    # RPO: DPO's loss plus α times the chosen answer's NLL per token, 4/2
    assert float(preference_loss(even, kind="dpo", beta=0.5, sft_weight=0.5).summed) == pytest.approx(
        math.log1p(math.exp(-1.0)) + 0.5 * 2)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_and_ipo_are_trls_on_the_same_log_probabilities(label_smoothing):
    # TRL computes DPOTrainer's losses inside its model pass; CPOTrainer.cpo_loss is the same formula on whatever
    # log-probabilities it is given, so it gets the log-ratios to the reference (and, for IPO, per token, as
    # DPOTrainer divides them).
    scores = pairs()
    chosen_ratio, rejected_ratio = scores.chosen - scores.ref_chosen, scores.rejected - scores.ref_rejected
    trainer, sigmoid = trl("trl.experimental.cpo.cpo_trainer", "CPOTrainer", beta=BETA, loss_type="sigmoid",
                           label_smoothing=label_smoothing, simpo_gamma=0.0)
    expected, chosen_rewards, rejected_rewards = trainer.cpo_loss(sigmoid, chosen_ratio, rejected_ratio)
    ours = preference_loss(scores, kind="dpo", beta=BETA, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours.summed, expected.sum())
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards)

    _, ipo = trl("trl.experimental.cpo.cpo_trainer", "CPOTrainer", beta=BETA, loss_type="ipo", label_smoothing=0.0,
                 simpo_gamma=0.0)
    expected, _, _ = trainer.cpo_loss(ipo, chosen_ratio / scores.chosen_tokens, rejected_ratio / scores.rejected_tokens)
    torch.testing.assert_close(preference_loss(scores, kind="ipo", beta=BETA).summed, expected.sum())


def test_simpo_is_trls_cpo_trainer_with_loss_type_simpo():
    scores = pairs(1)
    trainer, simpo = trl("trl.experimental.cpo.cpo_trainer", "CPOTrainer", beta=2.0, loss_type="simpo",
                         label_smoothing=0.1, simpo_gamma=0.7)
    means = scores.chosen / scores.chosen_tokens, scores.rejected / scores.rejected_tokens  # CPO averages for simpo
    expected, chosen_rewards, _ = trainer.cpo_loss(simpo, *means)
    ours = preference_loss(scores, kind="simpo", beta=2.0, label_smoothing=0.1, simpo_gamma=0.7)
    torch.testing.assert_close(ours.summed, expected.sum())
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards)


def test_orpo_is_trls_odds_ratio_term_plus_the_chosen_answers_own_loss():
    scores = pairs(2)
    trainer, orpo = trl("trl.experimental.orpo.orpo_trainer", "ORPOTrainer", beta=BETA)
    means = scores.chosen / scores.chosen_tokens, scores.rejected / scores.rejected_tokens  # ORPO averages too
    ratio_terms, chosen_rewards, rejected_rewards, _, _ = trainer.odds_ratio_loss(orpo, *means)
    # ORPOTrainer: loss = NLL − mean(β·log σ(log odds)); its NLL is the chosen tokens' mean, here each pair's.
    expected = (-means[0] - ratio_terms).sum()
    ours = preference_loss(scores, kind="orpo", beta=BETA)
    torch.testing.assert_close(ours.summed, expected)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards)


def test_a_loss_without_what_it_needs_is_refused():
    scores = pairs()
    scores.ref_chosen = None
    with pytest.raises(ValueError, match="dpo needs the reference's log-probabilities"):
        preference_loss(scores, kind="dpo", beta=BETA)
    with pytest.raises(ValueError, match="unknown preference loss 'kto'; choose one of dpo, ipo, orpo, simpo"):
        preference_loss(scores, kind="kto", beta=BETA)
    with pytest.raises(ValueError, match="orpo already holds the chosen answer's own loss"):
        preference_loss(pairs(), kind="orpo", beta=BETA, sft_weight=1.0)
