"""The `vinasmol` entry point: the library's commands plus the pipeline's (run, demo, recipe)."""

from __future__ import annotations

from vinasmol_core.cli import app, run_app


def main() -> None:
    run_app(app)
