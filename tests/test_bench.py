"""`convit-kernels bench`: a tiny run end to end, the accuracy rule before timing, and bad input."""

from __future__ import annotations

import json
import os

import matplotlib.image
import pytest
import torch

from convit_kernels.bench import cli
from convit_kernels.bench.implementations import BASELINES, Implementation, implementations, sdpa_dense_attention
from convit_kernels.bench.run import Microbench
from convit_kernels.bench.workloads import SHAPES, Workload

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
# The tiny configuration: a 4 x 4 patch grid, 2 heads of 8 channels, 2 images; no torch.compile (slow to build).
TINY = ["--shapes", "toy", "--dtypes", "fp32", "--batch", "2", "--warmup", "0", "--repeats", "2", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_tiny_run_writes_matching_table_json_and_png(tmp_path, capsys):
    out = tmp_path / "results"
    names = [n for n in implementations("cpu", torch.float32) if n != "timm-compiled"]
    assert {"fused-sdpa", "attention-floor", "sdpa-dense", "timm"} <= set(names)
    assert cli.main(TINY + ["--backends", *names, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    results = json.loads((out / "bench.json").read_text())["results"]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    expected = {(lvl, p, n) for lvl in ("core", "module") for p in ("fwd", "fwd+bwd") for n in names}
    assert {(r["level"], r["pass"], r["implementation"]) for r in results} == expected
    assert len(rows) == len(results)
    for row, record in zip(rows, results):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:7] == [record["level"], "toy", "2", "fp32", record["pass"], "1", record["implementation"]]
        assert cells[7] == f"{record['median_ms']:.2f}" and record["status"] == "ok"
        assert record["peak_memory_mib"] >= 0 and record["gflop_per_s"] > 0
    floor = {(r["level"], r["pass"]): r["median_ms"] for r in results if r["implementation"] == "attention-floor"}
    for record in results:  # every time as a ratio to plain SDPA on the same q, k, v
        assert record["floor_ratio"] == pytest.approx(record["median_ms"] / floor[record["level"], record["pass"]])
    assert "x floor" in table.splitlines()[0]
    assert (out / "bench.md").read_text().strip() == table.strip()
    image = matplotlib.image.imread(str(out / "bench.png"))
    assert image.ndim == 3 and image.shape[0] > 100


@pytest.mark.parametrize("names", [["fused-cpu", "attention-floor"], ["fused-sdpa"]])
def test_plot_without_timm(names, tmp_path):
    if "fused-cpu" in names and "fused-cpu" not in implementations("cpu", torch.float32):
        pytest.skip("the C++ extension is not built here")
    out = tmp_path / "results"
    args = TINY + ["--levels", "core", "--passes", "fwd", "--backends", *names, "--out", str(out)]
    assert cli.main(args) == 0
    assert matplotlib.image.imread(str(out / "bench.png")).ndim == 3


def _wrong_core(problem):
    """The positional term left out: content attention only, what a kernel that drops the gate would compute."""
    q, k, v = problem.args[:3]
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=problem.scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accuracy_rule_refuses_a_wrong_implementation(dtype):
    wrong = Implementation("wrong", "drops the positional term", _wrong_core, None)
    right = [n for n in implementations("cpu", dtype) if n != "timm-compiled"]
    bench = Microbench(
        right + ["wrong"], ["fwd", "fwd+bwd"], [1], warmup=0, repeats=1, measure_memory=False, extra={"wrong": wrong}
    )
    records = bench.run(Workload("core", SHAPES["toy"], 2, dtype, CPU))
    status = {(r["implementation"], r["pass"]): r["status"] for r in records}
    assert status["wrong", "fwd"].startswith("refused: out: max error")
    assert "median_ms" not in next(r for r in records if r["implementation"] == "wrong")
    assert all(status[n, p] == "ok" for n in right for p in ("fwd", "fwd+bwd"))


def test_an_implementation_that_cannot_run_on_the_device_is_refused_unbuilt():
    def never_built(problem):
        raise AssertionError("built on a device it refuses")

    stub = Implementation("stub", "refuses every device", never_built, None, why_not=lambda device: "not here")
    bench = Microbench(["stub"], ["fwd"], [1], 0, 1, measure_memory=False, extra={"stub": stub})
    (record,) = bench.run(Workload("core", SHAPES["toy"], 2, torch.float32, CPU))
    assert record["status"] == "not run: not here"
    # torch 2.11's Inductor aborts the process in timm's compiled GPSA backward on a CPU.
    why = BASELINES["timm-compiled"].why_not(CPU)
    assert (why is not None) == (torch.__version__ < "2.14") and BASELINES["timm-compiled"].why_not(CUDA) is None


def test_accuracy_rule_covers_the_backward_too():
    """An implementation whose forward is right but whose gradient is not."""

    def no_pos_grad(problem):
        q, k, v, w, b, lam = problem.args
        return lambda: sdpa_dense_attention(q, k, v, w.detach(), b, lam, problem.grid, problem.scale)

    wrong = Implementation("wrong", "no gradient for pos_weight", no_pos_grad, None)
    bench = Microbench(["wrong"], ["fwd+bwd"], [1], 0, 1, measure_memory=False, extra={"wrong": wrong})
    (record,) = bench.run(Workload("core", SHAPES["toy"], 2, torch.float32, CPU))
    assert record["status"].startswith("refused: pos_weight")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shapes", "XL-224"], "unknown shape 'XL-224'"),
        (["--backends", "triton"], "backend 'triton' is not available here"),
        (["--backends", "nonsense"], "unknown implementation 'nonsense'"),
        (["--dtypes", "fp8"], "invalid choice"),
        (["--batch", "0"], "argument --batch: must be in [1, 8192]"),
        (["--batch", "100000"], "argument --batch: must be in [1, 8192]"),  # an allocator traceback before
    ],
)
def test_bad_input_exits_2_with_a_message(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(args + ["--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_unwritable_output_folder_exits_2(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(SystemExit) as exc:
        cli.main(TINY + ["--out", str(locked / "results")])
    assert exc.value.code == 2
    assert "cannot write to the output folder" in capsys.readouterr().err


def test_output_path_that_is_a_file_exits_2(tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("")
    with pytest.raises(SystemExit) as exc:
        cli.main(TINY + ["--out", str(a_file / "results")])
    assert exc.value.code == 2
    assert "cannot write to the output folder" in capsys.readouterr().err


def test_compiled_timm_passes_the_accuracy_rule_and_is_timed():
    why_not = BASELINES["timm-compiled"].why_not(CPU)
    if why_not is not None:  # torch 2.11: the refusal is what test_an_implementation_that_cannot_run... tests
        pytest.skip(f"timm-compiled is not run on this torch's CPU: {why_not}")
    bench = Microbench(["timm-compiled"], ["fwd+bwd"], [1], 0, 1, measure_memory=False)
    (record,) = bench.run(Workload("core", SHAPES["toy"], 2, torch.float32, CPU))
    assert record["status"] == "ok" and record["median_ms"] > 0


def test_thread_scaling_pairs_the_thread_counts_of_one_measurement():
    from convit_kernels.bench.report import thread_scaling

    base = {"level": "core", "shape": "toy", "batch": 2, "dtype": "fp32", "pass": "fwd", "implementation": "sdpa"}
    records = [
        {**base, "threads": 1, "median_ms": 4.0},
        {**base, "threads": 2, "median_ms": 2.5},
        {**base, "implementation": "wrong", "threads": 1, "status": "refused: out"},
    ]
    (row,) = thread_scaling(records)
    assert row["scaling"] == 1.6 and row["median_ms"] == {1: 4.0, 2: 2.5}


def test_the_matmul_yardstick_is_timed_in_the_same_rounds_and_taken_at_its_best(monkeypatch):
    """A share of the roofline cannot pass 1 by load alone: the yardstick shares the implementations' rounds
    (the same load) and counts at its fastest run, the implementations at their median."""
    from convit_kernels.bench import run
    from convit_kernels.bench.timing import Timing

    rounds = []

    def fake_side_by_side(fns, device, warmup, repeats, on_round=lambda: None):
        rounds.append(set(fns))
        # A loaded machine: every median 10 ms, the fastest run 1 ms.
        return {name: Timing(10.0, 9.0, 11.0, 1.0, repeats) for name in fns}

    monkeypatch.setattr(run, "time_side_by_side", fake_side_by_side)
    monkeypatch.setattr(run, "matmul_yardstick", lambda dtype, device: (lambda: None, 2e9))
    bench = Microbench(["fused-sdpa", "attention-floor"], ["fwd"], [1], 0, 3, measure_memory=False)
    records = bench.run(Workload("core", SHAPES["toy"], 2, torch.float32, CPU))
    assert rounds and all({"fused-sdpa", "attention-floor", "yardstick float32, 1 threads"} <= r for r in rounds)
    assert bench.matmul_rates == {"float32, 1 threads": pytest.approx(2e9 / 1.0 / 1e6)}
    for record in records:
        assert record["matmul_gflop_per_s"] == pytest.approx(2000.0)
        assert record["matmul_fraction"] == pytest.approx(record["gflop"] / 10.0 * 1e3 / 2000.0)
