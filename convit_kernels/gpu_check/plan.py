"""The prepared script of `convit-kernels gpu-check`: its steps, their time limits and what was cut to fit.

docs/gpu-check.md derives each limit from cold-cache figures. Nothing here imports torch: the
pytest plugin (``shard.py``) loads this module too.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass

__all__ = ["Step", "steps", "find_tests_dir", "parse_shard", "workers", "BUDGET_S", "OVERHEAD_S", "CUTS"]

# The machine is lent for 10 minutes; the build (`pip install -e .`) and the start take the rest.
BUDGET_S = 480
# Beside the steps: this process's start, the device query, writing and packing the outputs.
OVERHEAD_S = 20
BENCH_BATCH = 256
BENCH_DTYPE = "bf16"
# The layer bench in two runs: a timeout of one keeps the other's table; only the second compiles graphs.
EAGER_SHAPES = ("Ti-224", "B-224")
COMPILED_SHAPE = "S-224"
EAGER_BASELINES = ("sdpa-dense", "timm", "attention-floor")
COMPILED_IMPLEMENTATION = "timm-compiled"
BENCH_DIRS = ("bench", "bench-compiled")  # the two layer-bench steps' output folders, by step name
CUTS = (
    "torch.compile (timm-compiled) is timed at ConViT-S only (6 Inductor compilations instead of 18); "
    "Ti and B are timed eager",
    "the layer bench runs bf16 at 224 px, head dim 48, B = 256 only (no fp32, no Ti+/S+/B+, no 384 px)",
    "the whole-model bench runs bf16 train steps only (no inference pass, no fp32)",
    "the GPU tests are those marked `gpu`; the CPU suite runs in CI",
)


@dataclass(frozen=True)
class Step:
    """One step: its commands run side by side, each must exit with an accepted code within ``limit_s``."""

    name: str
    purpose: str
    commands: tuple[tuple[str, ...], ...]
    limit_s: int
    accepted_exits: tuple[int, ...] = (0,)
    not_run: str | None = None  # why the step cannot run here


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise ValueError(f"a shard is i/n with 0 <= i < n, got {text!r}")
    return int(index), int(count)


def workers() -> int:
    """The CPU cores this process may use: one worker process each."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def find_tests_dir() -> str | None:
    """The tests folder of the checkout this package runs from (an editable install); None from a wheel."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tests = os.path.join(root, "tests")
    in_checkout = all(
        os.path.isfile(p) for p in (os.path.join(root, "pyproject.toml"), os.path.join(tests, "conftest.py"))
    )
    return tests if in_checkout else None


def _tests_not_run(tests_dir: str | None) -> str | None:
    if tests_dir is None:
        return "no tests folder: the package is not run from a checkout (give one with --tests DIR)"
    if not os.path.isfile(os.path.join(tests_dir, "conftest.py")):
        return f"{tests_dir} holds no conftest.py: not the project's tests folder"
    if importlib.util.find_spec("pytest") is None:
        return "pytest is not installed here"
    return None


def _bench(out: str, shapes, implementations) -> tuple[str, ...]:
    return (
        sys.executable, "-m", "convit_kernels", "bench", "--shapes", *shapes, "--dtypes", BENCH_DTYPE,
        "--batch", str(BENCH_BATCH), "--backends", *implementations, "--warmup", "2", "--repeats", "10",
        "--out", out,
    )  # fmt: skip


def eager_implementations() -> tuple[str, ...]:
    """What the layer bench times eager: the backends auto tries on a GPU, best first, then the baselines."""
    from ..dispatch import AUTO_POLICY  # imports torch: when the steps are built, never with this module

    return (*AUTO_POLICY["cuda"][0], *EAGER_BASELINES)


def steps(work: str, tests_dir: str | None, cores: int) -> list[Step]:
    """The script: each step's commands (outputs under ``work``) and time limit; the limits fit BUDGET_S."""
    python = sys.executable
    cli = (python, "-m", "convit_kernels")
    eager = eager_implementations()
    pytest_shard = (
        python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-p", "convit_kernels.gpu_check.shard",
    )  # fmt: skip
    return [
        Step(
            "warm",
            "compile every Triton kernel and Inductor graph the later steps launch, in parallel processes "
            "sharing Triton's and Inductor's caches",
            tuple((python, "-m", "convit_kernels.gpu_check.warm", "--shard", f"{i}/{cores}") for i in range(cores)),
            120,
        ),
        Step(
            "verify-kernels",
            "check the Triton kernels against float64 and store the verdicts auto reads",
            ((*cli, "verify-kernels"),),
            45,
        ),
        Step(
            "tests",
            f"the `gpu` tests in {cores} pytest processes, one JUnit XML",
            tuple(
                (
                    *pytest_shard,
                    f"--gpu-check-shard={i}/{cores}",
                    f"--junitxml={work}/tests/shard-{i}.xml",
                    tests_dir or "tests",
                )
                for i in range(cores)
            ),
            100,
            accepted_exits=(0, 5),  # 5: no test fell to this shard
            not_run=_tests_not_run(tests_dir),
        ),
        Step(
            BENCH_DIRS[0],
            f"layer bench {' '.join(EAGER_SHAPES)}, {BENCH_DTYPE}, B = {BENCH_BATCH}, eager implementations",
            (_bench(f"{work}/{BENCH_DIRS[0]}", EAGER_SHAPES, eager),),
            60,
        ),
        Step(
            BENCH_DIRS[1],
            f"layer bench {COMPILED_SHAPE} with {COMPILED_IMPLEMENTATION} beside the eager implementations",
            (_bench(f"{work}/{BENCH_DIRS[1]}", (COMPILED_SHAPE,), (*eager, COMPILED_IMPLEMENTATION)),),
            90,
        ),
        Step(
            "models",
            "whole-model train steps, ConViT-Ti/S patched and stock beside DeiT-Ti/S, float64 reference on the GPU",
            ((*cli, "bench", "--models", "--dtypes", BENCH_DTYPE, "--passes", "fwd+bwd", "--out", f"{work}/models"),),
            45,
        ),
    ]
