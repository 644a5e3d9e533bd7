"""The root `vinasmol` app: every command group of the library, and how an app is run."""

from __future__ import annotations

import sys

import typer

from vinasmol_core.cli import data, model, store, tokenizer, train
from vinasmol_core.common.errors import VinaSmolError

app = typer.Typer(
    no_args_is_help=True, help="VinaSmol: teach SmolLM2 Vietnamese.", pretty_exceptions_enable=False
)
app.add_typer(store.app, name="store")
app.add_typer(tokenizer.app, name="tokenizer")
app.add_typer(model.app, name="model")
app.add_typer(data.app, name="data")
app.add_typer(train.app, name="train")
app.command("export")(model.export_command)
app.add_typer(model.eval_app, name="eval")


def run_app(typer_app: typer.Typer) -> None:
    """Run a Typer app, turning VinaSmolError into a one-line message and exit status 1."""
    try:
        typer_app(standalone_mode=False)
    except VinaSmolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:
        # Usage errors: click's exceptions, which typer may vendor under another module name.
        show, exit_code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(exit_code, int):
            show()
            sys.exit(exit_code)
        raise


def main() -> None:
    run_app(app)
