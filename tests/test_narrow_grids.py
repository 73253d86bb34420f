"""Narrow grids (1 x n, n x 1): no per-axis table of W^2 numbers, no partial that grows with B x side^2.

A 1 x 4096 grid's whole column table is 4096 x 4096 a head; before the tables were made in row
blocks, the sdpa backend's forward + backward at B = 8, H = 2, d = 16 took 1.36 GB beyond its
12.6 MB of q, k, v (a 1 x 60000 grid: a MemoryError).
"""

import os
import subprocess
import sys

import pytest
import torch

from convit_kernels.backends import backend_problem
from convit_kernels.dispatch import explain_auto

CPU = torch.device("cpu")

# Peak resident memory of one forward + backward, beyond what the process held with q, k, v alive: the
# high-water mark is reset (clear_refs 5) after the first-call costs, whose own peak (imports, a first
# extension load) can be larger. q, k, v hold 32768 x H x d numbers whatever the grid. glibc's default
# allocator, as users run it.
_PEAK = """
import sys, torch
from convit_kernels import gpsa_attention

def step(B, H, grid, d, backend):
    q, k, v = (torch.randn(B, H, grid[0] * grid[1], d, requires_grad=True) for _ in range(3))
    params = [torch.randn(H, 3), torch.zeros(H), torch.zeros(H)]
    out = gpsa_attention(q, k, v, *(p.requires_grad_() for p in params), grid_size=grid, backend=backend)
    out.backward(torch.randn_like(out))

def status_bytes(field):
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024

backend, grid_h, grid_w = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
step(2, 2, (8, 1) if grid_w == 1 else (1, 8), 16, backend)  # first-call costs, at a small size
# What any real process has done by now: freed a large block, which raises glibc's moving mmap threshold
# to its size, so later blocks up to 30 MB come from (and, freed, stay in) the heap.
torch.empty(30 << 20, dtype=torch.uint8)  # allocated and freed at once
H, d = 2, 16
B = max(1, 32768 // (grid_h * grid_w))
held = [torch.randn(B, H, grid_h * grid_w, d) for _ in range(3)]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak resident size starts again from the current one
before = status_bytes("VmRSS")
del held
step(B, H, (grid_h, grid_w), d, backend)
print((status_bytes("VmHWM") - before) / (3 * B * H * grid_h * grid_w * d * 4))
"""


@pytest.mark.parametrize("grid", [(1, 4096), (4096, 1)])
def test_auto_takes_the_cpu_kernel_on_strips_too(grid):
    """The cpu kernel makes a strip's axis rows per query row: auto sends strips there (exact at large content
    logits, which sdpa is not; docs/backends.md), not to sdpa."""
    name, skipped = explain_auto(CPU, torch.float32, 16, grid)
    assert name == ("cpu" if backend_problem("cpu") is None else "sdpa")
    assert all(not line.endswith(f"{grid[0]} x {grid[1]} grid") for line in skipped)


def _peak_over_qkv(backend: str, grid: tuple[int, int]) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", _PEAK, backend, *map(str, grid)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return float(result.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads and resets the peak in /proc/self")
@pytest.mark.parametrize("backend", ["cpu", "sdpa"])
@pytest.mark.parametrize("strip", [lambda side: (1, side), lambda side: (side, 1)], ids=["1 x n", "n x 1"])
def test_peak_memory_is_a_few_times_q_k_v_and_does_not_grow_with_the_side(strip, backend):
    if backend_problem(backend) is not None:
        pytest.skip(f"{backend}: {backend_problem(backend)}")
    small, large = (_peak_over_qkv(backend, strip(side)) for side in (2048, 4096))
    # measured here: cpu 2.7 to 3.0, sdpa 4.6 to 5.5 (sdpa 12 to 17 when each block of a table was allocated anew)
    assert large <= 8, f"peak extra memory {large:.1f} x the bytes of q, k, v"
    # the same bytes on a strip twice as long: a table or a leak that grows with the side would double it
    assert large <= 1.5 * small, f"{small:.1f} -> {large:.1f} x q, k, v from side 2048 to 4096"
