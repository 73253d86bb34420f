"""ConViT against its DeiT twin and two ablation arms on Fashion-MNIST: `convit-kernels experiment sample-efficiency`.

    python python/sample_efficiency.py --out se-results           # the default run (wall time: docs/)
    python python/sample_efficiency.py --out se-quick --quick     # 2 ratios, 1 seed, 30 steps: a smoke run

The experiment lives in convit_kernels/experiments/sample_efficiency/ (its docstring and --help describe the
options and what it writes into --out).
"""

import sys

from convit_kernels.experiments.sample_efficiency import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
