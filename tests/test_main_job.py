"""The README's main job, `convit-kernels bench --quick`, runs to the end on this stack (in its own process: a
crash of a compiled baseline must fail this test, not end the suite)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_the_quick_bench_runs_to_the_end(tmp_path):
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "convit_kernels", "bench", "--quick", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    records = json.loads((out / "bench.json").read_text())["results"]
    timed = {r["implementation"] for r in records if r["status"] == "ok"}
    assert {"fused-cpu", "fused-sdpa", "timm", "attention-floor"} <= timed, timed
    assert all(r["status"] == "ok" or r["status"].startswith("not run: ") for r in records)
