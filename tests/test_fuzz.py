"""Fuzz: random shapes, grids, dtypes, layouts, scales and gates on every backend a CPU runs, against fp64.

Each example draws B, H (and runs B = 0 and H = 0), a grid (square, rectangular, 1 x n, n x 1), d in 1..160, a
dtype, a memory layout per tensor (any dimension order, a stride-0 broadcast along one dimension or expanded along
several, a strided slice, each at a storage offset into a larger NaN-padded buffer or not), whether q, k and v are
one tensor object (q = k = v, or two of them: their gradients add up in one), the
scale, the gates (up to +-20) and the locality of pos_weight, and checks the output and every
gradient with the on-device check's rule (convit_kernels.accuracy: 3x the error of the reference
computed in the same precision, plus about an ulp), each error measured against the size of the
terms the result sums (:func:`magnitudes`). Profile "ci" (the default) is derandomised: the same
examples every run, about a minute on 2 cores. A long, random one for local runs:

    CONVIT_KERNELS_FUZZ=long python -m pytest -q tests/test_fuzz.py

The backends are the registry's: every one that runs on CPU tensors here but the reference itself (the
yardstick). One that runs under an interpreter (triton needs TRITON_INTERPRET=1 before triton is imported)
is fuzzed in a child process (test_interpreted_fuzz_in_its_own_process), with a smaller budget and smaller sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from convit_kernels import gpsa_attention
from convit_kernels import settings as project_settings
from convit_kernels.accuracy import ERROR_FLOOR
from convit_kernels.backends import BackendError, get_backend
from convit_kernels.reference import gpsa_reference

from gpsa_cases import (
    PARAM_NAMES,
    assert_matches_reference,
    backend_param,
    local_pos_weight,
    max_error,
    projection_weight,
    pytest_in_interpreter_process,
    registered_backends,
    term_sizes,
)

PROFILE = project_settings.choice("CONVIT_KERNELS_FUZZ")
_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow], "print_blob": True}
# Examples per backend: "ci" sized for about a minute on this project's 2-core CI, triton's interpreter
# being ~50x slower per example than the others.
BUDGET = {
    "ci": {"compiled": 100, "interpreted": 12},
    "long": {"compiled": 2000, "interpreted": 200},
}
if PROFILE not in BUDGET:
    raise ValueError(f"CONVIT_KERNELS_FUZZ must be one of {sorted(BUDGET)}, got {PROFILE!r}")


def _settings(kind: str) -> settings:
    return settings(max_examples=BUDGET[PROFILE][kind], derandomize=PROFILE == "ci", database=None, **_COMMON)


def _fuzzed(interpreted: bool) -> list:
    """The registered backends that run on CPU tensors in this process, compiled or interpreted, as parameters
    (one that cannot run here skips with its reason); the reference is the yardstick, not fuzzed."""
    return [
        backend_param(name)
        for name, impl in registered_backends()
        if impl is not None and impl.runs_on("cpu") and impl.attention is not gpsa_reference
        if impl.interpreted == interpreted
    ]


FUZZED = _fuzzed(interpreted=False)
INTERPRETED = _fuzzed(interpreted=True)


DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Layout:
    """How a B x H x N x d tensor lies in memory: its dimensions stored in ``order``, and ``kind``, one of
    "dense", "broadcast" (stride 0 along ``dim``: one value repeated), "expanded" (stride 0 along every dimension
    of ``dims``, as ``base.expand(...)``) or "sliced" (every other element along ``dim``); with ``offset`` > 0 the
    storage starts ``offset`` elements into a larger buffer whose other elements are NaN (a kernel that reads
    outside the view returns NaN).
    """

    order: tuple[int, ...]
    kind: str
    dim: int
    dims: tuple[int, ...] = ()
    offset: int = 0

    def make(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` as a B x H x N x d view in this layout of a leaf that requires grad (broadcast: the first)."""
        inverse = tuple(self.order.index(i) for i in range(4))
        shape = values.shape
        repeated = (self.dim,) if self.kind == "broadcast" else self.dims if self.kind == "expanded" else ()
        for dim in repeated:
            values = values.narrow(dim, 0, min(1, values.shape[dim]))
        if self.kind == "sliced":  # the values at the odd indices of a tensor twice as long along dim
            values = torch.repeat_interleave(values, 2, dim=self.dim)
        stored = values.permute(self.order).contiguous()
        if self.offset:  # a slice of a larger buffer: NaN before and after it
            buffer = torch.full((self.offset + stored.numel() + 7,), float("nan"), dtype=stored.dtype)
            buffer[self.offset : self.offset + stored.numel()] = stored.flatten()
            leaf = buffer.requires_grad_()
            stored = leaf[self.offset : self.offset + stored.numel()].view(stored.shape)
            assert stored.storage_offset() == self.offset
        else:
            stored = leaf = stored.requires_grad_()
        view = stored.permute(inverse)
        if repeated:
            return view.expand(shape)
        if self.kind == "sliced":
            index = [slice(None)] * 4
            index[self.dim] = slice(1, None, 2)
            return view[tuple(index)]
        return view


# Which of three distinct tensors q, k and v are: (0, 1, 2) three objects; (0, 0, 0) q = k = v one object,
# as self-attention on one projection would pass it; (0, 1, 1) k = v; (0, 0, 1) q = k.
DISTINCT = (0, 1, 2)
ALIASINGS = (DISTINCT, (0, 0, 0), (0, 1, 1), (0, 0, 1))


@dataclass(frozen=True)
class Case:
    B: int
    H: int
    grid: tuple[int, int]
    d: int
    dtype: torch.dtype
    layouts: tuple[Layout, Layout, Layout]
    scale: float | None
    gates: tuple[float, ...]
    locality: float
    seed: int
    aliasing: tuple[int, int, int] = DISTINCT

    def inputs(self) -> list[torch.Tensor]:
        """q, k, v in their layouts and the positional parameters, each requiring grad.

        Under an aliasing, q, k and v are the tensor objects ``self.aliasing`` names (the first's layout).
        """
        g = torch.Generator().manual_seed(self.seed)
        shape = (self.B, self.H, self.grid[0] * self.grid[1], self.d)
        draws = [torch.randn(shape, generator=g, dtype=torch.float64).to(self.dtype) for _ in self.layouts]
        made = [layout.make(values) for layout, values in zip(self.layouts, draws)]
        qkv = [made[source] for source in self.aliasing]
        noise = 0.1 * torch.randn(self.H, 3, generator=g, dtype=torch.float64)
        pos_weight = local_pos_weight(self.H, self.locality) + noise
        pos_bias = torch.randn(self.H, generator=g, dtype=torch.float64)
        gating = torch.tensor(self.gates, dtype=torch.float64)
        param_dtype = torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype  # as under AMP
        return qkv + [t.to(param_dtype).requires_grad_() for t in (pos_weight, pos_bias, gating)]


@st.composite
def layouts(draw):
    kind = draw(st.sampled_from(["dense", "dense", "broadcast", "expanded", "sliced"]))
    order, dim = tuple(draw(st.permutations(range(4)))), draw(st.integers(0, 3))
    dims = tuple(sorted(draw(st.sets(st.integers(0, 3), min_size=2)))) if kind == "expanded" else ()
    offset = draw(st.sampled_from([0, 0, 1, 3, 16, 37]))  # odd offsets: storage not aligned to a vector
    return Layout(order, kind, dim, dims, offset)


@st.composite
def grids(draw, max_side: int):
    shape = draw(st.sampled_from(["square", "rectangle", "row", "column"]))
    side = st.integers(1, max_side)
    if shape == "square":
        return (draw(side),) * 2
    if shape == "rectangle":
        return draw(side), draw(side)
    long = draw(st.integers(1, max_side * 4))
    return (1, long) if shape == "row" else (long, 1)


@st.composite
def cases(draw, dtypes=DTYPES, max_side=16, max_head_dim=160):
    H = draw(st.integers(1, 3))  # B = 0 and H = 0 are EMPTY_CASES: drawn, they would take a third of the budget
    d = draw(st.integers(1, max_head_dim))
    # The scale as a multiple of the default d**-0.5: logits from ~0 to a few hundred.
    factor = draw(st.none() | st.floats(0.01, 100.0))
    return Case(
        B=draw(st.integers(1, 3)),
        H=H,
        grid=draw(grids(max_side)),
        d=d,
        dtype=draw(st.sampled_from(dtypes)),
        layouts=tuple(draw(layouts()) for _ in range(3)),
        scale=None if factor is None else factor * d**-0.5,
        gates=tuple(draw(st.lists(st.floats(-20.0, 20.0), min_size=H, max_size=H))),
        locality=draw(st.floats(0.0, 4.0)),
        seed=draw(st.integers(0, 2**16)),
        aliasing=draw(st.sampled_from(ALIASINGS[:1] * 3 + ALIASINGS[1:])),  # q = k = v: 1 example in 6
    )


def magnitudes(case: Case, inputs: list[torch.Tensor]) -> dict[str, float]:
    """For each result, the largest sum of the absolute values of the terms it adds (gpsa_cases.term_sizes)."""
    return term_sizes(inputs, case.grid, case.scale)


DENSE = Layout((0, 1, 2, 3), "dense", 0)
EMPTY_CASES = (  # run by every fuzz test as explicit examples
    Case(0, 2, (2, 3), 8, torch.float32, (DENSE,) * 3, None, (1.0, -1.0), 1.0, 0),
    Case(2, 0, (2, 3), 8, torch.float32, (DENSE,) * 3, None, (), 1.0, 0),
)


# Run by every fuzz test as explicit examples too: each new layout at least once, whatever hypothesis draws.
LAYOUT_CASES = (
    # q = k = v one object, expanded over B and H (k = base.expand(...)) at an odd storage offset
    Case(
        2,
        2,
        (3, 5),
        24,
        torch.float32,
        (Layout((0, 1, 2, 3), "expanded", 0, (0, 1), 3),) * 3,
        None,
        (0.5, -1.0),
        1.0,
        1,
        (0, 0, 0),
    ),
    # three slices of one larger buffer each (offsets 1, 16, 37), channel-last and sliced; k = v one object
    Case(
        1,
        3,
        (4, 4),
        40,
        torch.float32,
        (
            Layout((0, 2, 1, 3), "dense", 0, (), 1),
            Layout((3, 2, 1, 0), "sliced", 2, (), 16),
            Layout((0, 1, 2, 3), "dense", 0, (), 37),
        ),
        None,
        (0.0, 2.0, -3.0),
        1.0,
        2,
        (0, 1, 1),
    ),
    # q = k = v, one value per (b, h) repeated along N and d: stride 0 in two dimensions
    Case(
        2,
        1,
        (2, 3),
        8,
        torch.float32,
        (Layout((0, 1, 2, 3), "expanded", 0, (2, 3), 0),) * 3,
        0.5,
        (1.0,),
        1.0,
        3,
        (0, 0, 0),
    ),
)


def _with_empty_cases(test):
    for case in EMPTY_CASES + LAYOUT_CASES:
        test = example(case=case)(test)
    return test


def assert_case_matches(case: Case, backend: str):
    inputs = case.inputs()
    if not get_backend(backend).takes_grid(*case.grid):  # a 1 x 40 strip on a kernel that takes whole tables
        with pytest.raises(BackendError, match="per-axis positional tables whole"):
            gpsa_attention(*inputs, grid_size=case.grid, backend=backend)
        return
    if case.aliasing != DISTINCT:
        assert_aliased_case_matches(case, inputs, backend)
        return
    assert_matches_reference(
        inputs,
        accuracy_rule=True,
        magnitudes=magnitudes(case, inputs),
        backend=backend,
        grid_size=case.grid,
        scale=case.scale,
    )


def _aliased_outputs_and_grads(case: Case, sources, params, **kwargs):
    """The output and the gradients of the tests' projection of it, for each distinct source of q, k, v and each
    parameter: a source passed twice or three times gets the sum of its roles' gradients, as autograd adds them."""
    out = gpsa_attention(*(sources[i] for i in case.aliasing), *params, grid_size=case.grid, scale=case.scale, **kwargs)
    loss = (out * projection_weight(out.shape).to(out.dtype)).sum()
    return out.detach(), torch.autograd.grad(loss, [*sources, *params])


def assert_aliased_case_matches(case: Case, inputs: list[torch.Tensor], backend: str):
    """q, k, v that are one tensor object (or two): the output and the summed gradients against the fp64 reference
    taken with the same objects, by the on-device check's rule (assert_matches_reference's accuracy_rule), each
    source's gradient measured against the sum of its roles' term sizes."""
    count = max(case.aliasing) + 1  # ALIASINGS number the sources 0, 1, ... in order of first use
    sources, params = [inputs[case.aliasing.index(s)] for s in range(count)], inputs[3:]
    assert all(inputs[j] is sources[s] for j, s in enumerate(case.aliasing))
    got = _aliased_outputs_and_grads(case, sources, params, backend=backend)

    def leaves(dtype=None):
        return [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in sources + params]

    exact_leaves, same_leaves = leaves(torch.float64), leaves()
    exact = _aliased_outputs_and_grads(case, exact_leaves[:count], exact_leaves[count:], backend="reference")
    same = _aliased_outputs_and_grads(case, same_leaves[:count], same_leaves[count:], backend="reference")
    sizes = magnitudes(case, inputs)
    source_sizes = [sum(sizes.get("qkv"[j], 0.0) for j in range(3) if case.aliasing[j] == s) for s in range(count)]
    names = ["out"] + [f"source {s} of {case.aliasing}" for s in range(count)] + list(PARAM_NAMES[3:])
    term_sizes = [sizes.get("out", 0.0)] + source_sizes + [sizes.get(name, 0.0) for name in PARAM_NAMES[3:]]
    for i, name in enumerate(names):
        have, want, ref = (got[0], exact[0], same[0]) if i == 0 else (got[1][i - 1], exact[1][i - 1], same[1][i - 1])
        assert torch.isfinite(have).all(), f"{name}: non-finite values"
        if want.numel() == 0:
            continue
        if name == "pos_bias":  # exactly zero in exact arithmetic
            assert max_error(have, want) <= 1e-6 * max(1.0, exact[1][count].abs().max().item()), name
            continue
        scale = max(want.abs().max().item(), term_sizes[i])
        bound = 3 * max_error(ref, want) + ERROR_FLOOR[case.dtype] * scale
        assert max_error(have, want) <= bound, (name, max_error(have, want), bound)


@pytest.mark.parametrize("backend", FUZZED)
def test_fuzz_against_the_fp64_reference(backend):
    @_settings("compiled")
    @_with_empty_cases
    @given(case=cases())
    def run(case):
        assert_case_matches(case, backend)

    run()


# What an interpreter takes in its budget: the half and single precisions, smaller grids and head dims.
INTERPRETED_CASES = cases(dtypes=(torch.float32, torch.float16, torch.bfloat16), max_side=6, max_head_dim=64)


@pytest.mark.skipif(not INTERPRETED, reason="no backend runs under an interpreter here: run by the test below")
@pytest.mark.parametrize("backend", INTERPRETED)
def test_fuzz_under_the_interpreter(backend):
    @_settings("interpreted")
    @_with_empty_cases
    @given(case=INTERPRETED_CASES)
    def run(case):
        assert_case_matches(case, backend)

    run()


@pytest.mark.slow
def test_interpreted_fuzz_in_its_own_process():
    if INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 in this process: the interpreted fuzz runs here")
    result, summary = pytest_in_interpreter_process(__file__, "-k", "test_fuzz_under_the_interpreter")
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
    assert summary.startswith("1 passed"), summary
