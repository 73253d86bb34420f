"""ConViT against its DeiT twin on 5 to 100% of the digits: `convit-kernels experiment sample-efficiency` as a script.

    python python/sample_efficiency.py --out se-results           # the paper's ratios 0.05 0.1 0.3 0.5 1: ~24 minutes
    python python/sample_efficiency.py --out se-quick --quick     # ratios 0.3 1, seed 0, 4 epochs: about a minute

The experiment lives in convit_kernels/experiments/sample_efficiency.py (its docstring and --help describe the
options and what it writes into --out).
"""

import sys

from convit_kernels.experiments.sample_efficiency import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
