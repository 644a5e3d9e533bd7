"""A user's error met inside a run (`VinaSmolError`: a missing field, an unreadable shard...) ends the
task and the flow with its message alone; a bug keeps its traceback."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
from prefect import flow, task

import tasks.common  # noqa: F401 - installs the filter, as every task module does
from vinasmol_core.common.errors import VinaSmolError


@task(persist_result=False)
def _read_corpus(kind: str) -> str:
    if kind == "user":
        raise VinaSmolError("source 'viwiki': row 1 has no field 'txt' (fields: id, text); set text_field")
    raise RuntimeError("a bug: index out of range")


@flow(persist_result=False)
def _tiny_flow(kind: str) -> str:
    return _read_corpus(kind)


@pytest.fixture
def run_log() -> Iterator[io.StringIO]:
    """Every line Prefect's loggers write during the test, formatted with tracebacks."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    logger = logging.getLogger("prefect")
    logger.addHandler(handler)
    try:
        yield out
    finally:
        logger.removeHandler(handler)


def test_a_user_error_ends_the_task_and_flow_with_its_message_alone(prefect_server, run_log) -> None:
    state = _tiny_flow("user", return_state=True)
    assert state.is_failed() and "has no field 'txt'" in state.message
    log = run_log.getvalue()
    assert "Task run failed with exception: VinaSmolError(\"source 'viwiki': row 1 has no field 'txt'" in log
    assert "Encountered exception during execution" in log
    assert "Traceback" not in log, log


def test_a_bug_keeps_its_traceback(prefect_server, run_log) -> None:
    state = _tiny_flow("bug", return_state=True)
    assert state.is_failed()
    log = run_log.getvalue()
    assert "RuntimeError: a bug: index out of range" in log and log.count("Traceback") >= 2, log
