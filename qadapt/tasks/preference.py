"""The preference task: a causal LM that learns from pairs of answers to one prompt, one preferred (chosen) and
one not (rejected) (`task: preference`).

A pair's two sides are read and tokenized as the supervised path reads its records (qadapt.preference_pairs,
qadapt.data: the prompt template or the chat template, the loss mask on the answer), and a micro-batch holds
micro_batch_size pairs: their chosen sides, then their rejected sides. The loss (qadapt.tasks.preference_loss)
weighs each side's summed log-probability.

DPO and IPO compare with a reference: the model as training starts, so the base itself for a fresh adapter
(whose first output is the base's) and base + the starting adapter with `adapter.start_from`, the usual
SFT → DPO path. Its log-probabilities of every pair are computed once, before the first step, with one model in
memory, and kept in every checkpoint (Task.checkpoint_state): a resumed run does not recompute them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qadapt import data as data_lib
from qadapt.console import say
from qadapt.errors import QadaptError
from qadapt.tasks.base import StepSource, TrainingData, read_sources, split_rows, to_device
from qadapt.tasks.causal_lm import CausalLM
from qadapt.tasks.preference_loss import NEEDS_REFERENCE, PairScores, PreferenceLoss, preference_loss
from qadapt.tasks.token_logps import completion_token_logps


class Preference(CausalLM):
    name = "preference"
    bar_metrics = ("margin", "reward_accuracy")

    def training_data(self, recipe, tokenizer) -> TrainingData:
        d = recipe.data
        pairs = read_sources(d.sources, lambda source: _pairs(source, d.split, d.bad_rows))
        sides = {}
        for side in ("chosen", "rejected"):
            records = [{**pair[side], "where": pair["where"]} for pair in pairs]
            sides[side] = data_lib.tokenize(records, tokenizer, d.template, d.cutoff_len, False, d.train_on, d.bad_rows)
        rows_of = {side: dict(zip(t.kept, t.rows)) for side, t in sides.items()}
        rows, cut = [], []
        for index, pair in enumerate(pairs):
            missing = [side for side in ("chosen", "rejected") if index not in rows_of[side]]
            if missing and d.bad_rows == "fail":
                raise QadaptError(f"{pair['where']}: the {missing[0]} answer has no token left within data.cutoff_len "
                                  f"{d.cutoff_len} (data.bad_rows=skip drops such pairs)")
            if missing:
                cut.append(pair["where"])
                continue
            chosen, rejected = rows_of["chosen"][index], rows_of["rejected"][index]
            rows.append({"input_ids": chosen["input_ids"], "labels": chosen["labels"],
                         "rejected_input_ids": rejected["input_ids"], "rejected_labels": rejected["labels"]})
        if cut:
            say(f"data: skipped {len(cut)} pairs with a side cut to nothing at data.cutoff_len {d.cutoff_len} "
                f"({', '.join(cut[:3])}{', ...' if len(cut) > 3 else ''})")
        if not rows:
            raise QadaptError(f"no preference pairs left to train on in {', '.join(d.sources)}")
        truncated = sides["chosen"].truncated + sides["rejected"].truncated
        return split_rows(recipe, rows, None, f"preference pairs: {truncated} answers cut at {d.cutoff_len} tokens",
                          (truncated, len(cut)))

    def collate(self, rows: list[dict], pad_id: int) -> dict:
        return _pair_batch(rows, pad_id)

    def micro_batch_shape(self, recipe) -> tuple[int, int]:
        """Both sides of micro_batch_size pairs."""
        return 2 * recipe.train.micro_batch_size, recipe.data.cutoff_len

    def loss_settings(self, recipe) -> dict:
        return {"settings": recipe.preference}

    def summed_loss(self, model, batch: dict) -> torch.Tensor:
        settings = batch["settings"]
        result = preference_loss(_pair_scores(model, batch), kind=settings.loss, beta=settings.beta,
                                 label_smoothing=settings.label_smoothing, simpo_gamma=settings.simpo_gamma,
                                 sft_weight=settings.sft_weight)
        if torch.is_grad_enabled():
            batch["result"] = result  # not a tensor: the step's metrics read it
        return result.summed

    def loss_targets(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2

    def step_metrics(self, micro_batches: list[dict]) -> dict:
        results: list[PreferenceLoss] = [b["result"] for b in micro_batches if "result" in b]
        if not results:
            return {}
        chosen = torch.cat([r.chosen_rewards for r in results])
        rejected = torch.cat([r.rejected_rewards for r in results])
        # The answers' own log-probabilities per token tell whether the margin grew by the chosen rising or only
        # by the rejected falling (DPO's known failure on reasoning, which sft_weight counters).
        return {"reward_chosen": float(chosen.mean()), "reward_rejected": float(rejected.mean()),
                "margin": float((chosen - rejected).mean()), "reward_accuracy": float((chosen > rejected).float().mean()),
                "logp_chosen": float(torch.cat([r.chosen_logps for r in results]).mean()),
                "logp_rejected": float(torch.cat([r.rejected_logps for r in results]).mean())}

    def checkpoint_state(self, s: StepSource) -> dict:
        """The reference's log-probabilities of every pair (DPO, IPO), training and held out, so a resumed run
        does not recompute them with a model that has moved."""
        return dict(s.state.get("reference") or {})

    def restore_state(self, s: StepSource, saved: dict) -> None:
        """The reference's log-probabilities: from the checkpoint, or (a fresh run) computed now, before any step."""
        if s.recipe.preference.loss not in NEEDS_REFERENCE:
            s.state["reference"] = None
            return
        if "chosen" not in saved and s.step > 0:
            raise QadaptError("the checkpoint resumed from keeps no reference log-probabilities, and the model has "
                              "moved since training started: start the run again (--overwrite)")
        reference = saved if "chosen" in saved else _reference_logps(s)
        for prefix, rows in (("", s.train_rows), ("val_", s.val_rows)):
            none = torch.zeros(0, dtype=torch.float64)  # a checkpoint written before held-out pairs had none
            chosen, rejected = reference.get(prefix + "chosen", none), reference.get(prefix + "rejected", none)
            if len(chosen) != len(rows):
                raise QadaptError(f"the checkpoint's reference log-probabilities cover {len(chosen)} "
                                  f"{'held-out ' if prefix else ''}pairs, the data has {len(rows)}")
            for row, chosen_logp, rejected_logp in zip(rows, chosen.tolist(), rejected.tolist()):
                row["ref_chosen"], row["ref_rejected"] = chosen_logp, rejected_logp
        s.state["reference"] = reference


def _pair_batch(rows: list[dict], pad_id: int) -> dict:
    """The pairs' chosen sides, then their rejected sides, padded as one batch (and the reference's sums)."""
    sides = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows] + [
        {"input_ids": r["rejected_input_ids"], "labels": r["rejected_labels"]} for r in rows]
    batch = data_lib.collate(sides, pad_id)
    if "ref_chosen" in rows[0]:
        batch["ref_logps"] = torch.tensor([r["ref_chosen"] for r in rows] + [r["ref_rejected"] for r in rows],
                                          dtype=torch.float64)
    return batch


@dataclass
class _Sums:
    logps: torch.Tensor  # each sequence's summed log-probability of its trained tokens
    tokens: torch.Tensor  # and how many they are


def _sequence_sums(model, batch: dict) -> _Sums:
    logps = completion_token_logps(model, batch)
    mask = batch["labels"][:, 1:] != data_lib.IGNORE_INDEX
    return _Sums(logps.sum(dim=1), mask.sum(dim=1).to(logps.dtype))


def _pair_scores(model, batch: dict) -> PairScores:
    sums = _sequence_sums(model, batch)
    pairs = batch["input_ids"].shape[0] // 2
    ref = batch.get("ref_logps")
    return PairScores(sums.logps[:pairs], sums.logps[pairs:], sums.tokens[:pairs], sums.tokens[pairs:],
                      ref_chosen=None if ref is None else ref[:pairs].float(),
                      ref_rejected=None if ref is None else ref[pairs:].float())


@torch.no_grad()
def _reference_logps(s: StepSource) -> dict:
    """Every pair's summed log-probabilities under the model as it is now (before the first step), dropout off:
    `chosen` and `rejected` for the training pairs, `val_chosen` and `val_rejected` for the held-out ones."""
    model = s.accelerator.unwrap_model(s.model)
    size = s.recipe.train.micro_batch_size
    was_training = model.training
    model.eval()
    reference = {}
    try:
        for prefix, pairs in (("", s.train_rows), ("val_", s.val_rows)):
            chosen, rejected = [torch.zeros(0, dtype=torch.float64)], [torch.zeros(0, dtype=torch.float64)]
            for start in range(0, len(pairs), size):
                rows = pairs[start:start + size]
                batch = to_device(_pair_batch(rows, s.tokenizer.pad_token_id), s.accelerator.device)
                sums = _sequence_sums(model, batch).logps.double().cpu()
                chosen.append(sums[:len(rows)])
                rejected.append(sums[len(rows):])
            reference[prefix + "chosen"], reference[prefix + "rejected"] = torch.cat(chosen), torch.cat(rejected)
    finally:
        model.train(was_training)
    held_out = f" and {len(s.val_rows)} held out" if s.val_rows else ""
    say(f"reference: log-probabilities of {len(s.train_rows)} pairs{held_out} under the model as training starts")
    return reference


def _pairs(source: str, split: str, bad_rows: str) -> list[dict]:
    if source.startswith("builtin:"):
        raise QadaptError(f"{source} holds problems, not preference pairs; make pairs with qadapt rationales, or "
                          "give a file of {prompt, chosen, rejected} rows")
    return data_lib.load_examples(source, split, bad_rows, "pairs")
