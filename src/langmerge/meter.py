"""Measuring what a job costs: CPU seconds, device, peak memory (the figures of a ledger row)."""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from langmerge.processes import world_size


@dataclass(frozen=True)
class Cost:
    """What a job consumed, measured by the caller."""

    cpu_s: float = 0.0
    device_kind: str = "cpu"
    device_count: int = 1
    tokens: int = 0
    examples: int = 0
    peak_memory_bytes: int = 0
    flops: float = 0.0


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


class Meter:
    """Started when a job starts; `cost(...)` gives its ledger figures.

    Peak memory is the device's peak allocation on a GPU, else the process's peak resident
    memory since the meter started (Linux resets it per job; elsewhere it is the process's
    peak so far)."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.cpu0 = time.process_time()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_peak_rss()

    def cost(self, tokens: int = 0, examples: int = 0, flops: float = 0.0) -> Cost:
        if self.cuda:
            kind, count = torch.cuda.get_device_name(), 1
            peak = torch.cuda.max_memory_allocated()
        else:
            kind, count = "cpu", 1
            peak = _peak_rss()
        count *= world_size()  # the processes of a distributed job
        return Cost(
            cpu_s=time.process_time() - self.cpu0,
            device_kind=kind,
            device_count=count,
            tokens=tokens,
            examples=examples,
            peak_memory_bytes=peak,
            flops=flops,
        )


def _reset_peak_rss() -> None:
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")  # resets VmHWM, the peak resident set size


def _peak_rss() -> int:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
