"""The GRPO task: a causal LM that learns from rewards on answers it samples itself (`task: grpo`).

Each optimizer step takes train.micro_batch_size × train.grad_accum problems (per process) from the run's math
data, in the run's seeded order, and for each:
1. samples grpo.group_size completions with the adapters on and no gradient (qadapt.decoding: every sample's
   random stream is seeded by the run's seed, the step and the sample's place in it, so a resumed run samples
   what the uninterrupted one did);
2. rewards them (qadapt.tasks.rewards) and compares each reward with its group's (the advantage); with
   grpo.sampling_rounds > 1 (DAPO's dynamic sampling), groups whose completions all earned one reward are
   replaced by fresh problems' groups, sampled in further rounds;
3. with grpo.beta > 0, scores the sampled tokens under the reference policy: the same quantized base with the
   adapters switched off, so there is no second model;
4. trains on the sampled tokens with qadapt.tasks.policy_loss's objective, for grpo.iterations optimizer steps
   (μ): the later ones reuse the rollout, their importance ratios to the sampling policy clipped. A checkpoint
   taken between them keeps the rollout (Task.checkpoint_state), so a resumed run takes the same steps.

A micro-batch holds the micro_batch_size problems' completions. Scoring, merging and export are the causal LM's;
a run's metrics.jsonl also gets the step's rewards, sample accuracy, completion length, KL, clipped share and
generation time.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, fields

import torch

from qadapt import data as data_lib
from qadapt.console import say
from qadapt.errors import QadaptError
from qadapt.tasks import rewards as rewards_lib
from qadapt.tasks.base import StepSource, TrainingData, read_sources, to_device
from qadapt.tasks.causal_lm import CausalLM
from qadapt.tasks.math_sets import load_eval_set, stop_strings
from qadapt.tasks.policy_loss import PolicyLoss, group_advantages, policy_loss
from qadapt.tasks.token_logps import completion_token_logps
from qadapt.text_templates import is_text_template

SILENT_STEPS = 20  # steps a reward may give nothing but 0 before the run warns about it


class GRPO(CausalLM):
    name = "grpo"
    bar_metrics = ("reward",)

    def training_data(self, recipe, tokenizer) -> TrainingData:
        """The problems, each as its prompt's tokens (nothing of it trained) and its gold answer; the rewards
        are imported now, so a wrong module or function stops the run before the model loads."""
        from qadapt.data import prompt_text

        rewards_of(recipe)
        d = recipe.data
        eval_sets = {s.name: s.records for s in (load_eval_set(spec) for spec in recipe.eval.sets)}
        problems = read_sources(d.sources, lambda source: _problems(source, d.split))
        read = len(problems)
        if eval_sets:
            kept = data_lib.eval_overlap([p["record"] for p in problems], eval_sets, d.exclude_eval_overlap)
            kept_ids = {id(record) for record in kept}
            problems = [p for p in problems if id(p["record"]) in kept_ids]
        rows, cut = [], 0
        for problem in problems:
            prompt = prompt_text(problem["record"], d.template, tokenizer)
            ids = tokenizer(prompt, add_special_tokens=is_text_template(d.template))["input_ids"]
            if len(ids) > d.cutoff_len:
                cut += 1
                continue
            rows.append({"input_ids": ids, "labels": [data_lib.IGNORE_INDEX] * len(ids), "prompt": prompt,
                         "answer": problem["gold"], "multiple_choice": problem["multiple_choice"]})
        if d.max_examples:
            rows = rows[:d.max_examples]
        if not rows:
            raise QadaptError(f"no problems left to train on in {', '.join(d.sources)}: of {read}, {cut} have prompts "
                              f"over data.cutoff_len {d.cutoff_len} and {read - len(problems)} are in eval.sets "
                              "(data.exclude_eval_overlap)")
        say(f"data: {len(rows)} problems to sample answers to ({cut} with prompts over data.cutoff_len "
            f"{d.cutoff_len} left out); {recipe.grpo.group_size} completions each")
        return TrainingData(rows, [], None, cut=cut)

    def step_batches(self, s: StepSource, size: int, count: int, order, group_by_length: bool = False) -> list[dict]:
        """This process's share of the step's groups, one micro-batch per `size` problems with all their
        completions: sampled, rewarded and scored now, or, on the later passes of grpo.iterations, the last
        rollout's again."""
        g = s.recipe.grpo
        batches = s.state.get("rollout")
        if batches and s.step % g.iterations:
            batches[0]["rollout"].start_pass()
            return batches
        batches = self._rollout(s, size, count, order)
        s.state["rollout"] = batches if g.iterations > 1 else None
        return batches

    def _rollout(self, s: StepSource, size: int, count: int, order) -> list[dict]:
        acc, g = s.accelerator, s.recipe.grpo
        share = size * count
        if "rewards" not in s.state:  # imported once a run (training_data checked them before the model loaded)
            s.state["rewards"] = rewards_of(s.recipe)
        model = acc.unwrap_model(s.model)
        started = time.perf_counter()
        sampled: list[Group] = []
        for round_ in range(g.rounds()):
            # Every process draws the round's problems of all processes, so the order stays the same for all.
            step_rows = [next(order) for _ in range(share * acc.num_processes)]
            first = (round_ * acc.num_processes + acc.process_index) * share
            mine = step_rows[acc.process_index * share:(acc.process_index + 1) * share]
            completions = _sample(model, s, [s.train_rows[i]["prompt"] for i in mine], range(first, first + share))
            sampled += _rewarded_groups(s, mine, completions)
            varied = sum(not group.uniform for group in sampled)
            if round_ + 1 < g.rounds() and not _any_process(acc, varied < share):
                break
        generate_s = time.perf_counter() - started
        # One round: the groups as sampled. Several (DAPO's dynamic sampling): those that differ first.
        groups = sampled if g.rounds() == 1 else sorted(sampled, key=lambda group: group.uniform)[:share]
        each = {name: [x for group in sampled for x in group.each[name]] for name in sampled[0].each}
        _warn_of_silent_rewards(s, each)
        step = StepRollout(
            g, rewards=[r for group in sampled for r in group.rewards], each=each,
            correct=[x for group in sampled for x in group.correct],
            lengths=[len(c.token_ids) for group in sampled for c in group.completions],
            uniform_groups=sum(group.uniform for group in groups), groups_sampled=len(sampled), generate_s=generate_s)
        return _micro_batches(s, model, groups, step, size)

    def micro_batch_shape(self, recipe) -> tuple[int, int]:
        """Every completion of micro_batch_size problems: a prompt (up to data.cutoff_len) and its answer."""
        g = recipe.grpo
        return recipe.train.micro_batch_size * g.group_size, recipe.data.cutoff_len + g.max_new_tokens

    def summed_loss(self, model, batch: dict) -> torch.Tensor:
        g = batch["rollout"].settings
        logps = completion_token_logps(model, batch, g.temperature)
        mask = _completion_mask(batch)
        old_logps = batch.get("old_logps")
        if old_logps is None:
            # The first pass over a rollout: the policy trained is the one that sampled (ratio 1, nothing clipped),
            # and the later passes' ratios are to these log-probabilities (no extra forward pass to get them).
            old_logps = logps.detach()
            if g.iterations > 1 and torch.is_grad_enabled():
                batch["old_logps"] = old_logps
        result = policy_loss(logps, old_logps, batch["advantages"], mask, kind=g.loss, epsilon_low=g.epsilon,
                             epsilon_high=g.epsilon if g.epsilon_high is None else g.epsilon_high, beta=g.beta,
                             ref_logps=batch.get("ref_logps"), max_new_tokens=g.max_new_tokens)
        if torch.is_grad_enabled():
            batch["rollout"].add(result)
        return result.summed

    def loss_targets(self, batch: dict) -> int:
        """Completions (grpo, dr_grpo) or completion tokens (dapo): what the step's summed loss is divided by."""
        if batch["rollout"].settings.loss == "dapo":
            return int(_completion_mask(batch).sum())
        return batch["input_ids"].shape[0]

    def step_metrics(self, micro_batches: list[dict]) -> dict:
        return micro_batches[0]["rollout"].metrics() if micro_batches else {}

    def checkpoint_state(self, s: StepSource) -> dict:
        """The silent rewards' counts, and the rollout while grpo.iterations has passes left over it."""
        state = {"silent_steps": dict(s.state.get("silent_steps", {}))}
        batches = s.state.get("rollout")
        if batches and (s.step + 1) % s.recipe.grpo.iterations:
            state["rollout"] = {"batches": [{key: value.cpu() for key, value in batch.items() if key != "rollout"}
                                            for batch in batches],
                                "step": batches[0]["rollout"].saved()}
        return state

    def restore_state(self, s: StepSource, saved: dict) -> None:
        s.state["silent_steps"] = dict(saved.get("silent_steps", {}))
        if "rollout" in saved:
            step = StepRollout(s.recipe.grpo, **saved["rollout"]["step"])
            s.state["rollout"] = [{**to_device(batch, s.accelerator.device), "rollout": step}
                                  for batch in saved["rollout"]["batches"]]


@dataclass
class Group:
    """One problem's sampled completions and their rewards."""

    row: int  # the problem's index in the training rows
    completions: list  # qadapt.decoding.generation.Decoded
    rewards: list[float]  # each completion's total
    each: dict[str, list[float]]  # each reward's own scores
    correct: list[float]  # each completion's answer checked (whatever the rewards)

    @property
    def uniform(self) -> bool:
        """Every completion earned the same: no advantage, nothing to learn from the group."""
        return len(set(self.rewards)) == 1


@dataclass
class StepRollout:
    """What a step sampled and how it was rewarded, and what its loss found on the current pass over it (KL,
    clipping): the step's metrics."""

    settings: object  # the recipe's grpo section
    rewards: list[float]  # each sampled completion's total (every round's)
    each: dict[str, list[float]]  # each reward's own scores
    correct: list[float]  # each completion's answer checked (whatever the rewards)
    lengths: list[int]  # each completion's tokens
    uniform_groups: int  # trained groups whose completions all earned the same: nothing to learn from them
    groups_sampled: int  # more than the step's problems when dynamic sampling refilled
    generate_s: float
    passes: int = 1  # optimizer steps taken over this rollout, this one included
    tokens: int = 0
    kl_summed: float = 0.0
    clipped_tokens: int = 0

    def add(self, loss: PolicyLoss) -> None:
        self.tokens += loss.tokens
        self.kl_summed += loss.kl_summed
        self.clipped_tokens += loss.clipped_tokens

    def start_pass(self) -> None:
        self.passes += 1
        self.tokens, self.kl_summed, self.clipped_tokens = 0, 0.0, 0

    def saved(self) -> dict:
        """Every field but the settings (the recipe has them): numbers, strings and lists, for a checkpoint."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "settings"}

    def metrics(self) -> dict:
        rewards = torch.tensor(self.rewards)
        row = {"reward": float(rewards.mean()), "reward_std": float(rewards.std()) if len(self.rewards) > 1 else 0.0,
               **{f"reward_{_metric_name(name)}": sum(scores) / len(scores) for name, scores in self.each.items()},
               "sample_accuracy": sum(self.correct) / len(self.correct),
               "completion_tokens": sum(self.lengths) / len(self.lengths),
               # The longest answer sets how long a step samples; those cut at max_new_tokens never ended.
               "completion_tokens_max": max(self.lengths),
               "truncated_share": sum(n >= self.settings.max_new_tokens for n in self.lengths) / len(self.lengths),
               "uniform_groups": self.uniform_groups,
               # A later pass over a rollout samples nothing.
               "generate_s": self.generate_s if self.passes == 1 else 0.0}
        if self.settings.rounds() > 1:
            row["groups_sampled"] = self.groups_sampled
        if self.settings.iterations > 1:
            row["pass"] = self.passes
            row["clip_ratio"] = self.clipped_tokens / max(self.tokens, 1)
        if self.settings.beta and self.tokens:
            row["kl"] = self.kl_summed / self.tokens
        return row


def rewards_of(recipe) -> list[tuple[rewards_lib.Reward, float]]:
    """The recipe's rewards with their weights (a function of yours is imported here)."""
    g = recipe.grpo
    return list(zip(map(rewards_lib.Reward, g.rewards), g.reward_weights or [1.0] * len(g.rewards)))


@torch.no_grad()
def _reference_logps(model, batch: dict, temperature: float) -> torch.Tensor:
    from qadapt.adapters import adapters_off

    was_training = model.training
    model.eval()
    try:
        with adapters_off(model):
            return completion_token_logps(model, batch, temperature)
    finally:
        model.train(was_training)


def _sample(model, s: StepSource, prompts: list[str], slots: range):
    """grpo.group_size completions of each prompt, with the adapters on and dropout off."""
    from qadapt.decoding.generation import sample_completions
    from qadapt.decoding.sampling import Sampling

    g, template = s.recipe.grpo, s.recipe.data.template
    sampling = Sampling(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, samples=g.group_size,
                        seed=_step_seed(s.recipe.train.seed, s.step))
    was_training = model.training
    model.eval()
    try:
        return sample_completions(model, s.tokenizer, prompts, sampling, g.max_new_tokens,
                                  batch_size=len(prompts) * g.group_size,
                                  stop_strings=stop_strings(template, s.tokenizer),
                                  add_special_tokens=is_text_template(template), prompt_keys=list(slots))
    finally:
        model.train(was_training)


def _micro_batches(s: StepSource, model, groups: list[Group], step: StepRollout, size: int) -> list[dict]:
    """The groups' completions as training rows, `size` groups to a micro-batch, with their advantages (and the
    reference's log-probabilities when the loss has a KL term)."""
    g = s.recipe.grpo
    rewards = torch.tensor([r for group in groups for r in group.rewards])
    advantages = group_advantages(rewards, g.group_size, scale_by_std=g.loss == "grpo")
    answers = [(s.train_rows[group.row]["input_ids"], c.token_ids) for group in groups for c in group.completions]
    batches = []
    per_batch = size * g.group_size
    for k in range(0, len(answers), per_batch):
        rows = [_answer_row(prompt_ids, answer_ids) for prompt_ids, answer_ids in answers[k:k + per_batch]]
        batch = to_device(data_lib.collate(rows, s.tokenizer.pad_token_id), s.accelerator.device)
        batch["advantages"] = advantages[k:k + per_batch].to(s.accelerator.device)
        if g.beta:
            batch["ref_logps"] = _reference_logps(model, batch, g.temperature)
        batch["rollout"] = step  # not a tensor: the loss adds its KL and clipping to it
        batches.append(batch)
    return batches


def _rewarded_groups(s: StepSource, rows: list[int], completions: list) -> list[Group]:
    """Each problem's completions (`completions[i]` answers `rows[i]`), rewarded."""
    g = s.recipe.grpo
    rewarded = [rewards_lib.Completion(s.train_rows[i]["prompt"], c.text, len(c.token_ids), s.train_rows[i]["answer"],
                                       s.train_rows[i]["multiple_choice"])
                for i, group in zip(rows, completions) for c in group]
    totals, each = rewards_lib.total_rewards(s.state["rewards"], rewarded, g.max_new_tokens)
    correct = each.get("correct") or [rewards_lib.correct(c, g.max_new_tokens) for c in rewarded]
    size = g.group_size
    return [Group(row, list(group), totals[k * size:(k + 1) * size],
                  {name: scores[k * size:(k + 1) * size] for name, scores in each.items()},
                  correct[k * size:(k + 1) * size])
            for k, (row, group) in enumerate(zip(rows, completions))]


def _any_process(accelerator, flag: bool) -> bool:
    """Whether `flag` holds on any process (every process gets the same answer)."""
    return bool(accelerator.reduce(torch.tensor(int(flag), device=accelerator.device), "sum").item())


def _step_seed(seed: int, step: int) -> int:
    """The sampling seed of a step: the run's seed and the step, mixed."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:step {step}".encode(), digest_size=7).digest(), "little")


def _answer_row(prompt_ids: list[int], answer_ids: tuple[int, ...]) -> dict:
    """A prompt and a sampled answer as one row; the loss reads the answer's tokens alone."""
    return {"input_ids": prompt_ids + list(answer_ids),
            "labels": [data_lib.IGNORE_INDEX] * len(prompt_ids) + list(answer_ids)}


def _completion_mask(batch: dict) -> torch.Tensor:
    return batch["labels"][:, 1:] != data_lib.IGNORE_INDEX


def _problems(source: str, split: str) -> list[dict]:
    problems = load_eval_set(source, split=split)
    return [{"record": record, "gold": gold, "multiple_choice": problems.multiple_choice}
            for record, gold in zip(problems.records, problems.golds)]


def _metric_name(reward: str) -> str:
    return reward.replace(":", "_").replace(".", "_")


def _warn_of_silent_rewards(s: StepSource, each: dict[str, list[float]]) -> None:
    """Say once when a reward has given only 0 for SILENT_STEPS steps in a row: it teaches nothing."""
    silent = s.state.setdefault("silent_steps", {})
    for name, scores in each.items():
        silent[name] = silent.get(name, 0) + 1 if not any(scores) else 0
        if silent[name] == SILENT_STEPS:
            say(f"reward {name} has been 0 for every completion of the last {SILENT_STEPS} steps: it gives the "
                "model nothing to learn from (is the answer format what it reads?)", warning=True)
