"""Timing, statistics, peak memory and the machine description shared by the benchmarks.

Variants are always timed *alternately* (one call of each per round, the order rotated every
round), so that a slow minute on a shared machine hits every variant alike, and a ratio can
be taken round by round as well as between medians.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

__all__ = [
    "Clock",
    "alternate",
    "environment",
    "load_average",
    "paired_ratio",
    "peak_memory",
    "summarize",
    "timing_summary",
]


class Clock:
    """Time of one call, in seconds: CUDA events on a GPU, ``perf_counter`` on a CPU.

    On CUDA the queue is drained before the start event, so the start event runs at once and
    the elapsed time covers the launches as well as the kernels of the call. On a CPU the
    process CPU time (``process_time``, all threads) is taken as well: on a shared machine
    it does not count the time the benchmark waits for a core, which wall time does.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object]) -> tuple[float, float | None]:
        """Wall time and, on a CPU, process CPU time of ``fn()``."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, None
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - wall, time.process_time() - cpu


def alternate(
    variants: Mapping[str, Callable[[], object]], rounds: int, warmup: int, clock: Clock
) -> dict[str, dict[str, list[float]]]:
    """Time each variant ``rounds`` times, one call of each per round, after ``warmup`` rounds.

    Round ``r`` starts with variant ``r mod k``, so no variant always runs first (after a
    pause) or last. Returns ``{"wall": {name: seconds per round}, "process": ...}``, the
    latter only on a CPU.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    clock.synchronize()
    wall: dict[str, list[float]] = {name: [] for name in names}
    process: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed, cpu = clock.time(variants[name])
            wall[name].append(elapsed)
            if cpu is not None:
                process[name].append(cpu)
    return {"wall": wall, "process": process} if not clock.cuda else {"wall": wall}


def timing_summary(samples: dict[str, dict[str, list[float]]], name: str) -> dict[str, Any]:
    """The wall-time summary of variant ``name`` (``times_s`` and statistics), with the
    process-CPU-time one under ``"process"`` where it was taken."""
    stats: dict[str, Any] = {"times_s": samples["wall"][name], **summarize(samples["wall"][name])}
    if "process" in samples:
        stats["process"] = {"times_s": samples["process"][name], **summarize(samples["process"][name])}
    return stats


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of sorted values (numpy's default method)."""
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """Median, quartiles, interquartile range, min and max of a sample."""
    if not values:
        raise ValueError("summarize needs at least one value")
    ordered = sorted(values)
    q1, q3 = _quantile(ordered, 0.25), _quantile(ordered, 0.75)
    return {
        "n": len(ordered),
        "median": _quantile(ordered, 0.5),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "min": ordered[0],
        "max": ordered[-1],
    }


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, float | int]:
    """Summary of the round-by-round ratios (both samples come from the same rounds)."""
    return summarize([a / b for a, b in zip(numerator, denominator, strict=True)])


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict[str, object]:
    """Peak memory of one call of ``fn``.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; reported as
    the absolute peak and as the peak above what was allocated when the call started (the
    part the call itself needs; the absolute value also counts every model the benchmark
    holds).

    CPU: the largest running sum of the allocations and frees that torch's CPU allocator
    reports to ``torch.profiler`` (``profile_memory=True``) during the call, i.e. the peak of
    tensor bytes above those live at the start (read from the profiler's kineto events).
    Memory that does not go through that allocator (the Python heap, buffers a backend
    allocates itself) is not seen, and there is no absolute value.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"method": "torch.cuda.max_memory_allocated", "peak_bytes": peak, "call_peak_bytes": peak - before}
    if device.type != "cpu":
        return {"method": "n/a", "peak_bytes": None, "call_peak_bytes": None}
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:  # the raw allocation events are not public API: report n/a rather than fail if they move
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
        )
    except AttributeError:
        return {"method": "n/a (torch.profiler memory events unavailable)", "peak_bytes": None, "call_peak_bytes": None}
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return {"method": "torch.profiler CPU allocator events", "peak_bytes": None, "call_peak_bytes": peak}


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, object]:
    """The machine and software versions, for the result file and the README."""
    info: dict[str, object] = {
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": _package_version("torchvision"),
        "kornia": _package_version("kornia"),
        "attn_consistency": _package_version("attn_consistency"),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (as ``uptime``), where the OS gives them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
