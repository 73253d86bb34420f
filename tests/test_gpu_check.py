"""`convit-kernels gpu-check`: the script it runs, its dry run on a CPU, its runner, shards and summary."""

import json
import os
import pathlib
import sys
import tarfile
import textwrap
import time

import pytest
import torch

from convit_kernels import backends_report, dispatch
from convit_kernels.bench.cli import build_parser as bench_parser
from convit_kernels.bench.run import Microbench
from convit_kernels.bench.workloads import SHAPES, Workload
from convit_kernels.cli import main as cli_main
from convit_kernels.gpu_check import dry, plan, run, summary, warm
from convit_kernels.gpu_check import main as gpu_check_main

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEP_NAMES = ["warm", "verify-kernels", "tests", "bench", "bench-compiled", "models"]
EVERY_COMBINATION = [
    (name, dtype, d, h * w, w)
    for name in dispatch.CHECKED_BACKENDS
    for dtype in dispatch.STORED_DTYPES
    for d in dispatch.STORED_HEAD_DIMS
    for h, w in dispatch.STORED_GRIDS
]


def test_without_a_gpu_exits_2_with_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert cli_main(["gpu-check", "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert "no CUDA GPU" in captured.err
    assert not (tmp_path / "out").exists()


def test_plan_prints_every_step_its_limit_and_the_cuts(tmp_path, capsys):
    assert gpu_check_main(["--out", str(tmp_path / "out"), "--plan"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines() if " limit " in line] == STEP_NAMES
    assert all(cut in out for cut in plan.CUTS)
    assert not (tmp_path / "out").exists()


def test_steps_fit_the_budget_and_their_commands_parse_with_the_real_parsers(capsys):
    steps = plan.steps("OUT", str(ROOT / "tests"), cores=16)
    assert [s.name for s in steps] == STEP_NAMES
    assert sum(s.limit_s for s in steps) + plan.OVERHEAD_S <= plan.BUDGET_S
    by_name = {s.name: s for s in steps}
    shards = [warm.build_parser().parse_args(list(argv[3:])).shard for argv in by_name["warm"].commands]
    assert shards == [(i, 16) for i in range(16)]
    (verify,) = by_name["verify-kernels"].commands
    if not torch.cuda.is_available():  # its parser accepts the arguments (argparse would exit), then it finds no GPU
        assert verify[1:4] == ("-m", "convit_kernels", "verify-kernels")
        assert backends_report.verify_kernels(list(verify[4:])) == 2
    tests = by_name["tests"].commands
    assert len(tests) == 16 and all("--junitxml=OUT/tests/shard-" in " ".join(argv) for argv in tests)
    assert all(argv[-1] == str(ROOT / "tests") and "gpu" in argv for argv in tests)
    for name in ("bench", "bench-compiled", "models"):
        (argv,) = by_name[name].commands
        assert argv[1:4] == ("-m", "convit_kernels", "bench")
        args = bench_parser().parse_args(list(argv[4:]))
        assert args.dtypes == ["bf16"] and args.out == f"OUT/{name}"
    eager = bench_parser().parse_args(list(by_name["bench"].commands[0][4:]))
    compiled = bench_parser().parse_args(list(by_name["bench-compiled"].commands[0][4:]))
    assert eager.shapes == ["Ti-224", "B-224"] and compiled.shapes == ["S-224"] and eager.batch == compiled.batch == 256
    assert "timm-compiled" not in eager.backends and set(compiled.backends) - set(eager.backends) == {"timm-compiled"}
    assert bench_parser().parse_args(list(by_name["models"].commands[0][4:])).models


def test_dry_run_leaves_exactly_the_three_files_with_every_step(tmp_path, capsys):
    out = tmp_path / "out"
    assert gpu_check_main(["--out", str(out), "--dry-run"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(summary.OUTPUTS)
    assert all(p.is_file() for p in out.iterdir())  # no folder: within two levels
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["dry_run"] and report["device"]["capability"] == "9.0"
    assert [s["step"] for s in report["steps"]] == STEP_NAMES
    assert all(s["status"] == "passed" for s in report["steps"])
    assert report["limits_s"] + plan.OVERHEAD_S <= report["budget_s"] and report["cuts"] == list(plan.CUTS)
    assert report["tests"]["tests"] == 3 * plan.workers() and report["tests"]["shards_without_xml"] == 0
    shapes = {(r["shape"], r["implementation"]) for r in report["bench"]}
    best_on_a_gpu = f"fused-{dispatch.AUTO_POLICY['cuda'][0][0]}"
    assert ("S-224", "timm-compiled") in shapes and ("B-224", best_on_a_gpu) in shapes
    assert ("B-224", "timm-compiled") not in shapes
    assert {r["variant"] for r in report["models"]} == {"stock", "patched"}
    with tarfile.open(out / "logs.tar.gz") as archive:
        names = set(archive.getnames())
    logs = {f"logs/warm-{i}.log" for i in range(plan.workers())} | {"logs/verify-kernels.log", "logs/models.log"}
    assert logs | {"logs/gpu-tests.xml", "logs/bench/bench.json", "logs/bench-compiled/bench.json"} <= names
    markdown = (out / "gpu-check.md").read_text()
    assert "DRY RUN" in markdown and "| bench-compiled | passed |" in markdown and "TFLOP/s" in markdown
    assert capsys.readouterr().out.count("gpu-check ") == len(STEP_NAMES)
    assert gpu_check_main(["--out", str(out), "--dry-run"]) == 0  # its own outputs may be replaced


def test_dry_run_without_a_tests_folder_reports_the_tests_not_run(tmp_path):
    out = tmp_path / "out"
    assert gpu_check_main(["--out", str(out), "--dry-run", "--tests", str(tmp_path / "absent")]) == 0
    steps = {s["step"]: s["status"] for s in json.loads((out / "gpu-check.json").read_text())["steps"]}
    assert steps.pop("tests").startswith("not run: ") and set(steps.values()) == {"passed"}


def test_an_output_folder_with_other_files_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert gpu_check_main(["--out", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert (
        len(err.strip().splitlines()) == 1
        and "files other than" in err
        and sorted(os.listdir(tmp_path)) == ["notes.txt"]
    )


def test_the_tests_folder_is_the_checkouts_and_none_from_a_wheel(monkeypatch, tmp_path):
    assert plan.find_tests_dir() == str(ROOT / "tests")
    wheel = tmp_path / "site-packages" / "convit_kernels" / "gpu_check"
    wheel.mkdir(parents=True)
    (tmp_path / "site-packages" / "tests").mkdir()  # another distribution's stray tests package
    monkeypatch.setattr(plan, "__file__", str(wheel / "plan.py"))
    assert plan.find_tests_dir() is None
    (tests_step,) = [s for s in plan.steps("OUT", None, 2) if s.name == "tests"]
    assert "no tests folder" in tests_step.not_run


def test_pytest_shards_split_the_gpu_tests_and_merge_into_one_junit_xml(tmp_path):
    tests = tmp_path / "suite"
    tests.mkdir()
    (tests / "conftest.py").write_text(
        'def pytest_configure(config):\n    config.addinivalue_line("markers", "gpu: x")\n'
    )
    (tests / "test_some.py").write_text(
        textwrap.dedent("""
        import pytest

        @pytest.mark.gpu
        @pytest.mark.parametrize("i", range(5))
        def test_on_gpu(i):
            pass

        def test_on_cpu():
            pass
        """)
    )
    work = tmp_path / "work"
    (work / "tests").mkdir(parents=True)
    (step,) = [s for s in plan.steps(str(work), str(tests), cores=2) if s.name == "tests"]
    result = run.run_step(step, run.Machine(), str(work))
    assert result["status"] == "passed", [(work / log).read_text() for log in result["logs"]]
    counts = run.merge_junit([str(work / "tests" / f"shard-{i}.xml") for i in range(2)], str(work / "merged.xml"))
    assert counts["tests"] == counts["passed"] == 5 and counts["shards_without_xml"] == 0
    per_shard = [(work / "tests" / f"shard-{i}.xml").read_text().count("<testcase") for i in range(2)]
    assert sorted(per_shard) == [2, 3]
    missing = run.merge_junit([str(work / "tests" / "shard-0.xml"), str(work / "none.xml")], str(work / "m.xml"))
    assert missing["shards_without_xml"] == 1 and missing["tests"] == per_shard[0]


def _running(pid: int) -> bool:
    """Whether ``pid`` runs: a killed process whose parent died waits as a zombie until init reaps it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_step_past_its_limit_is_stopped_with_what_it_started(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    spawn = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\ntime.sleep(60)"
    )
    # 10 s: time for two Python starts on a loaded 2-core machine before the limit strikes.
    sleeper = plan.Step("sleeper", "sleeps", ((sys.executable, "-c", spawn),), limit_s=10)
    result = run.run_step(sleeper, run.Machine(), str(tmp_path))
    assert result["status"].startswith("timed out after 10 s") and result["seconds"] < 20
    grandchild = int(pid_file.read_text())
    # SIGKILL is delivered asynchronously: the grandchild may take a moment to leave the run queue.
    deadline = time.monotonic() + 10
    while _running(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(grandchild)
    exits = ((sys.executable, "-c", "import sys; sys.exit(3)"), (sys.executable, "-c", "import sys; sys.exit(5)"))
    assert run.run_step(plan.Step("e", "", exits, 30), run.Machine(), str(tmp_path))["status"] == "failed (exit 3, 5)"
    lenient = plan.Step("e", "", exits, 30, accepted_exits=(3, 5))
    assert run.run_step(lenient, run.Machine(), str(tmp_path))["status"] == "passed"


def test_warm_shards_take_every_job_once_and_balance_their_cost():
    jobs = warm.warm_jobs(EVERY_COMBINATION)
    assert sum(job.kind == "verify" for job in jobs) == len(EVERY_COMBINATION) == 12
    shards = [warm.jobs_of_shard(jobs, i, 16) for i in range(16)]
    assert sorted((j for shard in shards for j in shard), key=lambda j: j.label) == sorted(jobs, key=lambda j: j.label)
    loads = [sum(j.cost_s for j in shard) for shard in shards]
    assert max(loads) == max(j.cost_s for j in jobs)  # no shard waits on more than the dearest job
    with pytest.raises(SystemExit):
        warm.build_parser().parse_args(["--shard", "16/16"])


def test_stub_bench_records_have_the_real_schema():
    real = Microbench(["timm", "attention-floor"], ["fwd"], [1], 0, 1, measure_memory=False).run(
        Workload("core", SHAPES["toy"], 1, torch.float32, torch.device("cpu"))
    )
    args = bench_parser().parse_args(["--shapes", "S-224", "--dtypes", "bf16", "--batch", "256", "--backends", "timm"])
    args.backends.append("attention-floor")
    stubs = dry.stub_bench_records(args)
    assert {tuple(sorted(r)) for r in stubs} == {tuple(sorted(r)) for r in real}


def test_bench_summary_in_tflops_gbytes_and_fractions_of_peak():
    record = {
        "status": "ok", "level": "core", "shape": "S-224", "batch": 256, "heads": 9, "tokens": 196, "head_dim": 48,
        "pass": "fwd", "implementation": "fused-triton", "dtype": "bf16", "gflop_per_s": 494500.0, "median_ms": 0.1,
        "floor_ratio": 1.1,
    }  # fmt: skip
    refused = {"status": "refused: wrong", "level": "core", "shape": "S-224", "implementation": "timm"}
    (row,) = summary.summarise_bench([record, refused], "NVIDIA H200")
    assert row["tflop_per_s"] == pytest.approx(494.5) and row["fraction_of_peak_flops"] == pytest.approx(0.5)
    gbytes = 4 * 256 * 9 * 196 * 48 * 2 / 0.1e-3 / 1e9  # q, k, v, out in bf16 in 0.1 ms
    assert row["gbyte_per_s"] == pytest.approx(gbytes) and row["fraction_of_peak_bandwidth"] == pytest.approx(
        gbytes / 4800
    )
    (row,) = summary.summarise_bench([{**record, "level": "module"}], "some other GPU")
    assert row["fraction_of_peak_flops"] is None and row["gbyte_per_s"] is None
    (row,) = summary.summarise_bench([record], "NVIDIA H100 PCIe")
    assert row["fraction_of_peak_flops"] == pytest.approx(494.5 / 756)
