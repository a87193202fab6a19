"""A run directory's vocabulary: the name of every file and folder qadapt writes in one.

    <output_dir>/
      recipe.yaml                      the resolved recipe (overrides applied)
      chat_template.jinja              the chat template a data.template: chat run trained with
      adapter/                         the final adapter
        adapter.safetensors            adapter weights only, fp32, named as in the model (and a trained head)
        adapter_config.json            kind, options, wrapped modules, base model (and the head's labels)
      checkpoints/step-000100/         a full checkpoint every train.save_every steps (qadapt.training.checkpoint)
        adapter.safetensors, adapter_config.json, recipe.yaml
        optimizer.pt, rng_state.pt, trainer_state.json
      metrics.jsonl                    one JSON row per logged step / eval loss (the training log)
      summary.json                     the run's figures, written when it finishes
      eval/                            scores of the recipe's eval sets, or of `qadapt eval RUN`
        metrics.json, predictions.jsonl
      eval-calculator/                 the same, decoded with `qadapt eval --calculator`
      tensorboard/                     with train.tensorboard

Names only, no torch: the report, the sweep and the tools read runs without loading a model.
"""

from __future__ import annotations

from pathlib import Path

RECIPE_FILE = "recipe.yaml"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
TRAINING_LOG = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
EVAL_DIR = "eval"
EVAL_METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
CALCULATOR_SUFFIX = "-calculator"  # RUN/eval-calculator: decoded with qadapt.decoding.calculator, apart
TENSORBOARD_DIR = "tensorboard"

# Inside checkpoints/step-NNNNNN/, beside the adapter's two files and the recipe.
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_state.pt"

# What a run writes: `train --overwrite` removes these, and nothing else in the folder.
QADAPT_OUTPUTS = (RECIPE_FILE, CHAT_TEMPLATE_FILE, ADAPTER_DIR, CHECKPOINTS_DIR, TRAINING_LOG, SUMMARY_FILE,
                  EVAL_DIR, EVAL_DIR + CALCULATOR_SUFFIX, TENSORBOARD_DIR)


def eval_dir(run_dir: Path, calculator: bool = False) -> Path:
    """Where a run's scores go: RUN/eval, or RUN/eval-calculator for answers decoded with the calculator."""
    return Path(run_dir) / (EVAL_DIR + (CALCULATOR_SUFFIX if calculator else ""))
