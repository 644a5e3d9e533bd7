"""Running the `vinasmol` console in-process, as a test sees it: exit code, stdout, stderr."""

from __future__ import annotations

import sys

import pytest


def run_vinasmol(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str
) -> tuple[int, str, str]:
    from flows.cli import main

    monkeypatch.setattr(sys, "argv", ["vinasmol", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
