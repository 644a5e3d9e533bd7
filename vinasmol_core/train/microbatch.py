"""The micro-batch search of a smoke run: the largest micro-batch that fits the device with room to spare.

After its two smoke steps, a one-device stage with `micro_batch_search` set runs one forward and
backward pass per candidate micro-batch at the full run's sequence length (powers of two, up to the
per-device batch and dividing it), on random token ids, gradients discarded, weights untouched. It
keeps the largest candidate whose peak memory leaves `HEADROOM` of the device free and measures its
tokens/s (the forward and backward pass only: the optimizer's share of a step is left out, so it is
an upper bound).

Peak memory on CUDA: the allocator's peak (`torch.cuda.max_memory_allocated`), a candidate that
raises an out-of-memory error does not fit. On the CPU there is no allocator to ask, so the search
runs only with a capacity given in `$VINASMOL_DEVICE_MEMORY` (bytes; how the tests inject a limit)
and counts the bytes that stay resident: parameters, gradients and optimizer state, plus every
tensor autograd saves for the backward pass (the activations).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from vinasmol_core.common.errors import ConfigError

MEMORY_ENV = "VINASMOL_DEVICE_MEMORY"
HEADROOM = 0.10


@dataclass
class Trial:
    micro_batch: int
    peak_bytes: int | None  # None: out of memory
    fits: bool
    seconds: float | None


def candidates(per_device_batch: int, start: int = 1) -> list[int]:
    """Powers of two from `start` up to the per-device batch that divide it."""
    out, m = [], 1
    while m <= per_device_batch:
        if m >= start and per_device_batch % m == 0:
            out.append(m)
        m *= 2
    return out


def device_capacity(device: torch.device) -> int | None:
    """Bytes the search may fill: `$VINASMOL_DEVICE_MEMORY` when set, else a CUDA device's total
    memory; None on the CPU without it (no search)."""
    value = os.environ.get(MEMORY_ENV)
    if value:
        try:
            return int(float(value))
        except ValueError:
            raise ConfigError(f"${MEMORY_ENV}={value!r}: give the device's memory in bytes") from None
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


def resident_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def measure(
    run_pass: Callable[[int], None], micro_batch: int, device: torch.device, static_bytes: int
) -> tuple[int | None, float]:
    """Peak bytes of one `run_pass(micro_batch)` (None when it ran out of memory) and its seconds."""
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        if device.type == "cuda":
            run_pass(micro_batch)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
        else:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                run_pass(micro_batch)
            peak = static_bytes + saved[0]
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None, time.perf_counter() - t0
    return peak, time.perf_counter() - t0


def search(
    run_pass: Callable[[int], None],
    per_device_batch: int,
    device: torch.device,
    capacity: int,
    static_bytes: int,
    on_trial: Callable[[Trial], None] | None = None,
) -> tuple[int | None, list[Trial]]:
    """Try the candidates upward; stop at the first that does not fit. Returns the largest that fits
    (None when not even one sequence does) and every trial."""
    budget = (1.0 - HEADROOM) * capacity
    trials: list[Trial] = []
    chosen = None
    for m in candidates(per_device_batch):
        peak, seconds = measure(run_pass, m, device, static_bytes)
        fits = peak is not None and peak <= budget
        trial = Trial(m, peak, fits, seconds if fits else None)
        trials.append(trial)
        if on_trial is not None:
            on_trial(trial)
        if not fits:
            break
        chosen = m
    return chosen, trials


def search_event(
    stage: str, seq_len: int, capacity: int, chosen: int | None, trials: list[Trial], timed: float | None
) -> dict[str, Any]:
    """The metrics event of a search: every trial, the choice, its tokens/s and its `--set` line."""
    tps = chosen * seq_len / timed if chosen and timed else None
    return {
        "event": "micro_batch_search",
        "stage": stage,
        "seq_len": seq_len,
        "capacity_bytes": capacity,
        "headroom": HEADROOM,
        "trials": [asdict(t) for t in trials],
        "chosen": chosen,
        "tokens_per_s": tps,
        "set": f"stages[{stage}].micro_batch={chosen}" if chosen else None,
    }
