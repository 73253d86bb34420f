"""`convit-kernels gpu-check`: what it does without a GPU, and the script it would run with one."""

import pytest
import torch

from convit_kernels import gpu_check
from convit_kernels.bench.cli import build_parser
from convit_kernels.cli import main as cli_main


def test_without_a_gpu_exits_2_with_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert cli_main(["gpu-check", "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert "no CUDA GPU" in captured.err
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_the_prepared_steps(capsys):
    assert gpu_check.main(["--out", "DIR", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["verify-kernels", "tests", "bench", "models"]


def test_steps_fit_the_budget_and_their_commands_parse():
    plan = gpu_check.steps("OUT")
    assert sum(step.limit_s for step in plan) <= gpu_check.BUDGET_S
    verify, tests, bench, models = plan
    assert verify.argv[1:] == ("-m", "convit_kernels", "verify-kernels")
    assert "-m" in tests.argv and "gpu" in tests.argv and "--junitxml=OUT/gpu-tests.xml" in tests.argv
    for step in (bench, models):
        assert step.argv[1:4] == ("-m", "convit_kernels", "bench")
        args = build_parser().parse_args(list(step.argv[4:]))  # the bench accepts every flag
        assert args.dtypes == ["bf16"] and args.out.startswith("OUT/")
    args = build_parser().parse_args(list(bench.argv[4:]))
    assert args.shapes == ["Ti-224", "S-224", "B-224"] and args.batch == 256
    assert set(args.backends) == {"triton", "sdpa", "sdpa-dense", "timm", "timm-compiled", "attention-floor"}
    assert build_parser().parse_args(list(models.argv[4:])).models


def test_bench_summary_in_tflops_and_fraction_of_peak():
    records = [
        {"status": "ok", "level": "core", "shape": "S-224", "pass": "fwd", "implementation": "fused-triton",
         "dtype": "bf16", "gflop_per_s": 494500.0, "median_ms": 0.1, "floor_ratio": 1.1},
        {"status": "failed", "level": "core", "shape": "S-224", "pass": "fwd", "implementation": "timm"},
    ]  # fmt: skip
    (row,) = gpu_check.summarise_bench(records, "NVIDIA H200")
    assert row["tflop_per_s"] == pytest.approx(494.5) and row["fraction_of_peak"] == pytest.approx(0.5)
    (row,) = gpu_check.summarise_bench(records[:1], "some other GPU")
    assert row["fraction_of_peak"] is None
