"""Peak memory of a block of work: this process and the processes it starts, not older children."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from vinasmol_core.common.memory import PeakMemory, child_pids, tree_rss_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

HOLD = ("import time; b = bytearray({n}); b[::4096] = b'x' * len(b[::4096]); "
        "print('ready', flush=True); time.sleep({t})")


def _hold(megabytes: int, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(n=megabytes << 20, t=seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_peak_counts_a_child_started_inside_the_block() -> None:
    base = tree_rss_bytes(skip=child_pids())  # this process alone, as the block starts
    with PeakMemory(interval=0.05) as peak:
        child = _hold(300, 0.5)
        child.wait()
    assert peak.bytes - base > 250 << 20


def test_peak_leaves_out_children_that_were_already_running() -> None:
    server = _hold(300, 30)  # like a local Prefect server started before the step
    try:
        with PeakMemory(interval=0.05) as peak:
            time.sleep(0.3)
        assert peak.bytes < tree_rss_bytes() - (250 << 20)
    finally:
        server.kill()
        server.wait()
