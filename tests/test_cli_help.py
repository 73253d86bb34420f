"""Every option's help states its default once, and the default it states is the one the command takes."""

import argparse
import re

import pytest

from convit_kernels.aot import build_parser as aot_parser
from convit_kernels.bench.cli import FULL, QUICK
from convit_kernels.bench.cli import build_parser as bench_parser
from convit_kernels.bench.workloads import CONVIT_SHAPES
from convit_kernels.compare_timm import build_parser as compare_timm_parser
from convit_kernels.train.cli import build_parser as train_parser
from convit_kernels.train.cli import parse_config, shown

DEFAULT = re.compile(r"\(default: ([^()]*(?:\([^()]*\)[^()]*)*)\)")


def option_helps(parser, monkeypatch):
    """{dest: the option's help as printed, on one line}."""
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping: one line per option
    lines = parser.format_help().splitlines()
    helps = {}
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings:
            continue
        first = next(i for i, line in enumerate(lines) if line.strip().startswith(", ".join(action.option_strings)))
        text = [lines[first].strip()]
        for line in lines[first + 1 :]:  # a help below its option (a long metavar), indented deeper
            if not line.startswith("   ") or line.strip().startswith("-"):
                break
            text.append(line.strip())
        helps[action.dest] = " ".join(text)
    return helps


@pytest.mark.parametrize(
    "name, parser",
    [("train", train_parser), ("bench", bench_parser), ("compare-timm", compare_timm_parser), ("aot", aot_parser)],
)
def test_each_default_stated_once_and_not_none(monkeypatch, name, parser):
    parser = parser()
    for dest, text in option_helps(parser, monkeypatch).items():
        assert text.lower().count("default") <= 1, text
        assert "(default: None)" not in text, text
        action = next(action for action in parser._actions if action.dest == dest)
        if action.nargs == 0:  # a flag: its "default" is the value it does not set
            assert "(default: True)" not in text and "(default: False)" not in text, text
        elif action.default is not None:
            assert f"(default: {shown(action.default)})" in text, text


def test_train_states_the_defaults_it_takes(monkeypatch):
    helps = option_helps(train_parser(), monkeypatch)
    imagenet, digits = parse_config(["--data-path", "/imagenet"]), parse_config([])
    checked = 0
    for dest, text in helps.items():
        stated = DEFAULT.search(text)
        by_data = stated and re.fullmatch(r"(.*) with --data-path, (.*) on the digits", stated.group(1))
        if by_data:
            assert by_data.groups() == (shown(getattr(imagenet, dest)), shown(getattr(digits, dest))), text
            checked += 1
    assert checked >= 15  # every option of the two recipes


def test_bench_states_the_defaults_it_takes(monkeypatch):
    helps = option_helps(bench_parser(), monkeypatch)
    assert FULL["shapes"] == list(CONVIT_SHAPES)
    for dest in ("shapes", "dtypes", "warmup", "repeats"):
        full, quick = "every ConViT shape" if dest == "shapes" else shown(FULL[dest]), shown(QUICK[dest])
        assert f"(default: {full}, {quick} with --quick)" in helps[dest], helps[dest]
