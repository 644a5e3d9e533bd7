"""The step watchdog of a stage process: a rank that completes no optimizer step within the step
timeout is ended, with a message naming the stage, the step, the rank and what it was doing.

A hung rank (a data read that never returns, a peer that died inside a collective, a GPU that
stopped answering) otherwise keeps its process alive and beating while the GPUs idle. The watchdog
is a daemon thread; the training loop marks each phase of a step (`phase`) and each completed
step (`completed`). When the deadline passes, the thread prints the stage's error line and ends
the process with `EXIT_CODE`; torchrun then ends the other ranks, and a re-run (the pipeline's
retry) resumes from the newest train-state. The deadline: `step_timeout` seconds when the spec
sets it, else 10 x the median step time so far, never under `DEFAULT_FLOOR_S`.

Only a stage process arms it: a stage trained inside the caller's process (the test suite's
in-process runner) must never end its caller.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable

from vinasmol_core.train.metrics import ERROR_PREFIX

DEFAULT_FLOOR_S = 600.0
"""The least an automatic deadline allows: 10 minutes (the first step compiles, a checkpoint uploads)."""
MEDIAN_FACTOR = 10.0
EXIT_CODE = 75
"""The exit status of a rank the watchdog ended."""
ERROR_TYPE = "StepTimeout"


class StepWatchdog:
    """Watches one rank. `start()` arms it; the loop calls `phase(name, step)` as a step goes from
    data to forward/backward to the optimizer, `completed(step, seconds)` after each update, and
    `stop()` once training is over."""

    def __init__(
        self,
        stage: str,
        rank: int,
        total_steps: int,
        step_timeout: float | None,
        on_expire: Callable[[str], None],
    ) -> None:
        self.stage, self.rank, self.total_steps = stage, rank, total_steps
        self.step_timeout = step_timeout
        self.on_expire = on_expire
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._times: list[float] = []
        self._last_progress = time.monotonic()
        self._last_done = 0
        self._step = 1
        self._phase = "setup"
        self._thread: threading.Thread | None = None

    def limit(self) -> float:
        """Seconds allowed between two completed steps."""
        if self.step_timeout is not None:
            return self.step_timeout
        if not self._times:
            return DEFAULT_FLOOR_S
        return max(DEFAULT_FLOOR_S, MEDIAN_FACTOR * statistics.median(self._times))

    def start(self, first_step: int) -> None:
        with self._lock:
            self._last_done, self._step = first_step, first_step + 1
            self._last_progress = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
        self._thread.start()

    def phase(self, name: str, step: int) -> None:
        with self._lock:
            self._phase, self._step = name, step

    def completed(self, step: int, seconds: float) -> None:
        with self._lock:
            self._times.append(seconds)
            self._last_done, self._step, self._phase = step, step + 1, "after the optimizer step"
            self._last_progress = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while True:
            with self._lock:
                remaining = self._last_progress + self.limit() - time.monotonic()
            if remaining <= 0:
                self.on_expire(self.message())
                return
            if self._stop.wait(remaining):
                return

    def message(self) -> str:
        with self._lock:
            waited = time.monotonic() - self._last_progress
            how = "the step_timeout" if self.step_timeout is not None else "10 x the median step time"
            return (
                f"stage {self.stage}: rank {self.rank}: no optimizer step completed in {waited:.0f} s "
                f"(limit {self.limit():.0f} s, {how}): step {self._step} of {self.total_steps} hung in "
                f"{self._phase}; the stage was ended, and a re-run resumes from its newest train-state "
                f"(the last completed step was {self._last_done})"
            )


def end_process(message: str) -> None:
    """What an expired watchdog does in a stage process: the error line for the parent, then exit
    at once (the main thread is stuck, so no exception can reach it)."""
    print(ERROR_PREFIX + json.dumps({"type": ERROR_TYPE, "message": message}), flush=True)
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_CODE)
