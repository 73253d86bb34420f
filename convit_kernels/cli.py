"""`convit-kernels` command line: one subcommand per job, each a function of its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

from .settings import SettingError, validate_all

# subcommand -> (module, its function main(argv) -> int, one-line help)
SUBCOMMANDS = {
    "compare-timm": ("convit_kernels.compare_timm", "main", "compare FusedGPSA with timm's GPSA on a ConViT-Ti layer"),
    "backends": ("convit_kernels.backends_report", "list_backends", "list the backends here and what auto picks"),
    "verify-kernels": (
        "convit_kernels.backends_report",
        "verify_kernels",
        "verify the GPU kernels on this device against float64 and store the verdicts auto reads",
    ),
    "gpu-check": ("convit_kernels.gpu_check", "main", "run every GPU check in one go (<= 8 min on one H100/H200)"),
    "bench": ("convit_kernels.bench.cli", "main", "time the backends against timm and the SDPA decomposition"),
    "aot": ("convit_kernels.aot", "main", "compile the Triton kernels for sm_80/sm_90 without a GPU, report resources"),
    "train": ("convit_kernels.train.cli", "main", "train a ConViT with the fused layer"),
    "experiment": ("convit_kernels.experiments", "main", "run an experiment on the training stack: sample-efficiency"),
}
# Earlier names, still accepted.
ALIASES = {"check": "compare-timm", "self-check": "verify-kernels"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="convit-kernels", description="Fused GPSA kernels for ConViT.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    aliases = {name: [old for old, new in ALIASES.items() if new == name] for name in SUBCOMMANDS}
    for name, (_, _, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, aliases=aliases[name], add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = ALIASES.get(argv[0], argv[0]), argv[1:]
    if command not in SUBCOMMANDS:
        parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(SUBCOMMANDS)}")
    module, function, _ = SUBCOMMANDS[command]
    try:
        validate_all()  # every CONVIT_KERNELS_* variable now: a bad one is refused here, not at its first use
        return int(getattr(importlib.import_module(module), function)(rest) or 0)
    except SettingError as error:  # a CONVIT_KERNELS_* variable has a bad value
        print(f"convit-kernels {command}: {error}", file=sys.stderr)
        return 2
