"""Running the steps: the commands of a step side by side under its time limit, and what the machine is.

:class:`Machine` launches real processes (each in a session of its own, so a timeout ends its
compile workers too) and asks torch about the GPU; ``dry.py`` replaces it by stubs.
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import time
import xml.etree.ElementTree as ET

from .plan import Step

__all__ = ["Machine", "run_step", "merge_junit", "cache_state", "versions"]


class Machine:
    """The GPU machine: real processes, real device."""

    dry_run = False

    def describe(self) -> dict:
        import torch

        properties = torch.cuda.get_device_properties(0)
        return {
            "name": properties.name,
            "capability": f"{properties.major}.{properties.minor}",
            "memory_gib": round(properties.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
        }

    def launch(self, argv: tuple[str, ...], log_path: str, cwd: str):
        with open(log_path, "w") as log:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)


def versions() -> dict:
    import timm
    import torch

    from .. import _version

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "timm": timm.__version__,
        "convit_kernels": _version.__version__,
    }


def cache_state() -> dict:
    """Where Triton and Inductor cache compiled code, and whether each was empty (cold) when the run began."""
    found = {}
    try:
        import triton

        found["triton"] = triton.knobs.cache.dir
    except (ImportError, AttributeError):
        pass
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        found["inductor"] = cache_dir()
    except ImportError:
        pass
    return {name: {"dir": path, "cold": not (os.path.isdir(path) and os.listdir(path))} for name, path in found.items()}


def _stop(process) -> None:
    """End a timed-out command and everything it started (its session: compile workers, ptxas)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def run_step(step: Step, machine, work: str) -> dict:
    """Run ``step``'s commands side by side, each logging to ``work``; its result for the summary."""
    result = {"step": step.name, "limit_s": step.limit_s, "seconds": 0.0, "purpose": step.purpose}
    if step.not_run:
        return {**result, "status": f"not run: {step.not_run}"}
    logs = [
        os.path.join(work, f"{step.name}.log" if len(step.commands) == 1 else f"{step.name}-{i}.log")
        for i in range(len(step.commands))
    ]
    start = time.monotonic()
    processes = [machine.launch(argv, log, work) for argv, log in zip(step.commands, logs)]
    while any(p.poll() is None for p in processes) and time.monotonic() - start < step.limit_s:
        time.sleep(0.1)
    late = [p for p in processes if p.poll() is None]
    for process in late:
        _stop(process)
    seconds = time.monotonic() - start
    exits = [p.returncode for p in processes if p not in late]
    if late:
        status = f"timed out after {step.limit_s} s ({len(late)} of {len(processes)} commands still running)"
    elif all(code in step.accepted_exits for code in exits):
        status = "passed"
    else:
        status = f"failed (exit {', '.join(str(c) for c in sorted(set(exits) - set(step.accepted_exits)))})"
    return {**result, "status": status, "seconds": round(seconds, 1), "logs": [os.path.basename(p) for p in logs]}


def merge_junit(paths: list[str], merged_path: str) -> dict:
    """One JUnit XML of the shards' test suites; the counts (tests, failures, errors, skipped), the shards missing."""
    root = ET.Element("testsuites")
    counts = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    missing = 0
    for path in paths:
        try:
            shard = ET.parse(path).getroot()
        except (OSError, ET.ParseError):  # a shard that was stopped, or never started
            missing += 1
            continue
        for suite in shard.iter("testsuite"):
            root.append(suite)
            for key in counts:
                counts[key] += int(suite.get(key, 0))
    for key, value in counts.items():
        root.set(key, str(value))
    ET.ElementTree(root).write(merged_path, encoding="utf-8", xml_declaration=True)
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "shards_without_xml": missing}  # fmt: skip
