"""Every element written, and bitwise-identical reruns, on every backend a CPU runs (triton's: test_triton_interpreter).

Under ``torch.use_deterministic_algorithms(True)`` with ``torch.utils.deterministic.fill_uninitialized_memory``
(its default), ``torch.empty`` and its kin fill floating tensors with NaN: the outputs, the saved state and the
gradients the backends allocate, in Python (sdpa, torch, triton's launchers) and in the C++ extension (cpu: its
``torch::stable::empty`` goes through the dispatcher to ``aten::empty``, filled there). An element a kernel
forgets stays NaN and fails the finiteness check; the tests first show the fill happens, so they cannot pass
for want of it.

Deterministic backends: all of them, run to run (fixed reduction orders, no atomics). Across thread counts the
cpu backend is, by its design (a fixed split of the work whatever the thread count: test_extension.py); sdpa,
torch and reference are PyTorch's CPU kernels and BLAS (MKL here), which promise nothing across thread counts
(MKL only in its conditional-numerical-reproducibility mode), so that is not asserted for them.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from convit_kernels.backends import get_backend
from convit_kernels.extension_loader import load_cpu

from gpsa_cases import assert_matches_reference, make_inputs, outputs_and_grads

CPU_BACKENDS = ("cpu", "sdpa", "torch")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# (B, H, N, d, grid): N not a multiple of any tile (7, 50, 195: odd, 13 x 15), d not a power of 2 (24, 40, 80),
# a 1 x n strip, and N = 1.
UNEVEN = [
    (2, 3, 50, 40, (5, 10)),
    (1, 2, 7, 24, (1, 7)),
    (2, 1, 195, 80, (13, 15)),
    (3, 2, 1, 12, None),
]
UNEVEN_IDS = [f"B{b}-H{h}-N{n}-d{d}" + (f"-grid{g[0]}x{g[1]}" if g else "") for b, h, n, d, g in UNEVEN]


@pytest.fixture
def nan_filled_memory():
    """torch.use_deterministic_algorithms(True) with fill_uninitialized_memory: new floating tensors are NaN."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_new_tensors_are_nan_under_the_fixture(nan_filled_memory, dtype):
    """The fill the tests below rely on, by every allocation route the backends take: torch.empty, empty_like,
    new_empty, empty_strided in Python and aten::empty / empty_like / new_empty through the dispatcher (the calls
    torch::stable::empty, empty_like and new_empty make from the C++ extension)."""
    x = torch.zeros(3, 5, dtype=dtype)
    made = [
        torch.empty(3, 5, dtype=dtype),
        torch.empty_like(x),
        x.new_empty((4, 2)),
        torch.empty_strided((3, 5), (1, 3), dtype=dtype),
        torch.ops.aten.empty.memory_format([3, 5], dtype=dtype),
        torch.ops.aten.empty_like.default(x),
        torch.ops.aten.new_empty.default(x, [4, 2]),
    ]
    for i, t in enumerate(made):
        assert t.isnan().all(), (i, t)


def _allocations_inside(events, op_name: str) -> list:
    """The aten::empty* events called (at any depth) from ``op_name``'s events."""

    def inside(event):
        parent = event.cpu_parent
        while parent is not None:
            if parent.name == op_name:
                return True
            parent = parent.cpu_parent
        return False

    return [e for e in events if e.name.startswith("aten::empty") and inside(e)]


def _fills(event) -> bool:
    """An aten::fill_ below the event (aten::empty_like fills in the aten::empty_strided it calls)."""
    return any(child.name == "aten::fill_" or _fills(child) for child in event.cpu_children)


@pytest.mark.parametrize("fill", [True, False], ids=["filled", "fill-off"])
def test_the_extension_allocates_through_the_filling_empty(fill):
    """The C++ extension's outputs come from aten::empty calls that fill them (aten::fill_ inside each): seen in
    the profiler's call tree of gpsa_fwd and gpsa_bwd; with the fill off, the same calls leave them unfilled
    (the check tells the two apart)."""
    assert load_cpu() is None
    q, k, v, w, _, lam = (t.detach() for t in make_inputs(2, 3, 50, 40))
    previous = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = fill
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out, stats = torch.ops.convit_kernels_ext.gpsa_fwd(q, k, v, w, lam, 10, 40**-0.5)
            torch.ops.convit_kernels_ext.gpsa_bwd(torch.ones_like(out), q, k, v, w, lam, stats, 10, 40**-0.5)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = previous
    events = prof.events()
    for op, outputs in (("convit_kernels_ext::gpsa_fwd", 2), ("convit_kernels_ext::gpsa_bwd", 5)):
        allocations = _allocations_inside(events, op)
        assert len(allocations) >= outputs, (op, [e.name for e in allocations])
        filled = [_fills(e) for e in allocations]
        assert all(filled) if fill else not any(filled), (op, filled)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,N,d,grid", UNEVEN, ids=UNEVEN_IDS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_output_and_gradient_element_written(nan_filled_memory, backend, B, H, N, d, grid, dtype):
    """Outputs, saved state and gradients allocated NaN: every one finite and matching the fp64 reference."""
    if not get_backend(backend).takes_grid(*(grid or (1, N))):
        pytest.skip(f"{backend} takes per-axis tables whole: not a {grid} strip")
    if N == 1 and dtype == torch.float32:
        pytest.skip("N = 1: dq = dk = 0 exactly, which fp32 meets only up to rounding (the other dtypes run it)")
    inputs = make_inputs(B, H, N, d, dtype=dtype, seed=N + d)
    assert_matches_reference(inputs, backend=backend, grid_size=grid)  # checks every result is finite first


def _run(backend, inputs, grid):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out, grads = outputs_and_grads(leaves, backend=backend, grid_size=grid)
    return [out, *grads]


def _assert_bitwise_equal(first, second, what):
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        assert torch.equal(a, b), f"{what}: result {i} differs, max {(a.double() - b.double()).abs().max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS + ("reference",))
def test_reruns_are_bitwise_identical(backend, dtype):
    """The same inputs twice: the same output and gradients to the bit (and, on the cpu backend, with 1 thread
    and with 2 or more)."""
    inputs = make_inputs(3, 3, 195, 40, dtype=dtype, seed=4)
    first, again = _run(backend, inputs, (13, 15)), _run(backend, inputs, (13, 15))
    _assert_bitwise_equal(first, again, f"{backend} rerun")
    if backend != "cpu":
        return
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _run(backend, inputs, (13, 15))
        torch.set_num_threads(max(2, threads))
        many = _run(backend, inputs, (13, 15))
    finally:
        torch.set_num_threads(threads)
    _assert_bitwise_equal(first, single, "cpu at 1 thread")
    _assert_bitwise_equal(first, many, f"cpu at {max(2, threads)} threads")
