"""The task registry: the one place a task name is looked up, and what each task answers for itself."""

from __future__ import annotations

import pytest

from qadapt.errors import QadaptError
from qadapt.tasks import DEFAULT_TASK, TASKS, task_named, task_of_adapter
from qadapt.tasks.base import Task

CAUSAL_LM, TOKEN_CLASSIFICATION = TASKS["causal-lm"], TASKS["token-classification"]


def test_an_unknown_task_names_the_choices():
    with pytest.raises(QadaptError, match="task 'ner' is not one of causal-lm, token-classification"):
        task_named("ner")


def test_every_task_implements_the_whole_interface():
    interface = [name for name, value in vars(Task).items() if callable(value) and not name.startswith("_")]
    for task in TASKS.values():
        missing = [name for name in interface
                   if getattr(type(task), name) is getattr(Task, name)
                   and name not in ("head_labels", "step_batches", "step_metrics", "micro_batch_shape", "refuse_export",
                                    "run_tokenizer", "checkpoint_state", "restore_state", "collate",
                                    "loss_settings")]
        assert missing == [], task.name
        assert all(hasattr(task, attribute) for attribute in ("name", "score_key", "generates", "exports"))


def test_an_adapter_saved_without_its_task_answers_prompts():
    # Adapters written before the task was recorded (and PEFT imports) are causal LMs.
    assert task_of_adapter({}) is DEFAULT_TASK is CAUSAL_LM
    assert task_of_adapter({"task": "token-classification"}) is TOKEN_CLASSIFICATION


def test_a_head_comes_only_with_its_labels():
    assert CAUSAL_LM.head_labels({"task": "causal-lm"}, "run/adapter/adapter_config.json") is None
    assert TOKEN_CLASSIFICATION.head_labels({"labels": ["O", "B-X"]}, "x") == ["O", "B-X"]
    with pytest.raises(QadaptError, match="run/adapter/adapter_config.json is a token-classification adapter "
                                          "without its labels"):
        TOKEN_CLASSIFICATION.head_labels({"task": "token-classification"}, "run/adapter/adapter_config.json")


def test_only_a_causal_lm_is_merged_or_exported():
    for export in ("merge", "peft", "gguf"):
        CAUSAL_LM.refuse_export(export, export)  # nothing to refuse
        with pytest.raises(QadaptError, match=f"cannot {export} a token-classification run: merging and export "
                                              "make causal language models"):
            TOKEN_CLASSIFICATION.refuse_export(export, export)


def test_a_task_says_what_its_summary_keeps():
    assert CAUSAL_LM.set_scores({"sets": {"gsm8k": {"accuracy": 0.25, "correct": 1}}}) == {"gsm8k": 0.25}
    assert TOKEN_CLASSIFICATION.set_scores({"sets": {"wnut17": {"f1": 0.5, "precision": 1.0}}}) == {"wnut17": 0.5}
    assert (CAUSAL_LM.score_key, TOKEN_CLASSIFICATION.score_key) == ("accuracy", "entity_f1")
