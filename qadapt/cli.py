"""The `qadapt` command: parses arguments, calls an action, turns user errors into one clear line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qadapt.errors import QadaptError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Quantized, low-resource fine-tuning with LoRA, Series and Parallel adapters.",
)
RecipeArg = typer.Argument(..., help="Recipe YAML file, e.g. recipes/quickstart.yaml.", show_default=False)
OverridesArg = typer.Argument(None, help="Overrides as section.key=value, e.g. train.lr=1e-4 model.quant=int8.")


@app.callback()
def main() -> None:
    """qadapt: train adapters on a frozen 4-bit/8-bit base model."""


@app.command()
def train(recipe: Path = RecipeArg, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Train the adapter a recipe describes; writes a self-describing run directory."""
    from qadapt.recipe import load_recipe
    from qadapt.train import train as run_training

    with _user_errors():
        run_training(load_recipe(recipe, overrides or []))


@app.command()
def check(recipe: Path = RecipeArg, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Validate a recipe (with overrides) and print it resolved, without loading anything."""
    import yaml

    from qadapt.recipe import load_recipe

    with _user_errors():
        typer.echo(yaml.safe_dump(load_recipe(recipe, overrides or []).to_dict(), sort_keys=False), nl=False)


class _user_errors:
    """Print a QadaptError as `error: ...` on stderr and exit 2; anything else is a bug and shows."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if isinstance(error, QadaptError):
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2)
        if isinstance(error, KeyboardInterrupt):
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)
        return False
