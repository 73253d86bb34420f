"""The bench's one timing function (side by side, warm-up, medians), peak memory, and the matmul rate yardstick."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    q1_ms: float  # first and third quartiles: the spread
    q3_ms: float
    min_ms: float
    repeats: int

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q3_ms - self.q1_ms) / self.median_ms

    def as_dict(self) -> dict:
        return asdict(self)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    warmup: int,
    repeats: int,
    on_round: Callable[[], None] = lambda: None,
) -> dict[str, Timing]:
    """Time each callable ``repeats`` times, round-robin, after ``warmup`` calls of each.

    Round-robin spreads load from other processes over all callables alike,
    which a back-to-back loop per callable would not.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _synchronize(device)
            start = time.perf_counter()
            fn()
            _synchronize(device)
            samples[name].append((time.perf_counter() - start) * 1e3)
        on_round()
    result = {}
    for name, ms in samples.items():
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0],) * 3
        result[name] = Timing(statistics.median(ms), q1, q3, min(ms), len(ms))
    return result


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null: kineto, behind torch.profiler, logs its start and stop there."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Largest amount of memory ``fn`` holds at once beyond what was allocated before it ran.

    GPU: torch.cuda.max_memory_allocated. CPU: the allocation and free events
    that torch.profiler records with profile_memory=True, summed in time order;
    the running sum's maximum is the peak (every CPU tensor allocation goes
    through the profiled allocator).
    """
    if device.type == "cuda":
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def collect(node):
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            collect(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        collect(root)
    held = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        held += size
        peak = max(peak, held)
    return peak


def matmul_yardstick(dtype: torch.dtype, device: torch.device) -> tuple[Callable[[], object], float]:
    """(one n x n x n product, its FLOPs): the roofline yardstick, n doubled from 512 until one takes
    50 ms (a GEMM that slow is compute-bound) or n reaches 8192. Time it beside what it measures."""
    n = 512
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        product = partial(torch.matmul, a, b)
        timing = time_side_by_side({"matmul": product}, device, warmup=1, repeats=1)["matmul"]
        if timing.median_ms >= 50 or n >= 8192:
            return product, 2.0 * n**3
        n *= 2
