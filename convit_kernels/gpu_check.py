"""`convit-kernels gpu-check --out DIR`: every GPU check of the project in one command, sized for one H100 / H200.

A GPU may be lent rarely and briefly, so the checks are one prepared script of about 8 minutes
(each step with its own time limit, ``STEPS``): ``verify-kernels`` (the on-device check behind
``auto``, stored for later processes), the GPU tests (``pytest -m gpu``, JUnit XML), the layer
``bench`` at ConViT-Ti/S/B, B = 256, bf16 (triton, sdpa, sdpa-dense, timm eager and compiled, the
attention floor) and the whole-model ``models`` bench. It writes ``gpu-check.json`` and
``gpu-check.md`` under DIR (each step's status and time, the bench's rates as TFLOP/s and as a
fraction of the device's nominal peak); ``--dry-run`` prints the steps. Without a GPU it exits 2
with one line saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

__all__ = ["main", "steps", "summarise_bench", "STEPS", "NOMINAL_PEAK_TFLOPS"]

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
# Dense tensor-core peak, TFLOP/s, by device-name fragment and dtype (vendor datasheets, SXM parts).
NOMINAL_PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
}
SHAPES = ("Ti-224", "S-224", "B-224")
IMPLEMENTATIONS = ("triton", "sdpa", "sdpa-dense", "timm", "timm-compiled", "attention-floor")
BUDGET_S = 480


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]
    limit_s: int


def steps(out: str) -> list[Step]:
    """The prepared script: each step's command line and time limit (their sum fits BUDGET_S)."""
    cli = (sys.executable, "-m", "convit_kernels")
    return [
        Step("verify-kernels", (*cli, "verify-kernels"), 30),
        Step(
            "tests",
            (
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-m",
                "gpu",
                "-p",
                "no:cacheprovider",
                TESTS,
                f"--junitxml={out}/gpu-tests.xml",
            ),
            150,
        ),  # fmt: skip
        Step(
            "bench",
            (
                *cli,
                "bench",
                "--shapes",
                *SHAPES,
                "--dtypes",
                "bf16",
                "--batch",
                "256",
                "--backends",
                *IMPLEMENTATIONS,
                "--warmup",
                "2",
                "--repeats",
                "10",
                "--out",
                f"{out}/bench",
            ),
            240,
        ),  # fmt: skip
        Step(
            "models",
            (*cli, "bench", "--models", "--dtypes", "bf16", "--passes", "fwd+bwd", "--out", f"{out}/models"),
            60,
        ),
    ]


STEPS = steps("DIR")


def summarise_bench(records: list[dict], device_name: str) -> list[dict]:
    """The bench's records with TFLOP/s and the fraction of the device's nominal dense peak."""
    peaks = next((p for name, p in NOMINAL_PEAK_TFLOPS.items() if name in device_name), {})
    rows = []
    for r in records:
        if r.get("status") != "ok":
            continue
        tflops = r["gflop_per_s"] / 1e3
        peak = peaks.get(r["dtype"])
        rows.append(
            {
                "level": r["level"],
                "shape": r["shape"],
                "pass": r["pass"],
                "implementation": r["implementation"],
                "median_ms": r.get("median_ms"),
                "tflop_per_s": tflops,
                "fraction_of_peak": tflops / peak if peak else None,
                "floor_ratio": r.get("floor_ratio"),
            }
        )
    return rows


def _markdown(results: list[dict], bench_rows: list[dict], device: str) -> str:
    lines = [f"# gpu-check on {device}", "", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']:.0f} |" for r in results]
    if bench_rows:
        lines += [
            "",
            "| level | shape | pass | implementation | ms | TFLOP/s | of peak | / floor |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in bench_rows:
            peak = f"{r['fraction_of_peak']:.1%}" if r["fraction_of_peak"] is not None else "-"
            floor = f"{r['floor_ratio']:.2f}" if r["floor_ratio"] is not None else "-"
            lines.append(
                f"| {r['level']} | {r['shape']} | {r['pass']} | {r['implementation']} | {r['median_ms']:.3f} | "
                f"{r['tflop_per_s']:.1f} | {peak} | {floor} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="convit-kernels gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dry-run", action="store_true", help="print the steps and their time limits, run nothing")
    args = parser.parse_args(argv)
    plan = steps(args.out)
    if args.dry_run:
        for step in plan:
            print(f"{step.name:<10} limit {step.limit_s:>3} s: {' '.join(step.argv)}")
        return 0
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU here, nothing run (--dry-run lists the steps)", file=sys.stderr)
        return 2

    os.makedirs(args.out, exist_ok=True)
    device = torch.cuda.get_device_name()
    results = []
    for step in plan:
        start = time.monotonic()
        with open(os.path.join(args.out, f"{step.name}.log"), "w") as log:
            try:
                rc = subprocess.run(step.argv, stdout=log, stderr=subprocess.STDOUT, timeout=step.limit_s).returncode
                status = "passed" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                status = f"timed out after {step.limit_s} s"
        results.append({"step": step.name, "status": status, "seconds": time.monotonic() - start})
        print(f"gpu-check {step.name}: {status}", flush=True)

    bench_rows = []
    bench_json = os.path.join(args.out, "bench", "bench.json")
    if os.path.exists(bench_json):
        with open(bench_json) as f:
            bench_rows = summarise_bench(json.load(f)["results"], device)
    with open(os.path.join(args.out, "gpu-check.json"), "w") as f:
        json.dump({"device": device, "steps": results, "bench": bench_rows}, f, indent=1)
    with open(os.path.join(args.out, "gpu-check.md"), "w") as f:
        f.write(_markdown(results, bench_rows, device))
    return 0 if all(r["status"] == "passed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
