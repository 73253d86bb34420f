"""`convit-kernels` command line: one subcommand per job, each implemented in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with main(argv) -> int, one-line help)
SUBCOMMANDS = {
    "check": ("convit_kernels.check", "compare the fused GPSA with timm's on a ConViT-Ti layer"),
    "bench": ("convit_kernels.bench.cli", "time the backends against timm and the SDPA decomposition"),
    "aot": ("convit_kernels.aot", "compile the Triton kernels for sm_80/sm_90 without a GPU and report resources"),
    "train": ("convit_kernels.train.cli", "train a ConViT with the fused layer"),
    "experiment": ("convit_kernels.experiments", "run an experiment on the training stack: sample-efficiency"),
    "backends": ("convit_kernels.check", "list the backends usable here and why the others are not"),
    "gpu-check": ("convit_kernels.gpu_check", "run every GPU check in one go (<= 8 min on one H100/H200)"),
    "self-check": ("convit_kernels.self_check", "check the GPU kernels here and store the verdicts auto reads"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="convit-kernels", description="Fused GPSA kernels for ConViT.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        parser.error(f"unknown command {command!r}; choose from {', '.join(SUBCOMMANDS)}")
    module = importlib.import_module(SUBCOMMANDS[command][0])
    entry = getattr(module, f"main_{command}", None) or module.main
    return int(entry(rest) or 0)
