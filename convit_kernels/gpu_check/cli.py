"""`convit-kernels gpu-check --out DIR`: run the prepared script, leave gpu-check.md, gpu-check.json, logs.tar.gz."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from . import plan
from .dry import DryMachine
from .run import Machine, cache_state, merge_junit, run_step, versions
from .summary import OUTPUTS, write_outputs

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convit-kernels gpu-check",
        description="Every GPU check of the project in one command, sized for one H100 / H200 with cold caches "
        "(docs/gpu-check.md).",
    )
    parser.add_argument("--out", required=True, help=f"output folder: it holds {', '.join(OUTPUTS)} and nothing else")
    parser.add_argument(
        "--tests", metavar="DIR", help="the project's tests folder (default: the checkout's, where it runs from one)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="print the steps, their time limits and what was cut")
    mode.add_argument(
        "--dry-run", action="store_true", help="walk the whole run on a CPU with every GPU call stubbed, writing --out"
    )
    return parser


def _print_plan(steps: list[plan.Step]) -> None:
    for step in steps:
        more = f" (+{len(step.commands) - 1} more side by side)" if len(step.commands) > 1 else ""
        print(f"{step.name:<15} limit {step.limit_s:>3} s: {step.purpose}")
        print(f"{'':<15} {' '.join(step.commands[0])}{more}")
        if step.not_run:
            print(f"{'':<15} not run: {step.not_run}")
    total = sum(s.limit_s for s in steps)
    print(f"limits: {total} s + {plan.OVERHEAD_S} s overhead of a {plan.BUDGET_S} s budget\ncut to fit:")
    print("\n".join(f"- {cut}" for cut in plan.CUTS))


def _foreign_outputs(out: str) -> list[str]:
    return sorted(set(os.listdir(out)) - set(OUTPUTS)) if os.path.isdir(out) else []


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    tests_dir = os.path.abspath(args.tests) if args.tests else plan.find_tests_dir()
    if args.plan:
        _print_plan(plan.steps("WORK", tests_dir, plan.workers()))
        return 0
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu-check: no CUDA GPU here, nothing run (--dry-run walks the run with stubs)", file=sys.stderr)
            return 2
    if _foreign_outputs(args.out):
        print(f"gpu-check: {args.out} holds files other than {', '.join(OUTPUTS)}: give an empty one", file=sys.stderr)
        return 2
    machine = DryMachine() if args.dry_run else Machine()
    work = tempfile.mkdtemp(prefix="gpu-check-")
    try:
        steps = plan.steps(work, tests_dir, plan.workers())
        report = {
            "dry_run": machine.dry_run,
            "device": machine.describe(),
            "versions": versions(),
            "cores": plan.workers(),
            "caches": cache_state(),
            "budget_s": plan.BUDGET_S,
            "limits_s": sum(s.limit_s for s in steps),
            "cuts": list(plan.CUTS),
            "steps": [],
        }
        os.makedirs(os.path.join(work, "tests"))
        for step in steps:
            result = run_step(step, machine, work)
            if step.name == "tests" and not step.not_run:
                shards = [os.path.join(work, "tests", f"shard-{i}.xml") for i in range(len(step.commands))]
                report["tests"] = merge_junit(shards, os.path.join(work, "gpu-tests.xml"))
            report["steps"].append(result)
            print(f"gpu-check {step.name}: {result['status']} ({result['seconds']:.0f} s of {step.limit_s})")
            write_outputs(args.out, report, work, plan.BENCH_DIRS)  # each step: a run cut short still leaves its files
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(s["status"] == "passed" or s["status"].startswith("not run") for s in report["steps"]) else 1
