"""The `qadapt` command: parses arguments, calls an action, turns user errors into one clear line.

Each command reads its options and hands them to the library, where what they mean lives; the options
themselves, with their help, are declared in qadapt.cli_options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qadapt import cli_options as o
from qadapt.errors import QadaptError, TrainingStopped

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Quantized, low-resource fine-tuning with LoRA, Series and Parallel adapters.",
)


def run() -> None:
    """The `qadapt` command (console script and `python -m qadapt`)."""
    import sys

    app(args=o.with_resume_value(sys.argv[1:]), prog_name="qadapt")


@app.callback()
def main() -> None:
    """qadapt: train adapters on a frozen 4-bit/8-bit base model."""


@app.command()
def train(recipe: Path = o.RecipeArg, overrides: Optional[list[str]] = o.OverridesArg,
          resume: Optional[str] = o.ResumeOption, allow_recipe_changes: bool = o.AllowRecipeChangesOption,
          overwrite: bool = o.OverwriteOption, skip_eval: bool = o.SkipEvalOption) -> None:
    """Train the adapter a recipe describes; writes a self-describing run directory."""
    import shlex

    from qadapt.recipe import load_recipe
    from qadapt.training.train import train as run_training

    resume_command = shlex.join(["qadapt", "train", str(recipe), *(overrides or []), "--resume"])
    with _user_errors():
        run_training(load_recipe(recipe, overrides or []), resume, allow_recipe_changes, overwrite, resume_command,
                     score=not skip_eval)


@app.command()
def check(recipe: Path = o.RecipeArg, overrides: Optional[list[str]] = o.OverridesArg) -> None:
    """Validate a recipe (with overrides) and print it resolved, without loading anything."""
    from qadapt.recipe import load_recipe, recipe_yaml

    with _user_errors():
        typer.echo(recipe_yaml(load_recipe(recipe, overrides or [])), nl=False)


@app.command()
def data(recipe: Path = o.RecipeArg, overrides: Optional[list[str]] = o.OverridesArg, show: int = o.ShowOption,
         as_json: bool = o.JsonOption) -> None:
    """Show the first training examples as the model sees them, the trained tokens marked, and the counts."""
    import sys

    from qadapt.recipe import load_recipe
    from qadapt.actions.show_data import show_data

    with _user_errors():
        typer.echo(show_data(load_recipe(recipe, overrides or []), show, as_json, colour=sys.stdout.isatty()))


@app.command()
def plan(recipe: Path = o.RecipeArg, overrides: Optional[list[str]] = o.OverridesArg,
         gpu_memory: float = o.GpuMemoryOption, fsdp_gpus: int = o.FsdpGpusOption) -> None:
    """Predict a recipe's peak training memory from the model's config (no weights), and whether it fits."""
    from qadapt.training.plan import format_plan, plan_memory
    from qadapt.recipe import load_recipe

    with _user_errors():
        loaded = load_recipe(recipe, overrides or [])
        typer.echo(format_plan(plan_memory(loaded, gpu_memory, fsdp_gpus=fsdp_gpus), loaded))


@app.command()
def sweep(recipe: Path = o.RecipeArg, overrides: Optional[list[str]] = o.OverridesArg,
          grid: Optional[list[str]] = o.GridOption, out: Optional[Path] = o.SweepOutOption,
          baseline: bool = o.BaselineOption, eval_dtype: str = o.EvalDTypeOption,
          results: Optional[Path] = o.KeptResultsOption) -> None:
    """Train and score many runs of one recipe; the same command continues a stopped sweep."""
    from qadapt.actions.sweep import sweep as run_sweep

    with _user_errors():
        run_sweep(recipe, grid or [], overrides or [], out or Path("runs") / f"sweep-{recipe.stem}", baseline,
                  eval_dtype, results)


@app.command("eval")
def eval_command(target: str = o.TargetArg, data: Optional[list[str]] = o.EvalDataOption,
                 limit: Optional[int] = o.LimitOption, batch_size: int = o.EvalBatchOption,
                 max_new_tokens: int = o.MaxNewTokensOption, strict: bool = o.StrictOption,
                 out: Optional[Path] = o.EvalOutOption, quant: str = o.QuantOption,
                 template: Optional[str] = o.TemplateOption, compute_dtype: Optional[str] = o.DTypeOption,
                 resume: bool = o.EvalResumeOption, calculator: bool = o.CalculatorOption) -> None:
    """Accuracy on math sets, scored as the LLM-Adapters paper scores them; entity F1 for a tagging run."""
    from qadapt.inference.evaluate import run_eval

    with _user_errors():
        run_eval(target, data or [], limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
                 strict=strict, out=out, quant=quant, template=template, compute_dtype=compute_dtype, resume=resume,
                 calculator=calculator)


@app.command()
def generate(target: str = o.TargetArg, prompt: str = o.PromptArg, max_new_tokens: int = o.MaxNewTokensOption,
             quant: str = o.QuantOption, template: Optional[str] = o.TemplateOption,
             temperature: float = o.TemperatureOption, top_p: float = o.TopPOption, top_k: int = o.TopKOption,
             samples: int = o.SamplesOption, seed: int = o.SeedOption) -> None:
    """Answer one prompt with a trained adapter (or a bare model), greedily or sampled."""
    from qadapt.inference.answering import Answerer, sampling_of

    with _user_errors():
        sampling = sampling_of(temperature, top_p, top_k, samples, seed)
        answerer = Answerer(target, max_new_tokens, quant, template, sampling)
        answers = [answerer(prompt)] if sampling is None else answerer.samples(prompt)
        for number, answer in enumerate(answers, 1):
            typer.echo(f"--- sample {number} ---\n{answer}" if samples > 1 else answer)


@app.command()
def rationales(teacher: str = o.TeacherOption, data: list[str] = o.ProblemsOption, out: Path = o.RationalesOutOption,
               samples: int = o.TeacherSamplesOption, temperature: float = o.TeacherTemperatureOption,
               top_p: float = o.TopPOption, top_k: int = o.TopKOption, seed: int = o.SeedOption,
               split: str = o.SplitOption, limit: Optional[int] = o.LimitOption,
               max_new_tokens: int = o.MaxNewTokensOption, batch_size: int = o.TeacherBatchOption,
               quant: str = o.QuantOption, template: Optional[str] = o.TemplateOption,
               model: Optional[str] = o.EndpointModelOption, api_key_env: Optional[str] = o.ApiKeyEnvOption,
               concurrency: int = o.ConcurrencyOption, timeout: float = o.TimeoutOption,
               system: Optional[str] = o.SystemOption, pairs: bool = o.PairsOption) -> None:
    """Training data from a teacher: K sampled solutions per problem, kept when the answer is right (or, with
    --pairs, a right and a wrong one as a preference pair)."""
    from qadapt.decoding.sampling import Sampling
    from qadapt.inference.rationales import EndpointOptions, run_rationales

    with _user_errors():
        run_rationales(teacher, data, out, Sampling(temperature, top_p, top_k, samples, seed), split=split,
                       limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size, quant=quant,
                       template=template, endpoint=EndpointOptions(model, api_key_env, concurrency, timeout, system),
                       pairs=pairs)


@app.command()
def chat(target: str = o.TargetArg, max_new_tokens: int = o.MaxNewTokensOption, quant: str = o.QuantOption,
         template: Optional[str] = o.TemplateOption, history: bool = o.HistoryOption,
         temperature: float = o.TemperatureOption, top_p: float = o.TopPOption, top_k: int = o.TopKOption,
         seed: int = o.SeedOption) -> None:
    """Try an adapter interactively: each line you type is answered; an empty line or Ctrl-D ends."""
    from qadapt.inference.answering import Answerer, sampling_of

    with _user_errors():
        answer = Answerer(target, max_new_tokens, quant, template, sampling_of(temperature, top_p, top_k, 1, seed),
                          history)
        while prompt := _read_line("you> "):
            typer.echo(answer(prompt))


@app.command()
def report(runs: list[Path] = o.RunsArg, out: Optional[Path] = o.ReportOutOption,
           plot: Optional[Path] = o.PlotOption, json_out: Optional[Path] = o.JsonOutOption,
           against: Optional[list[str]] = o.AgainstOption) -> None:
    """Compare runs: kind, size, steps, time, loss and accuracy per set (with 95% intervals), as a markdown table."""
    from qadapt.actions.report import report as make_report

    with _user_errors():
        typer.echo(make_report(runs, out, plot, json_out, against or []))


@app.command()
def studio(runs: Path = o.StudioRunsOption, recipes: Path = o.StudioRecipesOption, host: str = o.StudioHostOption,
           port: int = o.StudioPortOption) -> None:
    """A local web page: runs with live curves, new runs from a form, stop and resume."""
    from qadapt.studio.server import serve

    with _user_errors():
        serve(runs, host, port, recipes)


@app.command()
def merge(run_dir: Path = o.RunArg, out: Path = o.MergeOutOption, dtype: str = o.MergeDTypeOption,
          base: str = o.MergeBaseOption) -> None:
    """Fold a LoRA / DoRA adapter into its base; write a verified standard Hugging Face folder."""
    from qadapt.export.merge import merge_run

    with _user_errors():
        merge_run(run_dir, out, dtype, base)


@app.command()
def export(run_dir: Path = o.RunArg, format: str = o.ExportFormatOption, out: Path = o.ExportOutOption,
           type: str = o.GgufTypeOption, base: str = o.MergeBaseOption) -> None:
    """Export a run's adapter for other tools: PEFT / vLLM (peft), llama.cpp (gguf) or Ollama (ollama)."""
    from qadapt.export import export_run

    with _user_errors():
        export_run(run_dir, format, out, type, base)


@app.command("import-peft")
def import_peft(peft_dir: Path = o.PeftDirArg, out: Path = o.NewRunOption, base: Optional[str] = o.PeftBaseOption,
                quant: str = o.RunQuantOption, template: str = o.RunTemplateOption) -> None:
    """Make a run directory from a PEFT LoRA adapter, for qadapt eval, generate, merge and export."""
    from qadapt.export.peft_format import import_peft as run_import

    with _user_errors():
        run_import(peft_dir, out, base, quant, template)


def _read_line(prompt: str) -> str:
    """A line typed at `prompt`, stripped; empty at the end of input (Ctrl-D)."""
    try:
        return input(prompt).strip()
    except EOFError:
        return ""


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
