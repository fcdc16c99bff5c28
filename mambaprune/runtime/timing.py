"""Wall-clock timing of variants interleaved round robin: the one way the benchmarks and the demo time.

Timing one variant after the other turns a neighbour's burst of work into a false speed-up or
slow-down of whichever variant ran meanwhile (the demo once printed 0.11x on a busy machine and
1.14x on an idle one). Here every round calls each variant once (or a short burst of back-to-back
calls, for calls of a millisecond), the best time of each variant is kept, and the CPU time that
other processes took meanwhile is measured from /proc/stat and returned with the times, so that a
caller can measure a block again or say that its numbers are unreliable.

    timings = interleaved({"dense": lambda: model(x), "pruned": lambda: pruned(x)}, rounds=5)
    timings.ms["dense"] / timings.ms["pruned"], timings.others_cpu_share
"""
from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Mapping

import torch


def cpu_description() -> str:
    """'<CPU model>, <n> cores, torch <version> with <n> threads, ATen CPU capability <isa>'."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor() or "cpu")
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}")


@dataclass(frozen=True)
class Timings:
    """Best wall time in ms per variant, and the share of the machine's CPU time others took meanwhile."""

    ms: dict
    others_cpu_share: float  # in [0, 1]; NaN where /proc/stat is not readable
    attempts: int = 1


def busy_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process); NaN without /proc/stat."""
    own = os.times()
    try:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:9]]
    except OSError:
        return math.nan, own.user + own.system
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def others_share(before: tuple[float, float], after: tuple[float, float], wall_s: float) -> float:
    """Fraction of the machine's CPU time (all cores) used by other processes between two busy_seconds()."""
    others = (after[0] - before[0]) - (after[1] - before[1])
    if math.isnan(others):
        return math.nan
    return max(0.0, others) / (wall_s * (os.cpu_count() or 1)) if wall_s > 0 else 0.0


def burst_ms(call: Callable[[], object], fill_ms: float, sync: Callable[[], None]) -> float:
    """Best ms of back-to-back calls filling fill_ms (one call when it alone takes longer)."""
    best, spent = math.inf, 0.0
    while True:
        start = time.perf_counter()
        call()
        sync()
        elapsed = (time.perf_counter() - start) * 1e3
        best, spent = min(best, elapsed), spent + elapsed
        if spent >= fill_ms:
            return best


def round_robin(calls: Mapping[Hashable, Callable[[], object]], rounds: int, warmup: int = 1,
                fill_ms: float = 0.0, sync: Callable[[], None] = lambda: None) -> dict:
    """Best ms of each call over `rounds` rounds of one burst each, after `warmup` untimed rounds."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1; got {rounds}")
    best = {name: math.inf for name in calls}
    for round_ in range(warmup + rounds):
        for name, call in calls.items():
            elapsed = burst_ms(call, fill_ms, sync)
            if round_ >= warmup:
                best[name] = min(best[name], elapsed)
    return best


def interleaved(calls: Mapping[Hashable, Callable[[], object]], rounds: int, *, warmup: int = 1,
                fill_ms: float = 0.0, sync: Callable[[], None] = lambda: None, attempts: int = 1,
                others_max: float = 0.1, wait_s: float = 20.0) -> Timings:
    """Best ms of each call, timed round robin (see the module docstring).

    A block during which other processes took more than `others_max` of the machine's CPU time is
    measured again, up to `attempts` blocks `wait_s` apart; the last one is returned regardless,
    with the share others took, for the caller to report.
    """
    for attempt in range(1, attempts + 1):
        wall, before = time.perf_counter(), busy_seconds()
        ms = round_robin(calls, rounds, warmup, fill_ms, sync)
        share = others_share(before, busy_seconds(), time.perf_counter() - wall)
        if not share > others_max or attempt == attempts:  # NaN (unknown) is not retried
            return Timings({name: round(v, 4) for name, v in ms.items()}, round(share, 3), attempt)
        time.sleep(wait_s)
    raise AssertionError("unreachable")
