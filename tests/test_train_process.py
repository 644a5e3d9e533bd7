"""The stage process's entry point reading its job from the environment (how a JobSet pod gets it)."""

from __future__ import annotations

import json

import pytest

from vinasmol_core.train.metrics import ERROR_PREFIX
from vinasmol_core.train.process import main


def _error(capsys: pytest.CaptureFixture[str]) -> dict:
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(ERROR_PREFIX)]
    return json.loads(line[len(ERROR_PREFIX):])


def test_job_env_names_the_variable_when_unset_or_invalid(monkeypatch, capsys) -> None:
    monkeypatch.delenv("VINASMOL_JOB", raising=False)
    assert main(["--job-env", "VINASMOL_JOB"]) == 1
    error = _error(capsys)
    assert error["type"] == "ConfigError" and "VINASMOL_JOB" in error["message"]

    monkeypatch.setenv("VINASMOL_JOB", json.dumps({"spec": {"name": "s"}, "dataset": "d"}))
    assert main(["--job-env", "VINASMOL_JOB"]) == 1
    error = _error(capsys)
    assert error["type"] == "ConfigError" and "$VINASMOL_JOB" in error["message"]


def test_job_file_and_job_env_are_exclusive(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--job", "job.json", "--job-env", "VINASMOL_JOB"])
