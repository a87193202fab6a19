"""The `qadapt` command: parses arguments, calls an action, turns user errors into one clear line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qadapt.errors import QadaptError, TrainingStopped

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Quantized, low-resource fine-tuning with LoRA, Series and Parallel adapters.",
)
RecipeArg = typer.Argument(..., help="Recipe YAML file, e.g. recipes/quickstart.yaml.", show_default=False)
OverridesArg = typer.Argument(None, help="Overrides as section.key=value, e.g. train.lr=1e-4 model.quant=int8.")


def run() -> None:
    """The `qadapt` command (console script and `python -m qadapt`)."""
    import sys

    app(args=with_resume_value(sys.argv[1:]), prog_name="qadapt")


def with_resume_value(args: list[str]) -> list[str]:
    """`--resume` may stand alone (the latest checkpoint) or name a checkpoint; typer options cannot
    have an optional value, so a bare one is spelled `--resume=latest` before typer parses it.

    The word after `--resume` is its value unless it is an option, an override (`key=value`) or a recipe.
    """
    args = list(args)
    if not args or args[0] != "train":  # `qadapt eval --resume` is a plain flag
        return args
    for index, arg in enumerate(args):
        if arg != "--resume":
            continue
        following = args[index + 1] if index + 1 < len(args) else None
        if following is None or following.startswith("-") or "=" in following or following.endswith((".yaml", ".yml")):
            args[index] = "--resume=latest"
    return args


@app.callback()
def main() -> None:
    """qadapt: train adapters on a frozen 4-bit/8-bit base model."""


@app.command()
def train(
    recipe: Path = RecipeArg,
    overrides: Optional[list[str]] = OverridesArg,
    resume: Optional[str] = typer.Option(
        None, "--resume", metavar="[CHECKPOINT]",
        help="Continue from the latest complete checkpoint in output_dir (or the checkpoint folder given); "
             "the run continues as if never interrupted."),
    allow_recipe_changes: bool = typer.Option(False, help="Resume even though the recipe or data changed."),
    overwrite: bool = typer.Option(False, help="Replace the run already in output_dir."),
    skip_eval: bool = typer.Option(False, help="Do not score the recipe's eval sets at the end (score later with "
                                               "qadapt eval RUN --resume)."),
) -> None:
    """Train the adapter a recipe describes; writes a self-describing run directory."""
    import shlex

    from qadapt.recipe import load_recipe
    from qadapt.training.train import train as run_training

    resume_command = shlex.join(["qadapt", "train", str(recipe), *(overrides or []), "--resume"])
    with _user_errors():
        run_training(load_recipe(recipe, overrides or []), resume, allow_recipe_changes, overwrite, resume_command,
                     score=not skip_eval)


@app.command()
def check(recipe: Path = RecipeArg, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Validate a recipe (with overrides) and print it resolved, without loading anything."""
    import yaml

    from qadapt.recipe import load_recipe

    with _user_errors():
        typer.echo(yaml.safe_dump(load_recipe(recipe, overrides or []).to_dict(), sort_keys=False), nl=False)


@app.command()
def data(
    recipe: Path = RecipeArg,
    overrides: Optional[list[str]] = OverridesArg,
    show: int = typer.Option(3, help="How many training examples to print."),
    as_json: bool = typer.Option(False, "--json", help="Print the examples' segments and the counts as JSON."),
) -> None:
    """Show the first training examples as the model sees them, the trained tokens marked, and the counts."""
    import sys
    from contextlib import redirect_stdout

    from qadapt.recipe import load_recipe
    from qadapt.show_data import data_view, format_view, to_json

    with _user_errors():
        with redirect_stdout(sys.stderr):  # what reading the data says goes beside the view, not into it
            view = data_view(load_recipe(recipe, overrides or []), show)
        typer.echo(to_json(view) if as_json else format_view(view, colour=sys.stdout.isatty()))


@app.command()
def plan(
    recipe: Path = RecipeArg,
    overrides: Optional[list[str]] = OverridesArg,
    gpu_memory: float = typer.Option(24.0, help="The GPU's memory in GiB."),
    fsdp_gpus: int = typer.Option(1, help="Plan for FSDP sharding the base over this many GPUs (per GPU)."),
) -> None:
    """Predict a recipe's peak training memory from the model's config (no weights), and whether it fits."""
    from qadapt.plan import format_plan, plan_memory
    from qadapt.recipe import load_recipe

    with _user_errors():
        if fsdp_gpus < 1:
            raise QadaptError(f"--fsdp-gpus must be at least 1, got {fsdp_gpus}")
        loaded = load_recipe(recipe, overrides or [])
        typer.echo(format_plan(plan_memory(loaded, gpu_memory, fsdp_gpus=fsdp_gpus), loaded))


@app.command()
def sweep(
    recipe: Path = RecipeArg,
    overrides: Optional[list[str]] = OverridesArg,
    grid: Optional[list[str]] = typer.Option(
        None, "--grid", metavar="KEY=V1,V2",
        help="Values to try for a recipe key; repeat for more keys (the runs are the cross product). A value may "
             "be a mapping setting several keys of a section: 'adapter={kind: lora},{kind: series}'."),
    out: Optional[Path] = typer.Option(None, help="The sweep's folder (default: runs/sweep-RECIPE)."),
    baseline: bool = typer.Option(False, help="Also score the untrained base on the eval sets (DIR/base)."),
    eval_dtype: str = typer.Option("fp32", help="Compute dtype when scoring (fp32: answers independent of the "
                                                "batch)."),
    results: Optional[Path] = typer.Option(
        None, help="Keep each finished run's result files (recipe, summary, log, scores; no weights) in this "
                   "folder, e.g. docs/results/NAME to commit, and count a run kept there by the same recipe as "
                   "done: the table grows across sessions and machines."),
) -> None:
    """Train and score many runs of one recipe; the same command continues a stopped sweep."""
    from qadapt.sweep import sweep as run_sweep

    with _user_errors():
        run_sweep(recipe, grid or [], overrides or [], out or Path("runs") / f"sweep-{recipe.stem}", baseline,
                  eval_dtype, results)


TargetArg = typer.Argument(..., help="A run directory, or a bare model: smollm2-135m, a hub id, a folder.",
                           show_default=False)
QuantOption = typer.Option("nf4", help="How a bare model is loaded: nf4, fp4, int8 or none (a run: as trained).")
TemplateOption = typer.Option(None, help="Prompt template, alpaca or chat (default: the run's, else alpaca).")
MaxNewTokensOption = typer.Option(256, help="Longest answer in tokens.")
DTypeOption = typer.Option(None, help="Override the compute dtype (auto, bf16, fp16, fp32); fp32 makes greedy "
                                      "answers independent of the batch.")
TemperatureOption = typer.Option(0.0, help="Sample at this temperature; 0: greedy (the default).")
TopPOption = typer.Option(1.0, "--top-p", help="Sampling: keep the most likely tokens whose probabilities sum to P.")
TopKOption = typer.Option(0, "--top-k", help="Sampling: keep the K most likely tokens (0: all).")
SeedOption = typer.Option(0, help="Sampling: the seed (the same seed and prompt give the same answer).")


@app.command("eval")
def eval_command(
    target: str = TargetArg,
    data: Optional[list[str]] = typer.Option(None, "--data", help="A set: GSM8K .jsonl, LLM-Adapters .json, a hub id "
                                             "or builtin:arithmetic; for a token-classification run a CoNLL "
                                             "file. Repeat for more sets; PATH@N scores a set's first N."),
    limit: Optional[int] = typer.Option(None, help="Only the first N problems of each set."),
    batch_size: int = typer.Option(64, help="Problems decoded together (lower it if memory runs short)."),
    max_new_tokens: int = MaxNewTokensOption,
    strict: bool = typer.Option(False, help="Read only the number (or letter) after 'The answer is'."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: RUN/eval, or runs/eval/MODEL-QUANT)."),
    quant: str = QuantOption,
    template: Optional[str] = TemplateOption,
    compute_dtype: Optional[str] = DTypeOption,
    resume: bool = typer.Option(False, "--resume", help="Keep the sets already scored in the output folder with "
                                "the same settings; score only the others."),
    calculator: bool = typer.Option(False, "--calculator", help="Write the true result after each sum a rationale "
                                    "writes ('98 - 93 =' gets ' 5'); not the paper's protocol, so scored apart "
                                    "(default folder RUN/eval-calculator)."),
) -> None:
    """Accuracy on math sets, scored as the LLM-Adapters paper scores them; entity F1 for a tagging run."""
    from qadapt.inference.evaluate import run_eval

    with _user_errors():
        run_eval(target, data or [], limit, batch_size, max_new_tokens, strict, out, quant, template, compute_dtype,
                 resume=resume, calculator=calculator)


@app.command()
def generate(
    target: str = TargetArg,
    prompt: str = typer.Argument(..., help="The instruction, as a user would write it.", show_default=False),
    max_new_tokens: int = MaxNewTokensOption,
    quant: str = QuantOption,
    template: Optional[str] = TemplateOption,
    temperature: float = TemperatureOption,
    top_p: float = TopPOption,
    top_k: int = TopKOption,
    samples: int = typer.Option(1, help="Sampling: this many answers (each printed under its number)."),
    seed: int = SeedOption,
) -> None:
    """Answer one prompt with a trained adapter (or a bare model), greedily or sampled."""
    from qadapt.inference.loader import load_target
    from qadapt.tasks.math_sets import sample_answers

    with _user_errors():
        sampling = _sampling(temperature, top_p, top_k, samples, seed)
        if sampling is None:
            typer.echo(_answerer(target, max_new_tokens, quant, template)(prompt))
            return
        loaded = load_target(target, quant, template)
        answers = sample_answers(loaded.model, loaded.tokenizer, loaded.template,
                                 [{"instruction": prompt, "input": ""}], sampling, max_new_tokens)[0]
        for number, answer in enumerate(answers, 1):
            typer.echo(f"--- sample {number} ---\n{answer}" if samples > 1 else answer)


@app.command()
def rationales(
    teacher: str = typer.Option(..., "--teacher", help="A run, a merged folder or a bare model (as for eval), or "
                                "an OpenAI-compatible endpoint: http://127.0.0.1:8080/v1.", show_default=False),
    data: list[str] = typer.Option(..., "--data", help="Problems with answers: builtin:arithmetic, a GSM8K .jsonl, "
                                   "an LLM-Adapters .json. Repeat for more sets.", show_default=False),
    out: Path = typer.Option(..., "--out", help="The rationales (LLM-Adapters JSON); beside it OUT.samples.jsonl "
                             "(every sample, for resuming) and OUT.stats.json.", show_default=False),
    samples: int = typer.Option(8, help="Solutions sampled per problem (K)."),
    temperature: float = typer.Option(0.7, help="Sampling temperature."),
    top_p: float = TopPOption,
    top_k: int = TopKOption,
    seed: int = SeedOption,
    split: str = typer.Option("train", help="Split of a built-in or hub set."),
    limit: Optional[int] = typer.Option(None, help="Only the first N problems of each set."),
    max_new_tokens: int = MaxNewTokensOption,
    batch_size: int = typer.Option(64, help="A local teacher: rows (samples) decoded together."),
    quant: str = QuantOption,
    template: Optional[str] = TemplateOption,
    model: Optional[str] = typer.Option(None, help="An endpoint: the model to ask (default: the first it lists)."),
    api_key_env: Optional[str] = typer.Option(None, help="An endpoint: the environment variable holding its API "
                                              "key (read, sent, never written)."),
    concurrency: int = typer.Option(4, help="An endpoint: requests in flight at once."),
    timeout: float = typer.Option(120.0, help="An endpoint: seconds to wait for one answer (retried)."),
    system: Optional[str] = typer.Option(None, help="An endpoint: the system prompt (default: solve step by step "
                                         "and end with 'The answer is N.'; '' for none)."),
) -> None:
    """Training data from a teacher: K sampled solutions per problem, kept when the answer is right."""
    from qadapt.decoding.sampling import Sampling
    from qadapt.inference.rationales import run_rationales

    with _user_errors():
        run_rationales(teacher, data, out, Sampling(temperature, top_p, top_k, samples, seed), split, limit,
                       max_new_tokens, batch_size, quant, template, model, api_key_env, concurrency, timeout, system)


@app.command()
def chat(
    target: str = TargetArg,
    max_new_tokens: int = MaxNewTokensOption,
    quant: str = QuantOption,
    template: Optional[str] = TemplateOption,
    history: bool = typer.Option(False, "--history", help="Keep the conversation: each answer sees the turns "
                                 "before it, rendered by the run's chat template as in training."),
    temperature: float = TemperatureOption,
    top_p: float = TopPOption,
    top_k: int = TopKOption,
    seed: int = SeedOption,
) -> None:
    """Try an adapter interactively: each line you type is answered; an empty line or Ctrl-D ends."""
    with _user_errors():
        sampling = _sampling(temperature, top_p, top_k, 1, seed)
        answer = (_conversation(target, max_new_tokens, quant, template, sampling, history) if history or sampling
                  else _answerer(target, max_new_tokens, quant, template))
        while True:
            try:
                prompt = input("you> ").strip()
            except EOFError:
                break
            if not prompt:
                break
            typer.echo(answer(prompt))


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Run directories to compare.", show_default=False),
    out: Optional[Path] = typer.Option(None, help="Also write the markdown table to this file."),
    plot: Optional[Path] = typer.Option(None, help="Draw loss curves and accuracies to this PNG (needs matplotlib)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the figures as JSON to this file."),
) -> None:
    """Compare runs: kind, size, steps, time, loss and accuracy per set (with 95% intervals), as a markdown table."""
    from qadapt.report import report as make_report

    with _user_errors():
        typer.echo(make_report(runs, out, plot, json_out))


RunArg = typer.Argument(..., help="A finished run directory (it has recipe.yaml and adapter/).", show_default=False)
MergeBaseOption = typer.Option("dequantized", help="Fold into the exact de-quantized weights the adapter was "
                                                   "trained against (dequantized) or the checkpoint's own (original).")


@app.command()
def merge(
    run_dir: Path = RunArg,
    out: Path = typer.Option(..., help="The Hugging Face folder to write (must not exist yet).", show_default=False),
    dtype: str = typer.Option("auto", help="Weights dtype: auto (the checkpoint's), bf16, fp16 or fp32."),
    base: str = MergeBaseOption,
) -> None:
    """Fold a LoRA / DoRA adapter into its base; write a verified standard Hugging Face folder."""
    from qadapt.export.merge import merge_run

    with _user_errors():
        merge_run(run_dir, out, dtype, base)


@app.command()
def export(
    run_dir: Path = RunArg,
    format: str = typer.Option(..., "--format", help="peft (the adapter alone), gguf (merged, for llama.cpp), "
                               "gguf-lora (a folder: llama.cpp's adapter file and its base) or ollama (a folder: "
                               "the GGUF and a Modelfile).", show_default=False),
    out: Path = typer.Option(..., help="Folder (peft, gguf-lora, ollama) or .gguf file to write.",
                             show_default=False),
    type: str = typer.Option("f16", "--type", help="GGUF weights type: f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, "
                             "or a K-quant (q4_k_m, q5_k_m, q6_k, ...: needs the llamacpp extra)."),
    base: str = MergeBaseOption,
) -> None:
    """Export a run's adapter for other tools: PEFT / vLLM (peft), llama.cpp (gguf) or Ollama (ollama)."""
    with _user_errors():
        if format == "peft":
            from qadapt.export.peft_format import export_peft

            export_peft(run_dir, out)
        elif format == "gguf":
            from qadapt.export.gguf_export import export_gguf

            export_gguf(run_dir, out, type, base)
        elif format == "gguf-lora":
            from qadapt.export.gguf_lora import export_gguf_lora

            if base != "dequantized":
                raise QadaptError("--base is for merged exports; gguf-lora ships the base the adapter was trained "
                                  "against (de-quantized) beside it")
            export_gguf_lora(run_dir, out, type)
        elif format == "ollama":
            from qadapt.export.ollama import export_ollama

            export_ollama(run_dir, out, type, base)
        else:
            raise QadaptError(f"--format {format!r} is not one of peft, gguf, gguf-lora, ollama "
                              "(for a Hugging Face folder: qadapt merge)")


@app.command("import-peft")
def import_peft(
    peft_dir: Path = typer.Argument(..., help="A PEFT LoRA / DoRA adapter folder.", show_default=False),
    out: Path = typer.Option(..., help="The run directory to create.", show_default=False),
    base: Optional[str] = typer.Option(None, help="Base model (default: the adapter's base_model_name_or_path)."),
    quant: str = typer.Option("nf4", help="How the base is loaded when the run is used: nf4, fp4, int8 or none."),
    template: str = typer.Option("alpaca", help="Prompt template the adapter was trained with: alpaca, "
                                                "llm-adapters or chat."),
) -> None:
    """Make a run directory from a PEFT LoRA adapter, for qadapt eval, generate, merge and export."""
    from qadapt.export.peft_format import import_peft as run_import

    with _user_errors():
        run_import(peft_dir, out, base, quant, template)


def _conversation(target: str, max_new_tokens: int, quant: str, template: Optional[str], sampling=None,
                  history: bool = True):
    """Load the target once; return a function answering each line (with the conversation so far, or
    alone), greedily or with `sampling`."""
    import itertools

    from qadapt.inference.loader import load_target
    from qadapt.tasks.math_sets import answer_conversation, sample_answers

    loaded, messages, turn = load_target(target, quant, template), [], itertools.count(1)

    def answer(prompt: str) -> str:
        if not history:  # one turn as `generate` prompts it; each line its own sample (seeded by its number)
            return sample_answers(loaded.model, loaded.tokenizer, loaded.template,
                                  [{"instruction": prompt, "input": ""}], sampling, max_new_tokens, 1,
                                  keys=[next(turn)])[0][0]
        messages.append({"role": "user", "content": prompt})
        reply = answer_conversation(loaded.model, loaded.tokenizer, loaded.template, messages, max_new_tokens,
                                    sampling)
        messages.append({"role": "assistant", "content": reply})
        return reply

    return answer


def _sampling(temperature: float, top_p: float, top_k: int, samples: int, seed: int):
    """The sampling the options ask for, or None for greedy decoding (temperature 0)."""
    from qadapt.decoding.sampling import Sampling

    if temperature < 0:
        raise QadaptError(f"--temperature must be 0 (greedy) or more, got {temperature}")
    if temperature == 0:
        if samples > 1 or top_p != 1.0 or top_k:
            raise QadaptError("--samples, --top-p and --top-k sample: give a --temperature above 0 too")
        return None
    return Sampling(temperature, top_p, top_k, samples, seed)


def _answerer(target: str, max_new_tokens: int, quant: str, template: Optional[str]):
    """Load the target once; return a function answering one instruction greedily."""
    from qadapt.inference.loader import load_target
    from qadapt.tasks.math_sets import answer_prompts

    loaded = load_target(target, quant, template)
    return lambda prompt: answer_prompts(loaded.model, loaded.tokenizer, loaded.template, [prompt], max_new_tokens)[0]


class _user_errors:
    """Print a QadaptError as `error: ...` on stderr and exit 2; anything else is a bug and shows."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if isinstance(error, TrainingStopped):
            typer.echo(str(error), err=True)
            raise typer.Exit(error.exit_code)
        if isinstance(error, QadaptError):
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2)
        if isinstance(error, KeyboardInterrupt):
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)
        return False
