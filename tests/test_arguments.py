"""Numbers out of their range are refused by argparse in one line; an allocation that fails is one line too."""

import pytest
import torch

from convit_kernels import aot, compare_timm
from convit_kernels.arguments import SEED, SIZE, out_of_memory


@pytest.mark.parametrize(
    "parser, argv, message",
    [
        (aot.build_parser, ["--head-dim", "129"], "argument --head-dim: must be in [1, 128]"),  # a traceback before
        (aot.build_parser, ["--head-dim", "-1"], "argument --head-dim: must be in [1, 128]"),  # a report, rc 0
        (aot.build_parser, ["--n", "-5"], "argument --n: must be in [1, 1048576]"),
        (aot.build_parser, ["--n", "0"], "argument --n: must be in [1, 1048576]"),  # "division by zero"
        (compare_timm.build_parser, ["--seed", "1" + "0" * 23], "argument --seed: must be in [0, 4294967295]"),
        (compare_timm.build_parser, ["--batch", "0"], "argument --batch: must be in [1, 8192]"),
    ],
)
def test_out_of_range_numbers_exit_2_in_one_line(parser, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err


def test_the_types_take_their_whole_range():
    assert SEED("0") == 0 and SEED(str(2**32 - 1)) == 2**32 - 1 and SIZE("8192") == 8192


def test_a_failed_allocation_is_named_and_other_errors_are_not():
    try:
        torch.empty(2**62, dtype=torch.uint8)  # torch's CPU allocator raises a plain RuntimeError
    except RuntimeError as error:
        assert out_of_memory(error).startswith("out of memory: can't allocate memory")
    assert out_of_memory(MemoryError()) == "out of memory: MemoryError"
    assert out_of_memory(RuntimeError("shapes do not match")) is None


def test_training_that_runs_out_of_memory_stops_in_one_line(monkeypatch, capsys, tmp_path):
    from convit_kernels.train import cli, engine

    def allocates_too_much(config):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried")

    monkeypatch.setattr(engine, "fit", allocates_too_much)
    assert cli.main(["--model", "convit_test", "--output-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory: can't allocate memory") and len(err.splitlines()) == 1, err
