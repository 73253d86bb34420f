"""pytest-benchmark suite of the GPSA microbenchmarks, built from the bench package (convit_kernels.bench).

Same workloads, implementations and accuracy rule as `convit-kernels bench`;
pytest-benchmark does the timing. Every case is compared with the float64
reference before it is timed. Select with -k (e.g. -k "core and fwd+bwd") and
widen with GPSA_BENCH_SHAPES / GPSA_BENCH_DTYPES (space-separated; docs/settings.md).
"""

from __future__ import annotations

import functools

import pytest
import torch

from convit_kernels import settings
from convit_kernels.accuracy import accuracy_failure
from convit_kernels.bench.implementations import BASELINES, REFERENCE, evaluate, fused_backends, implementations
from convit_kernels.bench.run import pass_callable
from convit_kernels.bench.workloads import DTYPES, LEVELS, PASSES, SHAPES, Workload, default_batch, make_problem

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BENCH_SHAPES = settings.names("GPSA_BENCH_SHAPES", SHAPES)
BENCH_DTYPES = settings.names("GPSA_BENCH_DTYPES", DTYPES)
NAMES = [f"fused-{name}" for name, why in fused_backends(DEVICE.type).items() if why is None] + list(BASELINES)


@functools.lru_cache(maxsize=1)  # one workload's tensors alive at a time; pytest runs parametrizations in order
def reference_results(level: str, shape: str, dtype_name: str):
    dtype = DTYPES[dtype_name]
    workload = Workload(level, SHAPES[shape], default_batch(SHAPES[shape], DEVICE.type, dtype), dtype, DEVICE)
    problem, exact_problem = make_problem(workload), make_problem(workload, torch.float64)
    reference = BASELINES[REFERENCE]
    exact = evaluate(reference.build(exact_problem), exact_problem, backward=True)
    return problem, exact, evaluate(reference.build(problem), problem, backward=True)


def _synchronized(run):
    if DEVICE.type != "cuda":
        return run

    def synchronized():
        run()
        torch.cuda.synchronize()

    return synchronized


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("dtype_name", BENCH_DTYPES)
@pytest.mark.parametrize("shape", BENCH_SHAPES)
@pytest.mark.parametrize("level", LEVELS)
def test_gpsa(benchmark, level, shape, dtype_name, pass_, name):
    impl = implementations(DEVICE.type, DTYPES[dtype_name]).get(name)
    if impl is None:
        pytest.skip(f"{name} does not take {dtype_name} on {DEVICE.type}")
    problem, exact, same_precision = reference_results(level, shape, dtype_name)
    fn = impl.build(problem)
    if impl.compared_to_reference:  # not the attention floor: plain attention, a yardstick of speed only
        names = ["out"] + problem.leaf_names
        wrong = accuracy_failure(evaluate(fn, problem, backward=True), exact, same_precision, names, DTYPES[dtype_name])
        assert wrong is None, f"{name} disagrees with the reference, not timed: {wrong}"
    workload = problem.workload
    benchmark.group = f"{level} {shape} B={workload.batch} {dtype_name} {pass_}"
    benchmark.extra_info.update(batch=workload.batch, gflop=workload.flops(pass_) / 1e9, device=str(DEVICE))
    run = _synchronized(pass_callable(fn, problem, pass_))
    run()  # warm-up (and, for timm-compiled, the compilation for this pass)
    benchmark(run)
