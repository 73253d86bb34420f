"""Each script under python/ runs as a user would run it."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script,args,expect",
    [("swap_in_fused_gpsa.py", ["--batch", "1", "--img-size", "112"], "patched model agrees with the stock one")],
)
def test_example_script_runs(script, args, expect):
    result = subprocess.run(
        [sys.executable, str(ROOT / "python" / script), *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert expect in result.stdout


def test_check_command_runs():
    result = subprocess.run(
        [sys.executable, "-m", "convit_kernels", "check", "--batch", "2"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert "output            max rel. error" in result.stdout
