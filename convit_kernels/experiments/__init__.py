"""`convit-kernels experiment NAME [options]`: experiments built on the training stack, one module each.

Each experiment's module has ``main(argv, prog=None) -> int``; ``EXPERIMENTS`` names them.
"""

from __future__ import annotations

import importlib
import sys

# experiment -> (module with main(argv, prog) -> int, one-line help)
EXPERIMENTS = {
    "sample-efficiency": (
        "convit_kernels.experiments.sample_efficiency",
        "ConViT against its DeiT twin and a control twin on subsets of Fashion-MNIST (the paper's sample efficiency)",
    ),
}

USAGE = "usage: convit-kernels experiment NAME [options]   (NAME --help: that experiment's options)"


def usage() -> str:
    width = max(len(name) for name in EXPERIMENTS)
    lines = [USAGE, "", "experiments:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in EXPERIMENTS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in EXPERIMENTS:
        print(f"error: unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(EXPERIMENTS[name][0])
    return int(module.main(rest, prog=f"convit-kernels experiment {name}") or 0)
