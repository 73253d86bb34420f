"""The microbenchmark loop: for each workload, compare every implementation with the reference, then time the
passing ones side by side."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..accuracy import accuracy_failure
from ..dtypes import dtype_name
from .implementations import BASELINES, FLOOR, REFERENCE, Implementation, evaluate, implementations
from .timing import matmul_yardstick, peak_memory_bytes, time_side_by_side
from .workloads import Problem, Workload, make_problem


def pass_callable(fn: Callable[[], torch.Tensor], problem: Problem, pass_: str) -> Callable[[], object]:
    """``fn`` as one timed call: the forward without autograd, or the forward and its backward."""
    if pass_ == "fwd":

        def forward():
            with torch.no_grad():
                return fn()

        return forward

    def forward_backward():
        return torch.autograd.grad(fn(), problem.leaves, problem.grad_out, allow_unused=True)

    return forward_backward


def set_threads(device: torch.device, threads: int) -> None:
    if device.type == "cpu":
        torch.set_num_threads(threads)


class Microbench:
    """Runs workloads and collects one flat record per (workload, pass, threads, implementation)."""

    def __init__(
        self,
        names: Sequence[str],
        passes: Sequence[str],
        threads: Sequence[int],
        warmup: int,
        repeats: int,
        measure_memory: bool = True,
        extra: dict[str, Implementation] = None,
    ):
        self.names, self.passes, self.threads = list(names), list(passes), list(threads)
        self.warmup, self.repeats, self.measure_memory = warmup, repeats, measure_memory
        self.extra = extra or {}  # implementations beyond the registry's (the tests' deliberately wrong one)
        self.matmul_rates: dict[str, float] = {}  # the best rate each yardstick reached, by dtype (and threads)
        self._yardsticks: dict[str, tuple[Callable[[], object], float]] = {}

    def implementations(self, workload: Workload) -> dict[str, Implementation]:
        every = {**implementations(workload.device.type, workload.dtype), **self.extra}
        return {name: every[name] for name in self.names if name in every}

    def steps(self, workload: Workload) -> int:
        """Progress units of one workload: one per comparison with the reference, one per timing round."""
        return len(self.implementations(workload)) + len(self.threads) * len(self.passes) * self.repeats

    def yardsticks(self, workload: Workload, threads: int) -> dict[str, tuple[Callable[[], object], float]]:
        """Large matmuls in the workload's dtype and in float32 (where a CPU's bf16 GEMM is a slow path, as in
        this torch build's, float32 is what a kernel can reach), by key: (one product, its FLOPs)."""
        found = {}
        for dtype in dict.fromkeys((workload.dtype, torch.float32)):
            name = dtype_name(dtype)
            key = f"{name}, {threads} threads" if workload.device.type == "cpu" else name
            if key not in self._yardsticks:
                self._yardsticks[key] = matmul_yardstick(dtype, workload.device)
            found[key] = self._yardsticks[key]
        return found

    def compare_all(self, workload: Workload, problem: Problem, advance: Callable[[int], None]) -> tuple[dict, ...]:
        """(name -> built callable of each within the accuracy rule, name -> why refused, name -> why not run)."""
        backward = "fwd+bwd" in self.passes
        reference = BASELINES[REFERENCE]
        exact_problem = make_problem(workload, torch.float64)
        exact = evaluate(reference.build(exact_problem), exact_problem, backward)
        same_precision = evaluate(reference.build(problem), problem, backward)
        names = ["out"] + problem.leaf_names

        passing, refused, not_run = {}, {}, {}
        for name, impl in self.implementations(workload).items():
            why_not = impl.why_not(workload.device)
            if why_not is not None:
                not_run[name] = why_not
                advance(1)
                continue
            fn = impl.build(problem)
            problem_found = None
            if impl.compared_to_reference:
                problem_found = accuracy_failure(
                    evaluate(fn, problem, backward), exact, same_precision, names, workload.dtype
                )
            if problem_found is None:
                passing[name] = fn
            else:
                refused[name] = problem_found
            advance(1)
        return passing, refused, not_run

    def run(self, workload: Workload, advance: Callable[[int], None] = lambda n: None) -> list[dict]:
        problem = make_problem(workload)
        passing, refused, not_run = self.compare_all(workload, problem, advance)
        records = []
        for threads in self.threads:
            set_threads(workload.device, threads)
            for pass_ in self.passes:
                runs = {name: pass_callable(fn, problem, pass_) for name, fn in passing.items()}
                # The yardsticks run in the same rounds, taken at their best: a share of the roofline then
                # cannot pass 1 by the machine's load alone.
                sticks = self.yardsticks(workload, threads)
                timed = {**runs, **{f"yardstick {key}": product for key, (product, _) in sticks.items()}}
                timings = time_side_by_side(timed, workload.device, self.warmup, self.repeats, lambda: advance(1))
                for key, (_, product_flops) in sticks.items():
                    rate = product_flops / timings.pop(f"yardstick {key}").min_ms / 1e6
                    self.matmul_rates[key] = max(self.matmul_rates.get(key, 0.0), rate)
                matmul = max(self.matmul_rates[key] for key in sticks)
                flops = workload.flops(pass_)
                base = {
                    "level": workload.level,
                    "shape": workload.shape.name,
                    "batch": workload.batch,
                    "heads": workload.shape.heads,
                    "head_dim": workload.shape.head_dim,
                    "tokens": workload.shape.tokens,
                    "dtype": workload.dtype_name,
                    "pass": pass_,
                    "threads": threads,
                    "device": str(workload.device),
                    "gflop": flops / 1e9,
                    "matmul_gflop_per_s": matmul,
                }
                for name, timing in timings.items():
                    rate = flops / timing.median_ms / 1e6
                    memory = peak_memory_bytes(runs[name], workload.device) / 2**20 if self.measure_memory else None
                    speedup = {
                        b: timings[b].median_ms / timing.median_ms for b in BASELINES if b in timings and b != FLOOR
                    }
                    floor_ratio = timing.median_ms / timings[FLOOR].median_ms if FLOOR in timings else None
                    records.append(
                        {
                            **base,
                            "implementation": name,
                            "status": "ok",
                            **timing.as_dict(),
                            "spread": timing.spread,
                            "gflop_per_s": rate,
                            "matmul_fraction": rate / matmul,
                            "peak_memory_mib": memory,
                            "speedup": speedup,
                            "floor_ratio": floor_ratio,
                        }
                    )
                for name, why in refused.items():
                    records.append({**base, "implementation": name, "status": f"refused: {why}"})
                for name, why in not_run.items():
                    records.append({**base, "implementation": name, "status": f"not run: {why}"})
        return records
