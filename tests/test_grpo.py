"""GRPO as a task (qadapt.tasks.grpo) through the one training loop, on the real 4-bit path: the sampled tokens'
log-probabilities, the reference with the adapters off, a run that raises a reward of its own, exact resume,
and every bad reward configuration refused with one line."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap

import pytest
import torch
from conftest import tiny_recipe

from qadapt import data as data_lib
from qadapt.actions.report import read_run, report
from qadapt.errors import QadaptError
from qadapt.recipe import recipe_from_dict
from qadapt.tasks.base import StepSource
from qadapt.tasks.grpo import SILENT_STEPS, _warn_of_silent_rewards
from qadapt.tasks.token_logps import completion_token_logps
from qadapt.tasks.policy_loss import completion_logps
from qadapt.training.train import train

# A reward the tiny random model can earn more of: long words. Its completions differ in it from the first step.
LONG_WORDS = '''
def long_words(prompts, completions, answers):
    return [sum(len(word) for word in text.split()) / max(1, len(text.split())) / 5 for text in completions]
'''


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """A module of the user's, importable as `grpo_rewards` (imported afresh: another test's is not it)."""
    monkeypatch.delitem(sys.modules, "grpo_rewards", raising=False)
    (tmp_path / "grpo_rewards.py").write_text(textwrap.dedent(LONG_WORDS) + textwrap.dedent('''
        def broken(prompts, completions, answers):
            raise ZeroDivisionError("division by zero")

        def too_few(prompts, completions, answers):
            return [1.0]

        def some_prompts(prompts, completions, answers):  # 0 for every answer of a third of the problems or so
            scores = long_words(prompts, completions, answers)
            return [score if len(prompt) % 3 else 0.0 for prompt, score in zip(prompts, scores)]
        '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "grpo_rewards"


def grpo_recipe(model_dir, output_dir, steps: int = 4, save_every: int = 2, **grpo):
    return recipe_from_dict(tiny_recipe(
        model_dir, output_dir, task="grpo", adapter={"rank": 4, "dropout": 0.1},  # dropout: its random state resumes
        data={"path": "builtin:arithmetic", "max_examples": 16},
        train={"max_steps": steps, "micro_batch_size": 2, "grad_accum": 2, "lr": 2e-2, "save_every": save_every,
               "keep_checkpoints": 4},
        grpo={"group_size": 4, "max_new_tokens": 12, "beta": 0.05, "rewards": ["grpo_rewards:long_words", "correct"],
              **grpo}))


def metric_rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_samples_rewards_and_trains_and_resumes_to_the_same_rewards(tiny_llama_dir, tmp_path, reward_module):
    run = tmp_path / "run"
    train(grpo_recipe(tiny_llama_dir, run))
    rows = metric_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert row["reward"] == pytest.approx(row["reward_grpo_rewards_long_words"] + row["reward_correct"])
        assert row["completion_tokens"] <= row["completion_tokens_max"] <= 12 and 0 <= row["truncated_share"] <= 1
        assert row["generate_s"] > 0 and row["uniform_groups"] <= 4
        assert row["reward_std"] > 0 and row["loss"] != 0 and row["grad_norm"] > 0
    assert rows[0]["kl"] == 0 and rows[-1]["kl"] > 0  # the adapter starts as the base, then moves from it
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and (run / "adapter" / "adapter_config.json").is_file()
    assert read_run(run)["rewards"] == [(r["step"], r["reward"]) for r in rows]
    report([run], plot_path=tmp_path / "report.png")  # the reward curve beside the loss
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG")

    # Resume from the step-2 checkpoint: the rollouts, rewards and losses of steps 3 and 4 come out the same.
    again = tmp_path / "again"
    shutil.copytree(run, again)
    shutil.rmtree(again / "adapter")
    (again / "summary.json").unlink()
    assert [p.name for p in (again / "checkpoints").iterdir()] == ["step-000002"]
    train(grpo_recipe(tiny_llama_dir, again), resume="latest")
    resumed = metric_rows(again)
    keys = ("loss", "reward", "reward_std", "sample_accuracy", "completion_tokens", "kl", "grad_norm")
    assert [{k: r[k] for k in keys} for r in resumed] == [{k: r[k] for k in keys} for r in rows]


def test_passes_over_one_rollout_and_refilled_groups_resume_exactly(tiny_llama_dir, tmp_path, reward_module):
    """grpo.iterations 2: every other step trains on the last rollout again, its ratios to the sampling policy
    clipped; sampling_rounds 2: groups whose answers all earned one reward are replaced by fresh problems'. A
    checkpoint between a rollout's passes keeps the rollout, so the resumed run's last step is the same."""
    def recipe(out):
        return grpo_recipe(tiny_llama_dir, out, save_every=3, rewards=["grpo_rewards:some_prompts"], iterations=2,
                           sampling_rounds=2, epsilon=0.05)

    run = tmp_path / "run"
    train(recipe(run))
    rows = metric_rows(run)
    assert [r["pass"] for r in rows] == [1, 2, 1, 2]
    for first, second in (rows[0:2], rows[2:4]):
        assert second["reward"] == first["reward"] and second["groups_sampled"] == first["groups_sampled"]
        assert first["generate_s"] > 0 and second["generate_s"] == 0
        assert first["clip_ratio"] == 0  # the policy that sampled is the one trained: every ratio is 1
    assert rows[0]["kl"] == 0 and rows[1]["clip_ratio"] > 0 and rows[1]["loss"] != rows[0]["loss"]  # the policy moved since it sampled
    # Round 1 left uniform groups, so a second round sampled 4 more problems; the trained ones mostly differ.
    assert [r["groups_sampled"] for r in rows[::2]] == [8, 8] and all(r["uniform_groups"] < 4 for r in rows)
    checkpoint = run / "checkpoints" / "step-000003"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["examples_seen"] == 16
    assert (checkpoint / "task_state.pt").is_file()

    again = tmp_path / "again"
    shutil.copytree(run, again)
    shutil.rmtree(again / "adapter")
    (again / "summary.json").unlink()
    for older in (again / "checkpoints").iterdir():
        if older.name != "step-000003":
            shutil.rmtree(older)
    train(recipe(again), resume="latest")
    keys = ("loss", "reward", "clip_ratio", "kl", "grad_norm", "pass")
    assert [{k: r[k] for k in keys} for r in metric_rows(again)] == [{k: r[k] for k in keys} for r in rows]


def test_the_sampled_tokens_log_probabilities_are_the_full_logits(load_tiny, smol_tokenizer):
    """The head computed only at the completion's places, a chunk at a time, gives the log-probabilities (and
    gradients) that the full logits give, at a temperature; prompts and completions of unequal length."""
    from qadapt.adapters import attach_adapters
    from qadapt.adapters.spec import LowRankSpec

    model = load_tiny("nf4")
    attach_adapters(model, LowRankSpec(rank=4, dropout=0.0))  # the two passes compared draw no masks
    generator = torch.Generator().manual_seed(0)
    for p in (p for p in model.parameters() if p.requires_grad):
        p.data.normal_(0, 0.02, generator=generator)
    rows = [{"input_ids": list(range(5, 5 + n + m)), "labels": [data_lib.IGNORE_INDEX] * n + list(range(5 + n, 5 + n + m))}
            for n, m in [(4, 6), (7, 3), (3, 9)]]
    batch = data_lib.collate(rows, smol_tokenizer.pad_token_id)
    mask = batch["labels"][:, 1:] != data_lib.IGNORE_INDEX

    ours = completion_token_logps(model, batch, temperature=0.7)
    ours.sum().backward()
    our_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1] / 0.7
    full = completion_logps(logits, batch["input_ids"][:, 1:]) * mask
    full.sum().backward()
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)
    for ours_grad, p in zip(our_grads, (p for p in model.parameters() if p.requires_grad)):
        torch.testing.assert_close(ours_grad, p.grad, rtol=1e-4, atol=1e-6)
    assert (ours[~mask] == 0).all()


def test_with_the_adapters_off_the_model_is_its_base(load_tiny):
    from qadapt.adapters import adapters_off, attach_adapters
    from qadapt.adapters.spec import BottleneckSpec, LowRankSpec
    from qadapt.lean_cpu.fused_lora import fuse_lora_forwards

    ids = torch.tensor([[5, 6, 7, 8]])
    for spec in (LowRankSpec(rank=4), LowRankSpec(kind="dora", rank=4), BottleneckSpec(kind="parallel", placement="mlp")):
        model = load_tiny("nf4")
        with torch.no_grad():
            base = model.eval()(input_ids=ids).logits
            attach_adapters(model, spec)
            fused = fuse_lora_forwards(model)  # a forward of the instance's own, as training on a CPU sets
            model.eval()  # the adapters' dropout too
            for p in (p for p in model.parameters() if p.requires_grad):
                p.add_(0.02)
            adapted = model(input_ids=ids).logits
            with adapters_off(model):
                off = model(input_ids=ids).logits
            assert torch.equal(off, base) and (adapted - base).abs().max() > 0.01, spec.kind
            assert torch.equal(model(input_ids=ids).logits, adapted), spec.kind  # on again, the fused forward kept
            assert sum("forward" in vars(m) for m in model.modules()) == fused


@pytest.mark.parametrize("grpo, message", [
    ({"rewards": ["corect"]}, "grpo.rewards 'corect' is not one of correct, format, length, nor a function of yours "
                              "as module:function"),
    ({"rewards": ["correct", "format"], "reward_weights": [1.0]}, "grpo.reward_weights must give one weight per "
                                                                  "reward (2), got 1"),
    ({"group_size": 1}, "grpo.group_size must be at least 2"),
    ({"reward_weights": ["x"]}, "grpo.reward_weights: expected a list of numbers, got ['x']"),
    ({"loss": "ppo"}, "grpo.loss: 'ppo' is not one of grpo, dr_grpo, dapo"),
    ({"iterations": 0}, "grpo.iterations must be at least 1"),
    ({"epsilon": 1.5}, "grpo.epsilon must be in (0, 1)"),
    ({"sampling_rounds": 0}, "grpo.sampling_rounds must be at least 1, or null"),
])
def test_a_bad_reward_configuration_is_refused_when_the_recipe_loads(tiny_llama_dir, tmp_path, grpo, message):
    with pytest.raises(QadaptError) as refused:
        recipe_from_dict(tiny_recipe(tiny_llama_dir, tmp_path, task="grpo", grpo=grpo))
    assert message in str(refused.value)
    with pytest.raises(QadaptError, match="grpo.beta applies with task: grpo"):
        recipe_from_dict(tiny_recipe(tiny_llama_dir, tmp_path, grpo={"beta": 0.1}))


def test_the_recipe_takes_reward_weights_and_refuses_what_cannot_apply(tiny_llama_dir, tmp_path):
    grpo = {"rewards": ["correct", "format"], "reward_weights": [1, "0.5"]}  # YAML may read 0.5 as text
    assert recipe_from_dict(tiny_recipe(tiny_llama_dir, tmp_path, task="grpo", grpo=grpo)).grpo.reward_weights == [1.0, 0.5]
    with pytest.raises(QadaptError, match="grpo.rewards names a reward twice"):
        recipe_from_dict(tiny_recipe(tiny_llama_dir, tmp_path, task="grpo", grpo={"rewards": ["correct", "correct"]}))
    with pytest.raises(QadaptError, match=r"data.packing does not apply to task: grpo \(its rows are sampled"):
        recipe_from_dict(tiny_recipe(tiny_llama_dir, tmp_path, task="grpo", data={"packing": True}))


def test_a_step_is_planned_as_every_answer_of_its_problems(tiny_llama_dir, tmp_path):
    """qadapt plan counts a GRPO micro-batch as G answers per problem, each a prompt and max_new_tokens."""
    from qadapt.tasks import task_named
    from qadapt.training.plan import plan_memory

    grpo = recipe_from_dict(tiny_recipe(tiny_llama_dir, tmp_path, task="grpo", data={"cutoff_len": 64},
                                        grpo={"group_size": 4, "max_new_tokens": 32}))
    assert task_named("grpo").micro_batch_shape(grpo) == (2 * 4, 64 + 32)
    sft = recipe_from_dict(tiny_recipe(tiny_llama_dir, tmp_path, data={"cutoff_len": 64}))
    assert plan_memory(grpo).parts["activations"] > 4 * plan_memory(sft).parts["activations"]


def test_problems_in_the_eval_sets_are_left_out_when_asked_and_an_empty_set_says_why(tiny_llama_dir, tmp_path,
                                                                                      smol_tokenizer):
    from qadapt.tasks import task_named

    problems = tmp_path / "problems.json"
    # Problems alone, in TRL's prompt-only form with an answer: no solution to imitate, only one to check.
    problems.write_text(json.dumps([{"prompt": f"What is {n} plus 2?", "answer": n + 2} for n in range(3)]))
    recipe = recipe_from_dict(tiny_recipe(tiny_llama_dir, tmp_path, task="grpo", eval={"sets": [f"{problems}@2"]},
                                          data={"path": str(problems), "exclude_eval_overlap": True, "max_examples": None}))
    rows = task_named("grpo").training_data(recipe, smol_tokenizer).train_rows
    assert [row["answer"] for row in rows] == [4.0]  # the first two are scored at the end: not trained on
    recipe = recipe_from_dict(tiny_recipe(tiny_llama_dir, tmp_path, task="grpo", eval={"sets": [str(problems)]},
                                          data={"path": str(problems), "exclude_eval_overlap": True}))
    with pytest.raises(QadaptError, match=r"no problems left to train on in .*problems.json: of 3, 0 have prompts "
                                          r"over data.cutoff_len 256 and 3 are in eval.sets"):
        task_named("grpo").training_data(recipe, smol_tokenizer)


@pytest.mark.parametrize("reward, message", [
    ("no_such_module:f", "reward no_such_module:f: cannot import no_such_module: No module named 'no_such_module'"),
    ("grpo_rewards:missing", "reward grpo_rewards:missing: grpo_rewards has no function missing"),
    ("grpo_rewards:broken", "reward grpo_rewards:broken failed: ZeroDivisionError: division by zero"),
    ("grpo_rewards:too_few", "reward grpo_rewards:too_few must return one number per completion (16), got 1 values"),
])
def test_a_reward_that_cannot_run_stops_the_run_with_one_line(tiny_llama_dir, tmp_path, reward_module, reward, message):
    with pytest.raises(QadaptError) as stopped:
        train(grpo_recipe(tiny_llama_dir, tmp_path / "run", steps=1, rewards=[reward], beta=0.0))
    assert str(stopped.value) == message


def test_a_reward_that_stays_0_is_warned_about_once(capsys):
    source = StepSource([], None, None, None, None)
    for _ in range(SILENT_STEPS + 5):
        _warn_of_silent_rewards(source, {"correct": [0.0, 0.0], "format": [0.0, 1.0]})
    warned = capsys.readouterr().err
    assert warned.count("reward correct has been 0 for every completion of the last 20 steps") == 1
    assert "reward format" not in warned


def test_a_changed_gold_answer_is_changed_training_data_on_resume():
    from qadapt.training.resume import rows_sha256

    row = {"input_ids": [5, 6, 7], "labels": [-100, -100, -100], "answer": 12.0}
    assert rows_sha256([row]) != rows_sha256([{**row, "answer": 13.0}])
    assert rows_sha256([row]) == rows_sha256([dict(row)])
