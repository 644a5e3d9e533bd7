"""Peak memory of work in progress: the resident memory of this process and all its descendants,
sampled by a thread (Linux `/proc`; elsewhere this process's own peak), and the training process's
own peaks for its stage summary."""

from __future__ import annotations

import os
import resource
import sys
import threading
from collections.abc import Collection
from pathlib import Path
from types import TracebackType

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def child_pids(root: int | None = None) -> set[int]:
    """The direct children of a process (Linux; empty elsewhere)."""
    if not sys.platform.startswith("linux"):
        return set()
    return set(_children_map().get(os.getpid() if root is None else root, []))


def tree_rss_bytes(root: int | None = None, skip: Collection[int] = ()) -> int:
    """Resident bytes of a process and all its descendants except the subtrees of `skip` (Linux);
    this process's peak elsewhere."""
    if not sys.platform.startswith("linux"):
        return own_peak_rss_bytes()
    root = os.getpid() if root is None else root
    children, total, todo = _children_map(), 0, [root]
    while todo:
        pid = todo.pop()
        if pid in skip:
            continue
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            continue
        todo.extend(children.get(pid, []))
    return total


def own_peak_rss_bytes() -> int:
    """This process's peak resident memory since it started (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """`with PeakMemory() as peak: ...` then `peak.bytes`: the highest resident memory of this
    process and the processes it started inside the block (children that existed before, such as
    a local server, are left out), sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.bytes = 0
        self._skip: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)

    def _sample(self) -> None:
        while True:
            self.bytes = max(self.bytes, tree_rss_bytes(skip=self._skip))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakMemory:
        self._skip = child_pids()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.bytes = max(self.bytes, tree_rss_bytes(skip=self._skip))


def training_process_peaks() -> dict[str, float | str]:
    """What a training process reports at its end: its peak host memory, on CUDA its peak GPU
    memory, and the device it ran on."""
    import torch

    peaks: dict[str, float | str] = {"peak_host_mb": round(own_peak_rss_bytes() / 2**20, 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        peaks["device"] = f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    else:
        peaks["device"] = f"cpu ({torch.get_num_threads()} threads)"
    return peaks
