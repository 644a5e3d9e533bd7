"""Holding a training stage at a moment, for tests that kill it there: no sleep, no poll, so the
kill lands at that moment however busy the machine is (`train.engine.HOLD_ENV`)."""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from pathlib import Path

from vinasmol_core.train.engine import HOLD_ENV


class StageHold:
    """A named pipe that stage `stage` writes to after step `step` (and its train-state, when one is
    due), and then waits there until it is killed. Pass `env` to the process that runs the stage."""

    def __init__(self, folder: Path, stage: str, step: int) -> None:
        self.fifo = folder / f"hold-{uuid.uuid4().hex[:8]}"
        os.mkfifo(self.fifo)
        self.env = {HOLD_ENV: f"{stage}:{step}:{self.fifo}"}
        self.expected = f"{stage} {step}"

    def wait(self, proc: subprocess.Popen) -> None:
        """Block until the stage holds, or fail if `proc` ends first."""

        def wake_on_exit() -> None:
            proc.wait()
            fd = os.open(self.fifo, os.O_RDWR | os.O_NONBLOCK)  # never blocks; wakes the reader
            os.write(fd, b"exited\n")
            os.close(fd)

        threading.Thread(target=wake_on_exit, daemon=True).start()
        with open(self.fifo, encoding="utf-8") as fifo:
            got = fifo.readline().strip()
        assert got == self.expected, f"the process ended (exit {proc.returncode}) before {self.expected}"
