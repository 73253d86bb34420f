"""gpu-check's first step: one shard of the launches the later steps make, to fill the Triton and Inductor caches.

``python -m convit_kernels.gpu_check.warm --shard i/n`` runs its share of the jobs (greedy by
cost, so n processes finish together): each `verify-kernels` combination through
``verification.run_check``, the bench's Triton launches (core and module level, at B = 2: the batch
is in no kernel's specialisation), its torch.compile graphs at the bench's own batch (Inductor
keys a graph on its shapes), and a patched model's train step. Each goes through the code the
later step runs, so the kernels and graphs it compiles are the ones that step looks up.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import dataclass

__all__ = ["WarmJob", "warm_jobs", "jobs_of_shard", "build_parser", "main"]

WARM_BATCH = 2
MODELS = ("convit_tiny", "convit_small")


@dataclass(frozen=True)
class WarmJob:
    kind: str  # "verify", "bench", "compiled" or "model"
    args: tuple
    cost_s: float  # cold compile seconds on one core (docs/gpu-check.md; estimates for Inductor and models)

    @property
    def label(self) -> str:
        import torch

        from ..dtypes import dtype_name

        words = (dtype_name(a) if isinstance(a, torch.dtype) else str(a) for a in self.args)
        return f"{self.kind} {' '.join(words)}"


def warm_jobs(combinations) -> list[WarmJob]:
    """Every job, given `verify-kernels`' combinations (``dispatch.stored_combinations`` of the device)."""
    from .plan import COMPILED_SHAPE, EAGER_SHAPES

    jobs = [
        WarmJob("verify", combination, 2.0 if combination[1].itemsize == 4 else 5.0) for combination in combinations
    ]
    for shape in (*EAGER_SHAPES, COMPILED_SHAPE):
        jobs += [WarmJob("bench", (level, shape), 5.0) for level in ("core", "module")]
    jobs += [WarmJob("compiled", (level, COMPILED_SHAPE), 40.0) for level in ("core", "module")]
    jobs += [WarmJob("model", (name,), 8.0) for name in MODELS]
    return jobs


def jobs_of_shard(jobs: list[WarmJob], index: int, count: int) -> list[WarmJob]:
    """Shard ``index`` of ``count``: each job, dearest first, goes to the shard with the least cost so far."""
    loads = [0.0] * count
    mine = []
    for job in sorted(jobs, key=lambda j: -j.cost_s):
        shard = loads.index(min(loads))
        loads[shard] += job.cost_s
        if shard == index:
            mine.append(job)
    return mine


def _run(job: WarmJob, device) -> str:
    import timm
    import torch
    import torch.nn.functional as F

    from ..bench.implementations import BASELINES, evaluate, fused
    from ..bench.run import pass_callable
    from ..bench.workloads import DTYPES, SHAPES, Workload, make_problem
    from ..patch import patch_convit
    from ..verification import run_check
    from .plan import BENCH_BATCH, BENCH_DTYPE, COMPILED_IMPLEMENTATION

    dtype = DTYPES[BENCH_DTYPE]
    if job.kind == "verify":
        problem = run_check(job.args[0], device, *job.args[1:])
        return problem or "matches the float64 reference"
    if job.kind == "model":
        model = patch_convit(timm.create_model(job.args[0], pretrained=False).to(device=device, dtype=dtype))
        images = torch.randn(WARM_BATCH, 3, 224, 224, device=device, dtype=dtype)
        F.cross_entropy(model(images), torch.zeros(WARM_BATCH, dtype=torch.long, device=device)).backward()
        return "train step ran"
    level, shape = job.args
    batch, implementation = (WARM_BATCH, fused("triton")) if job.kind == "bench" else (BENCH_BATCH, None)
    problem = make_problem(Workload(level, SHAPES[shape], batch, dtype, device))
    fn = (implementation or BASELINES[COMPILED_IMPLEMENTATION]).build(problem)
    evaluate(fn, problem, backward=True)  # the comparison with the reference (training graphs)
    pass_callable(fn, problem, "fwd")()  # the timed forward (inference graph)
    return "forward and backward ran"


def build_parser() -> argparse.ArgumentParser:
    from .plan import parse_shard

    parser = argparse.ArgumentParser(prog="python -m convit_kernels.gpu_check.warm", description=__doc__.split("\n")[0])
    parser.add_argument("--shard", type=parse_shard, required=True, metavar="I/N", help="run shard I of N")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from ..dispatch import stored_combinations

    device = torch.device("cuda")
    jobs = jobs_of_shard(warm_jobs(stored_combinations(device)), *args.shard)
    failed = 0
    for job in jobs:
        start = time.monotonic()
        try:
            outcome = _run(job, device)
        except Exception:  # a job that cannot run costs the later step its compile time, not its result
            traceback.print_exc()
            outcome, failed = "raised", failed + 1
        print(f"{job.label}: {outcome} ({time.monotonic() - start:.1f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
