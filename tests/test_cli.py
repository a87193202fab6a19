"""The `qadapt` command: user errors are one clear line; the real embedded model trains end to end."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import qadapt, train_tiny_run

from qadapt.recipe import load_recipe
from qadapt.inference.loader import load_trained_model
from qadapt.training.loss import eval_loss
from qadapt.training.train import prepare_data


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_help_lists_the_commands():
    result = qadapt("--help")
    assert result.returncode == 0
    commands = ["train", "check", "plan", "eval", "generate", "chat", "report", "merge", "export", "import-peft"]
    assert all(command in result.stdout for command in commands)


def test_eval_mistakes_are_one_clear_line(tmp_path):
    assert_one_line_error(qadapt("eval", "smollm2-135m"), "at least one evaluation set with --data")
    assert_one_line_error(qadapt("eval", "smollm2-135m", "--data", "/no/such/test.json"),
                          "data file not found: /no/such/test.json")
    assert_one_line_error(qadapt("eval", "smollm2-135m", "--data", "builtin:arithmetic", "--quant", "nf5"),
                          "--quant 'nf5' is not one of nf4, fp4, int8, none")
    assert_one_line_error(qadapt("generate", "smollm2-135m", "hi", "--template", "chatml"),
                          "--template 'chatml' is not one of alpaca, llm-adapters, chat")
    unfinished = tmp_path / "run"
    unfinished.mkdir()
    (unfinished / "recipe.yaml").write_text("{}\n")
    assert_one_line_error(qadapt("eval", str(unfinished), "--data", "builtin:arithmetic"),
                          f"run directory {unfinished} has no adapter/ yet")


def test_unknown_recipe_key_is_one_clear_line():
    result = qadapt("train", "recipes/quickstart.yaml", "train.lrr=1e-4")
    assert_one_line_error(result, "unknown key 'train.lrr'", "did you mean 'train.lr'")


def test_missing_recipe_names_the_path():
    assert_one_line_error(qadapt("train", "recipes/nope.yaml"), "recipe not found: recipes/nope.yaml")


def test_unwritable_output_dir_is_reported_before_the_model_loads(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # The model does not exist either: the output_dir error must come first, before any loading.
    result = qadapt("train", "recipes/quickstart.yaml", f"output_dir={blocker}/run", "model.name=/no/such/model")
    assert_one_line_error(result, f"output_dir {blocker}/run is not writable")


def test_missing_model_and_data_name_the_path(tmp_path, tiny_llama_dir):
    result = qadapt("train", "recipes/quickstart.yaml", f"output_dir={tmp_path}/a", "model.name=/no/such/model")
    assert_one_line_error(result, "model folder not found: /no/such/model")
    result = qadapt("train", "recipes/quickstart.yaml", f"output_dir={tmp_path}/b", f"model.name={tiny_llama_dir}",
                    "data.path=/no/such/train.jsonl")
    assert_one_line_error(result, "data file not found: /no/such/train.jsonl")


def test_plan_predicts_the_memory_of_a_recipe():
    result = qadapt("plan", "recipes/gsm8k-lora.yaml", "--gpu-memory", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "base weights" in result.stdout and "of 8 GiB: fits" in result.stdout


def test_plan_of_an_unreachable_model_is_one_clear_line():
    assert_one_line_error(qadapt("plan", "recipes/gsm8k-lora.yaml", "model.name=/no/such/model"),
                          "model folder not found: /no/such/model")
    # Offline, as CI is: the hub client's connection retries would take half a minute, for the same message.
    assert_one_line_error(qadapt("plan", "recipes/gsm8k-lora.yaml", "model.name=nobody/no-such-model-xyz",
                                 offline=True),
                          "cannot load model 'nobody/no-such-model-xyz'")


def test_check_prints_the_resolved_recipe():
    result = qadapt("check", "recipes/gsm8k-lora.yaml", "model.quant=int8")
    assert result.returncode == 0 and "quant: int8" in result.stdout


@pytest.fixture(scope="module")
def quickstart_cli_run(tmp_path_factory):
    """The quickstart recipe, 8 steps, trained once through the CLI on the real embedded model: (run, output).
    Read-only for the tests that use it."""
    run = tmp_path_factory.mktemp("quickstart") / "run"
    result = qadapt("train", "recipes/quickstart.yaml", "train.max_steps=8", "train.grad_accum=1",
                    "train.eval_every=0", "data.val_size=8", f"output_dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result


@pytest.mark.slow
def test_real_smollm2_nf4_trains_through_the_cli_and_reloads(quickstart_cli_run):
    run, result = quickstart_cli_run
    assert "trainable parameters: 4,884,480" in result.stdout
    # The first screen shows qadapt's lines and progress bars: no library noise (qadapt.console).
    for noise in ("gemm_4bit_forward", "Warning", "deprecat"):
        assert noise not in result.stderr, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2, losses  # clearly falling
    logged_eval = [r["eval_loss"] for r in rows if "eval_loss" in r]

    # A fresh base with the saved adapter reproduces the trained model's held-out loss.
    model, tokenizer, recipe = load_trained_model(run)
    assert recipe == load_recipe(run / "recipe.yaml") and recipe.model.quant == "nf4"
    val_rows = prepare_data(recipe, tokenizer).val_rows
    reloaded = eval_loss(model, val_rows, recipe.train.micro_batch_size, tokenizer.pad_token_id, model.device)
    assert reloaded == pytest.approx(logged_eval[-1], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kind, quant, optimizer", [("dora", "nf4", "adamw"), ("series", "int8", "paged_adamw_8bit")])
def test_real_smollm2_trains_every_kind(tmp_path, kind, quant, optimizer):
    """Each adapter kind learns on the real embedded model through the real quantized path (LoRA: the
    test above; parallel shares series' bottleneck and runs on tiny models in every storage)."""
    run = tmp_path / "run"
    result = qadapt("train", "recipes/quickstart.yaml", f"adapter.kind={kind}", f"model.quant={quant}",
                    "data.path=builtin:arithmetic", "adapter.bottleneck_size=64", "train.max_steps=6",
                    "train.grad_accum=1", "train.eval_every=0", "data.val_size=8", f"train.optimizer={optimizer}",
                    f"output_dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"with {kind} adapters" in result.stdout
    if optimizer.startswith("paged"):  # said once by qadapt, not by bitsandbytes
        assert "runs unpaged" in result.stdout and "Paged optimizers" not in result.stderr, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_loss"] < 0.8 * summary["eval_loss_before"], summary  # clearly falling in 6 steps


def test_generate_and_chat_answer_with_a_trained_run(tiny_llama_dir, tmp_path):
    from qadapt.inference.loader import load_target
    from qadapt.inference.answering import answer_prompts

    run = train_tiny_run(tmp_path / "run", tiny_llama_dir, model={"compute_dtype": "fp32"})
    loaded = load_target(str(run))
    model, tokenizer, template = loaded.model, loaded.tokenizer, loaded.template
    expected = answer_prompts(model, tokenizer, template, ["Two plus two?", "Three plus one?"], max_new_tokens=6)
    generated = qadapt("generate", str(run), "Two plus two?", "--max-new-tokens", "6")
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert generated.stdout == expected[0] + "\n"
    chat = qadapt("chat", str(run), "--max-new-tokens", "6", stdin="Two plus two?\nThree plus one?\n\n")
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout == "you> " + expected[0] + "\nyou> " + expected[1] + "\nyou> "

    # --history: the second answer sees the first exchange, rendered as training renders a conversation.
    from qadapt.inference.answering import answer_conversation

    talk = [{"role": "user", "content": "Two plus two?"}]
    first = answer_conversation(model, tokenizer, template, talk, max_new_tokens=6)
    talk += [{"role": "assistant", "content": first}, {"role": "user", "content": "Three plus one?"}]
    second = answer_conversation(model, tokenizer, template, talk, max_new_tokens=6)
    kept = qadapt("chat", str(run), "--max-new-tokens", "6", "--history", stdin="Two plus two?\nThree plus one?\n\n")
    assert kept.returncode == 0, kept.stderr[-2000:]
    assert kept.stdout == "you> " + first + "\nyou> " + second + "\nyou> "
    assert first == expected[0]  # one Alpaca turn is the single-turn prompt

    # Sampled: the samples the decoder draws for the prompt, each under its number.
    from qadapt.decoding.sampling import Sampling
    from qadapt.inference.answering import sample_answers

    sampling = Sampling(temperature=1.5, samples=2, seed=3)
    drawn = sample_answers(model, tokenizer, template, [{"instruction": "Two plus two?", "input": ""}], sampling,
                           max_new_tokens=6)[0]
    sampled = qadapt("generate", str(run), "Two plus two?", "--max-new-tokens", "6", "--temperature", "1.5",
                     "--samples", "2", "--seed", "3")
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    assert sampled.stdout == f"--- sample 1 ---\n{drawn[0]}\n--- sample 2 ---\n{drawn[1]}\n"
    assert_one_line_error(qadapt("generate", str(run), "hi", "--samples", "2"),
                          "--samples, --top-p and --top-k sample: give a --temperature above 0 too")


@pytest.mark.slow
def test_real_smollm2_merged_and_exported_answers_like_the_adapter(tmp_path, quickstart_cli_run):
    """Train → merge → the merged folder, loaded by transformers, answers as the adapter model does;
    the PEFT and GGUF exports are written and verified."""
    run, _ = quickstart_cli_run
    merged = qadapt("merge", str(run), "--out", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert "vs adapter on the same base" in merged.stdout and "model.safetensors" in merged.stdout

    answers = {}
    for name, target in [("adapter", [str(run)]), ("merged", [str(tmp_path / "merged"), "--quant", "none"])]:
        result = qadapt("eval", *target, "--data", "builtin:arithmetic", "--limit", "12", "--compute-dtype", "fp32",
                        "--max-new-tokens", "40", "--out", str(tmp_path / f"eval-{name}"))
        assert result.returncode == 0, result.stderr[-3000:]
        predictions = (tmp_path / f"eval-{name}" / "predictions.jsonl").read_text().splitlines()
        answers[name] = [json.loads(row)["output"] for row in predictions]
    assert len(answers["adapter"]) == 12 and answers["merged"] == answers["adapter"]

    exported = qadapt("export", str(run), "--format", "peft", "--out", str(tmp_path / "peft"))
    assert exported.returncode == 0 and "adapter_model.safetensors" in exported.stdout, exported.stderr[-3000:]
    gguf = qadapt("export", str(run), "--format", "gguf", "--out", str(tmp_path / "model.gguf"))
    assert gguf.returncode == 0, gguf.stderr[-3000:]
    assert "deprecated" not in gguf.stderr, gguf.stderr[-3000:]  # the user's screen: qadapt's own lines
    from qadapt.export import llamacpp

    reader = "llama.cpp" if llamacpp.installed() else "transformers"  # the embedded model, run where it will run
    assert f"verified in {reader}, vs the merged model" in gguf.stdout and (tmp_path / "model.gguf").is_file()


def test_merge_and_export_mistakes_are_one_clear_line(tmp_path):
    assert_one_line_error(qadapt("merge", str(tmp_path), "--out", str(tmp_path / "m")),
                          f"{tmp_path} is not a run directory: it has no recipe.yaml")
    assert_one_line_error(qadapt("export", str(tmp_path), "--format", "onnx", "--out", str(tmp_path / "m")),
                          "--format 'onnx' is not one of peft, gguf, gguf-lora, ollama")
    assert_one_line_error(qadapt("export", str(tmp_path), "--format", "gguf-lora", "--base", "original",
                                 "--out", str(tmp_path / "m")), "--base is for merged exports")
    assert_one_line_error(qadapt("import-peft", str(tmp_path), "--out", str(tmp_path / "run")),
                          "not a PEFT adapter folder")
