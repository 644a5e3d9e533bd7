"""Holding a training stage at a moment, for tests and the fault bench that kill it there: no sleep
and no poll, so the kill lands at that moment however busy the machine is.

$VINASMOL_HOLD_AT="<stage>:<step>:<fifo>": after that step (and its train-state, when one is due) the
stage writes "<stage> <step>" to the named pipe and waits there until it is killed. Never part of a
cache key."""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from pathlib import Path

HOLD_ENV = "VINASMOL_HOLD_AT"
HOLD_UPLOAD_ENV = "VINASMOL_HOLD_UPLOAD"
"""The same for a background upload: its train-state's files written and nothing of it in the store."""
HOLD_IN_STEP_ENV = "VINASMOL_HOLD_IN_STEP"
"""The same inside a step, on one rank: "<stage>/rank<r>:<step>:<fifo>" holds rank r as it reads the
first micro-batch of that step (a hung rank: the others wait for it in the step's collectives)."""


def hold_requested(env: str, stage: str, step: int) -> str | None:
    """The named pipe of the hold `$env` = "<stage>:<step>:<fifo>" at this stage and step, or None."""
    value = os.environ.get(env, "")
    rest, _, fifo = value.rpartition(":")
    name, _, at = rest.rpartition(":")
    if not value or name != stage or at != str(step):
        return None
    return fifo


def hold_for_a_kill(stage: str, step: int, env: str = HOLD_ENV) -> None:
    """The stage's side: announce the moment on the pipe, then wait to be killed."""
    fifo = hold_requested(env, stage, step)
    if fifo is None:
        return
    with open(fifo, "w", encoding="utf-8") as pipe:  # opens once the other side listens
        pipe.write(f"{stage} {step}\n")
    threading.Event().wait()


class StageHold:
    """The killer's side: a named pipe in `folder` for stage `stage` after step `step`. Pass `env`
    to the process that runs the stage, `wait` for the moment, kill, then `close`."""

    def __init__(self, folder: Path, stage: str, step: int, env: str = HOLD_ENV) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.stage, self.step = stage, step
        self.fifo = folder / f"hold-{uuid.uuid4().hex[:8]}"
        os.mkfifo(self.fifo)
        self.env = {env: f"{stage}:{step}:{self.fifo}"}
        self.expected = f"{stage} {step}"

    def wait(self, proc: subprocess.Popen | threading.Thread) -> bool:
        """Block until the stage holds (True), or until `proc` (a process, or the thread that runs
        the stage) ends first (False)."""

        def wake_on_exit() -> None:
            proc.wait() if isinstance(proc, subprocess.Popen) else proc.join()
            fd = os.open(self.fifo, os.O_RDWR | os.O_NONBLOCK)  # never blocks; wakes the reader
            os.write(fd, b"exited\n")
            os.close(fd)

        threading.Thread(target=wake_on_exit, daemon=True).start()
        with open(self.fifo, encoding="utf-8") as pipe:
            return pipe.readline().strip() == self.expected

    def close(self) -> None:
        self.fifo.unlink(missing_ok=True)
