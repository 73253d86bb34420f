"""dq and dk precision at large content logits, for the backends that run here.

Rows with two near-tied top logits of size L (convit_kernels.bench.saturated.near_tied_inputs;
exact in float32), fp32, max error of dq and dk against the float64 reference relative to each one's
largest value. "eager" is the fp32 eager math (the reference backend run in float32), the
yardstick of tests/test_saturated.py: every op-pair backend within 2x of it. The table of
docs/backends.md ("Gradients at large content logits") is a run of this script.

    PYTHONPATH=$PWD python benchmarks/saturated_precision.py [--backends torch cpu sdpa]
"""

from __future__ import annotations

import argparse
import sys

from convit_kernels import available_backends
from convit_kernels.bench.saturated import NEAR_TIED_LOGITS, dq_dk_relative_errors, near_tied_inputs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["torch", "cpu", "sdpa"])
    parser.add_argument("--logits", nargs="+", type=float, default=list(NEAR_TIED_LOGITS), help="row maxima L")
    args = parser.parse_args(argv)
    status = available_backends()
    names = [name for name in args.backends if status[name].available]
    columns = ["eager"] + names
    print("| L | " + " | ".join(f"{c} dq | {c} dk" for c in columns) + " |")
    print("|---" * (1 + 2 * len(columns)) + "|")
    for logit in args.logits:
        inputs, options = near_tied_inputs(logit)
        cells = []
        for column in columns:
            backend = "reference" if column == "eager" else column
            cells += [f"{e:.1e}" for e in dq_dk_relative_errors(inputs, backend, **options)]
        print(f"| {logit:g} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
