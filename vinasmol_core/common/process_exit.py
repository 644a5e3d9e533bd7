"""Ending a command-line process without the interpreter's teardown."""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable
from typing import NoReturn


def exit_process(code: int) -> NoReturn:
    """Run the atexit handlers (logging, Prefect's log and event workers), flush stdout and stderr,
    then end the process at once. Python's own teardown would then free every module's objects one
    by one: 2 to 3 s of CPU once torch, transformers and litgpt are loaded, for memory the OS
    reclaims anyway. Only for entry points: never call it from library code or tests."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def run_entry_point(main: Callable[[], object]) -> NoReturn:
    """Call `main` as a console script would, then `exit_process` with its status."""
    try:
        result = main()
        code = result if isinstance(result, int) else 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    exit_process(code)
