"""`convit-kernels gpu-check --out DIR`: every GPU check of the project in one command, for one H100 / H200.

Sized for a fresh, offline machine lent for 10 minutes with cold caches: steps whose time limits
sum within :data:`plan.BUDGET_S` (``plan.py``): ``warm`` compiles, in one process per core, the
Triton kernels and Inductor graphs the later steps launch (``warm.py``); then `verify-kernels`,
the `gpu` tests (pytest processes side by side, ``shard.py``), the layer bench in two runs and
the whole-model bench. DIR then holds ``gpu-check.md``, ``gpu-check.json`` and ``logs.tar.gz``
and nothing else (``summary.py``). ``--plan`` prints the script; ``--dry-run`` walks it on a CPU
with stubs (``dry.py``). Without a GPU it exits 2 with one line. docs/gpu-check.md has the
cold-cache budget and what was cut.
"""

from .cli import main
from .plan import BUDGET_S, OVERHEAD_S, steps
from .summary import NOMINAL_PEAKS, summarise_bench

__all__ = ["main", "steps", "summarise_bench", "BUDGET_S", "OVERHEAD_S", "NOMINAL_PEAKS"]
