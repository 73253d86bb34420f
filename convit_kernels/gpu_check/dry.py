"""`gpu-check --dry-run`: the whole GPU branch on a CPU, each GPU call replaced by a stub.

:class:`DryMachine` names an H100 and, for each command, parses it with the real command's parser
and writes what that command would leave: a log, the tests' JUnit XML, the bench's JSON (the
bench's own writer, records of its schema with made-up times). Everything after (the merge, the
summary, the packing) is the real code.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

__all__ = ["DryMachine", "stub_bench_records", "stub_model_records"]

# Made-up rates of the stub tables: a fraction of an H100's dense bf16 peak, by implementation.
STUB_TFLOPS = {"fused-triton": 260.0, "fused-sdpa": 150.0, "sdpa-dense": 90.0, "timm": 40.0, "timm-compiled": 110.0}
STUB_FLOOR_TFLOPS = 300.0


class _Finished:
    """A command that has already ended."""

    def __init__(self, returncode: int):
        self.returncode = returncode

    def poll(self) -> int:
        return self.returncode


def stub_bench_records(args) -> list[dict]:
    """Records of a `bench` run of these parsed arguments, in the schema of ``bench.run.Microbench``."""
    import torch

    from ..bench.implementations import BASELINES
    from ..bench.workloads import DTYPES, SHAPES, Workload

    names = [n if n in BASELINES else f"fused-{n.removeprefix('fused-')}" for n in args.backends]
    records = []
    for level in args.levels:
        for shape in args.shapes:
            for dtype in args.dtypes:
                workload = Workload(level, SHAPES[shape], args.batch, DTYPES[dtype], torch.device("cuda"))
                for pass_ in args.passes:
                    flops = workload.flops(pass_)
                    times = {n: flops / (STUB_TFLOPS.get(n, STUB_FLOOR_TFLOPS) * 1e9) for n in names}
                    base = {
                        "level": level, "shape": shape, "batch": args.batch, "heads": workload.shape.heads,
                        "head_dim": workload.shape.head_dim, "tokens": workload.shape.tokens, "dtype": dtype,
                        "pass": pass_, "threads": 1, "device": "cuda", "gflop": flops / 1e9,
                        "matmul_gflop_per_s": 700e3,
                    }  # fmt: skip
                    for name, ms in times.items():
                        records.append({
                            **base, "implementation": name, "status": "ok", "median_ms": ms, "q1_ms": 0.98 * ms,
                            "q3_ms": 1.02 * ms, "min_ms": 0.97 * ms, "repeats": args.repeats, "spread": 0.04,
                            "gflop_per_s": flops / ms / 1e6, "matmul_fraction": flops / ms / 1e6 / 700e3,
                            "peak_memory_mib": 512.0,
                            "speedup": {b: times[b] / ms for b in times if b in BASELINES and b != "attention-floor"},
                            "floor_ratio": ms / times["attention-floor"] if "attention-floor" in times else None,
                        })  # fmt: skip
    return records


def stub_model_records(args) -> list[dict]:
    """Records of a `bench --models` run, in the schema of ``bench.models.run_models``."""
    from ..bench.models import MODELS, MODES

    records = []
    for model, is_convit in MODELS.items():
        for pass_ in args.passes:
            stock_ms = 60.0 if "tiny" in model else 150.0
            variants = {"stock": stock_ms, **({"patched": 0.8 * stock_ms} if is_convit else {})}
            for variant, ms in variants.items():
                records.append({
                    "model": model, "mode": MODES[pass_], "batch": args.batch or 128, "dtype": args.dtypes[0],
                    "threads": 1, "device": "cuda", "variant": variant, "status": "ok", "median_ms": ms,
                    "q1_ms": ms, "q3_ms": ms, "min_ms": ms, "repeats": 3, "spread": 0.0,
                    "images_per_s": (args.batch or 128) / ms * 1e3, "speedup": {"stock": stock_ms / ms},
                })  # fmt: skip
    return records


def _junit(path: str, argv) -> None:
    """A shard's JUnit XML: two passed tests and a skipped one, named after its shard."""
    shard = next(a for a in argv if a.startswith("--gpu-check-shard=")).split("=", 1)[1].replace("/", "-of-")
    suite = ET.Element("testsuite", name="pytest", tests="3", failures="0", errors="0", skipped="1")
    for name in ("test_gpu_matches_reference", "test_gpu_deterministic_mode_is_bitwise_stable", "test_cuda_backend"):
        case = ET.SubElement(suite, "testcase", classname="test_triton", name=f"{name}[shard-{shard}]", time="0.5")
        if name == "test_cuda_backend":
            ET.SubElement(case, "skipped", message="dry run: a skipped test")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    root = ET.Element("testsuites")
    root.append(suite)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def _stub(argv: tuple[str, ...]) -> list[str]:
    """Write what the command would leave; its log lines."""
    from ..bench.cli import build_parser as bench_parser
    from ..bench.report import write_json
    from ..dispatch import CHECKED_BACKENDS, STORED_DTYPES, STORED_GRIDS, STORED_HEAD_DIMS
    from . import warm

    module, rest = argv[2], list(argv[3:])
    if module == "convit_kernels.gpu_check.warm":
        every = [
            (name, dtype, d, h * w, w)
            for name in CHECKED_BACKENDS
            for dtype in STORED_DTYPES
            for d in STORED_HEAD_DIMS
            for h, w in STORED_GRIDS
        ]  # every stored combination, as on a GPU that takes them all
        jobs = warm.jobs_of_shard(warm.warm_jobs(every), *warm.build_parser().parse_args(rest).shard)
        return [f"{job.label}: stubbed ({job.cost_s:.1f} s)" for job in jobs]
    if module == "pytest":
        _junit(next(a for a in rest if a.startswith("--junitxml=")).split("=", 1)[1], rest)
        return ["3 tests: 2 passed, 1 skipped (stubbed)"]
    command, rest = rest[0], rest[1:]
    if command == "verify-kernels":
        return ["NVIDIA H100 80GB HBM3: 12 combinations checked (stubbed)"]
    args = bench_parser().parse_args(rest)
    os.makedirs(args.out, exist_ok=True)
    stem, records = ("models", stub_model_records(args)) if args.models else ("bench", stub_bench_records(args))
    write_json(f"{args.out}/{stem}.json", {"command": " ".join(argv), "device": "stub"}, records)
    with open(f"{args.out}/{stem}.md", "w") as f:
        f.write(f"{len(records)} stub records\n")
    return [f"wrote {args.out}/{stem}.json ({len(records)} stub records)"]


class DryMachine:
    """An H100 that runs nothing: each command's outputs are written by a stub."""

    dry_run = True

    def describe(self) -> dict:
        return {"name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "memory_gib": 79.1, "count": 1}

    def launch(self, argv: tuple[str, ...], log_path: str, cwd: str) -> _Finished:
        lines = _stub(argv)
        with open(log_path, "w") as log:
            log.write(f"[dry run] {' '.join(argv)}\n" + "\n".join(lines) + "\n")
        return _Finished(0)
