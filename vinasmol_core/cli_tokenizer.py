"""`vinasmol tokenizer ...` commands."""

import typer

app = typer.Typer(no_args_is_help=True, help="tokenizer commands")
