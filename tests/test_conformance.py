"""Every registered backend keeps the contract of convit_kernels.backends, on every device and dtype it claims.

The parameters come from the registry (``backend_names()``), so a backend registered anywhere, the
package's own or one a plugin registers before collection, runs this suite with no edit here
(test_a_registered_backend_meets_the_suite_with_no_edit shows it with tests/toy_backend.py). Each
(backend, device, dtype) the backend claims is one claim: its output and every gradient against the
float64 reference by the project's accuracy rule (:func:`convit_kernels.accuracy.accuracy_failure`: 3x the error of
the reference computed in the same precision, plus about an ulp), at ConViT's sizes, rectangular grids,
one patch, no batch or no heads, extreme gates and positional weights, and in several memory layouts; a
size beyond its limits is refused with its reasons. Each (backend, device) pair: torch.compile, torch.func,
double backward, autocast and bad scales through what the backend declares, and for an op pair opcheck
and its state against its fake. Each backend: every reason it refuses an input, and why it cannot run
where it cannot. A backend that cannot run in this process skips with its reason; a CUDA claim carries
the ``gpu`` marker. Kernel-specific tests (tile paths, determinism, build, state layout) stay in each
backend's own test module.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch

from convit_kernels import backends, dispatch, gpsa_attention
from convit_kernels.backends import FLOAT_DTYPES, BackendError, backend_names, backend_problem, get_backend
from convit_kernels.dtypes import dtype_name

from gpsa_cases import (
    PARAM_NAMES,
    assert_matches_reference,
    backend_param,
    make_inputs,
    outputs_and_grads,
    registered_backends,
    saturated_inputs,
    term_sizes,
    upcast,
)

# The device types this suite runs on (a backend claiming others, MPS or XPU, is tested on these only).
DEVICES = ("cpu", "cuda")


def _claims(dtypes_of) -> list:
    """(backend, device, dtype) of each registered backend on each device of DEVICES it runs on, for each dtype
    ``dtypes_of(backend)`` gives among those it claims."""
    params = []
    for name, impl in registered_backends():
        if impl is None:
            params.append(backend_param(name, None, None))
            continue
        for device in filter(impl.runs_on, DEVICES):
            params += [backend_param(name, device, dtype) for dtype in dtypes_of(impl)]
    return params


def _widest(impl) -> list:
    return [next((t for t in (torch.float64, torch.float32) if t in impl.dtypes), impl.dtypes[0])]


CLAIMS = _claims(lambda impl: impl.dtypes)
BACKEND_DEVICES = _claims(_widest)  # once per device, at the widest dtype the backend claims


def _refuses(impl, inputs, grid=None) -> list[str]:
    """Every reason ``impl`` refuses these inputs (empty: it takes them)."""
    q = inputs[0]
    N = q.shape[2]
    grid = grid or (int(N**0.5), int(N**0.5))
    return impl.not_supported_reasons(q.device, q.dtype, q.shape[-1], grid)


def _assert_takes_or_refuses(backend, inputs, grid_size=None):
    """The accuracy rule where the backend takes the inputs, each error measured against the size of the terms
    its result sums (gpsa_cases.term_sizes: a result may cancel to zero); else one BackendError naming each
    of the backend's reasons."""
    reasons = _refuses(get_backend(backend), inputs, grid_size)
    if reasons:
        with pytest.raises(BackendError) as refused:
            gpsa_attention(*inputs, grid_size=grid_size, backend=backend)
        assert all(reason in str(refused.value) for reason in reasons), (reasons, str(refused.value))
        return
    sizes = term_sizes(inputs, grid_size)
    assert_matches_reference(inputs, accuracy_rule=True, magnitudes=sizes, backend=backend, grid_size=grid_size)


# ---------------------------------------------------------------- forward and gradients, per claim

# (B, H, N, d, grid): ConViT's head at 224 px and at 384 px (several query and key blocks), rectangular grids
# (5 x 10, one row, one column, 13 x 15 with d = 80), the largest head dim the kernels take, a 1 x 257 strip
# (N prime; beyond the grids whole per-axis tables fit), and empty batches.
CASES = {
    "convit-224": (1, 2, 196, 48, None),
    "convit-384": (1, 1, 576, 48, None),
    "rectangle": (2, 3, 50, 16, (5, 10)),
    "one-row": (3, 3, 7, 40, (1, 7)),
    "one-column": (2, 2, 9, 24, (9, 1)),
    "d80-13x15": (1, 2, 195, 80, (13, 15)),
    "d128": (2, 2, 35, 128, (5, 7)),
    "strip-257": (1, 2, 257, 16, (1, 257)),
    "no-batch": (0, 2, 16, 8, None),
    "no-heads": (2, 0, 16, 8, None),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("backend,device,dtype", CLAIMS)
def test_matches_the_reference(backend, device, dtype, case):
    B, H, N, d, grid = case
    inputs = make_inputs(B, H, N, d, dtype=dtype, seed=N + d, device=device)
    _assert_takes_or_refuses(backend, inputs, grid)


@pytest.mark.parametrize("backend,device,dtype", CLAIMS)
def test_one_patch(backend, device, dtype):
    """N = 1: A = P = 1, so dq = dk = 0 exactly: their rounding is measured against the terms they sum."""
    inputs = make_inputs(2, 3, 1, 16, dtype=dtype, device=device)
    _assert_takes_or_refuses(backend, inputs)


# Gates where sigmoid saturates (1 - g of 2e-9 at lambda = 20), a peaked positional softmax (locality 10).
EDGES = {"gate-20": {"gate": -20.0}, "gate+20": {"gate": 20.0}, "locality10": {"locality_strength": 10.0}}


@pytest.mark.parametrize("edge", EDGES.values(), ids=EDGES.keys())
@pytest.mark.parametrize("backend,device,dtype", CLAIMS)
def test_gate_and_positional_extremes(backend, device, dtype, edge):
    _assert_takes_or_refuses(backend, make_inputs(2, 4, 49, 16, dtype=dtype, device=device, **edge))


@pytest.mark.parametrize("backend,device,dtype", [claim for claim in CLAIMS if claim.values[2] == torch.float64])
def test_saturated_content_softmax_in_float64(backend, device, dtype):
    """Logits of ~1e4 (q, k x 100): float64 keeps every weight; a backend taking exp(s - lse) from a rounded
    lse misses by orders of magnitude. (Lower precisions: each backend's own tests, by its error model.)"""
    _assert_takes_or_refuses(backend, saturated_inputs(dtype, device=device))


def _channels_strided(inputs):
    """q, k, v with unit stride along N (d-stride N), as a transposed projection would hand them."""
    leaves = [t.detach().transpose(-1, -2).contiguous().requires_grad_() for t in inputs[:3]]
    return [t.transpose(-1, -2) for t in leaves] + inputs[3:]


LAYOUTS = {
    "contiguous": lambda inputs: [t.detach().contiguous().requires_grad_() for t in inputs],
    "channels-strided": _channels_strided,
    "broadcast-v": lambda inputs: inputs[:2] + [inputs[2][:, :, :1].expand_as(inputs[2])] + inputs[3:],
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("backend,device,dtype", CLAIMS)
def test_memory_layouts(backend, device, dtype, layout):
    """Every layout of q, k, v (make_inputs' default: strided views of one projection, the other tests)."""
    inputs = layout(make_inputs(2, 3, 49, 16, dtype=dtype, device=device))
    _assert_takes_or_refuses(backend, inputs)


@pytest.mark.parametrize("backend,device,dtype", CLAIMS)
def test_op_pair_state_matches_its_fake(backend, device, dtype):
    """An op pair's forward returns B x N x H x d in q's dtype and the state its ``state_like`` promises."""
    impl = get_backend(backend)
    if not impl.is_op_pair:
        pytest.skip("a composite: autograd saves what its ops save")
    q, k, v, w, _, lam = (t.detach() for t in make_inputs(2, 3, 16, 8, dtype=dtype, device=device))
    out, state = impl.forward(q, k, v, w, lam, 4, 8**-0.5, torch.get_float32_matmul_precision())
    assert out.shape == (2, 16, 3, 8) and out.dtype == dtype and out.device == q.device and out.is_contiguous()
    fake = impl.state_like(q)
    assert [(s.shape, s.dtype, s.device) for s in state] == [(f.shape, f.dtype, f.device) for f in fake]


# ---------------------------------------------------------------- what each backend declares, per device


def _small(device, dtype):
    """Leaves of one head on a 2 x 3 grid, small enough for gradgradcheck's numerical Jacobians."""
    return [t.detach().requires_grad_() for t in make_inputs(1, 1, 6, 2, dtype=dtype, strided=False, device=device)]


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DEVICES)
def test_opcheck(backend, device, dtype):
    if not get_backend(backend).is_op_pair:
        pytest.skip("a composite runs no custom op of its own")
    q, k, v, w, b, lam = (t.detach().requires_grad_() for t in make_inputs(2, 3, 16, 8, dtype=dtype, device=device))
    fwd_args = (q, k, v, w, b, lam, 4, 8**-0.5, backend, "highest")
    torch.library.opcheck(torch.ops.convit_kernels.gpsa_fwd.default, fwd_args)
    with torch.no_grad():
        out, state = torch.ops.convit_kernels.gpsa_fwd(*fwd_args)
    grad_out = torch.randn_like(out).transpose(1, 2).contiguous().transpose(1, 2)  # strided, as autograd may give
    detached = (t.detach() for t in (q, k, v, w, lam))
    bwd_args = (grad_out, *detached, state, 4, 8**-0.5, backend, "highest")
    torch.library.opcheck(torch.ops.convit_kernels.gpsa_bwd.default, bwd_args)


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DEVICES)
def test_compile_fullgraph_with_dynamic_shapes(backend, device, dtype):
    """dynamic=True: head dim and N are symbolic while tracing; one graph serves every size, forward and backward."""
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda *a: gpsa_attention(*a, backend=backend), dynamic=True, fullgraph=True, backend="aot_eager"
    )
    for N, d in [(16, 8), (25, 8), (36, 12)]:
        inputs = [t.detach().requires_grad_() for t in make_inputs(2, 3, N, d, dtype=dtype, device=device)]
        got = compiled(*inputs)
        want = gpsa_attention(*inputs, backend=backend)
        torch.testing.assert_close(got, want)
        for g, w in zip(torch.autograd.grad(got.sum(), inputs[:3]), torch.autograd.grad(want.sum(), inputs[:3])):
            torch.testing.assert_close(g, w)


def _second_order(backend, inputs):
    """The gradients of a function of the first-order gradients (create_graph=True)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = gpsa_attention(*leaves, grid_size=(2, 3), backend=backend)
    grads = torch.autograd.grad(out.square().sum(), leaves[:3], create_graph=True)
    return torch.autograd.grad(sum(g.square().sum() for g in grads), leaves, allow_unused=True)


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DEVICES)
def test_double_backward(backend, device, dtype):
    """An op pair's create_graph=True backward runs its ``double_backward``, or refuses where it declares none."""
    impl = get_backend(backend)
    if not impl.is_op_pair:
        pytest.skip("a composite is differentiated through its own ops")
    inputs = _small(device, dtype)
    if impl.double_backward is None:
        with pytest.raises(BackendError, match="declares no path"):
            _second_order(backend, inputs)
    elif dtype == torch.float64:
        assert torch.autograd.gradgradcheck(
            lambda *a: gpsa_attention(*a, grid_size=(2, 3), backend=backend), inputs, atol=1e-7
        )
    else:
        got, want = _second_order(backend, inputs), _second_order("reference", upcast(inputs))
        # pos_bias: exactly zero (the reference's is rounding), so every tensor is held to one scale
        scale = max(w.abs().max().item() for w in want if w is not None)
        for name, g, w, x in zip(PARAM_NAMES, got, want, inputs):
            g, w = (torch.zeros_like(x, dtype=torch.float64) if t is None else t.double() for t in (g, w))
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DEVICES)
def test_torch_func_grad_and_vmap(backend, device, dtype):
    """Under torch.func transforms the backend's ``functorch`` path runs: grad equals autograd, vmap a loop."""
    inputs = _small(device, dtype)
    weight = torch.randn(1, 1, 6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weight = weight.to(device, dtype)

    def loss(*args):
        return (gpsa_attention(*args, grid_size=(2, 3), backend=backend) * weight).sum()

    if get_backend(backend).functorch is None:
        with pytest.raises(BackendError, match="declares no path"):
            torch.func.grad(loss)(*[t.detach() for t in inputs])
        return
    tolerance = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    got = torch.func.grad(loss, argnums=tuple(range(6)))(*[t.detach() for t in inputs])
    want = torch.autograd.grad(loss(*inputs), inputs)
    for name, g, w in zip(PARAM_NAMES, got, want):
        torch.testing.assert_close(g, w, **tolerance, msg=name)

    q, k, v, *params = [t.detach() for t in make_inputs(3, 2, 6, 4, dtype=dtype, device=device)]

    def attention(q, k, v):
        return gpsa_attention(q, k, v, *params, grid_size=(2, 3), backend=backend)

    batched = torch.func.vmap(attention)(q[:, None], k[:, None], v[:, None])
    looped = torch.stack([attention(*(t[i : i + 1] for t in (q, k, v))) for i in range(3)])
    torch.testing.assert_close(batched, looped, **tolerance)


# Autocast on each device type: the dtypes a model trains in there.
AUTOCAST_DTYPES = {"cpu": (torch.bfloat16, torch.float16), "cuda": (torch.float16,)}


@pytest.mark.parametrize("backend,device,dtype", CLAIMS)
def test_autocast_returns_the_reference_dtype(backend, device, dtype):
    """Under autocast the backend returns the reference's dtype, gradients in the inputs' dtypes; from float32
    inputs, within 2e-2 of the float64 output (bfloat16) or 2e-3 (float16)."""
    inputs = make_inputs(2, 2, 16, 8, dtype=dtype, device=device)
    exact, _ = outputs_and_grads(upcast(inputs), backend="reference")
    for autocast_dtype in AUTOCAST_DTYPES[device]:
        with torch.autocast(device, dtype=autocast_dtype):
            want = gpsa_attention(*inputs, backend="reference").dtype
            if want not in get_backend(backend).dtypes:
                with pytest.raises(BackendError, match=f"not {dtype_name(want)}"):
                    gpsa_attention(*inputs, backend=backend)
                continue
            out = gpsa_attention(*inputs, backend=backend)
        assert out.dtype == want
        grads = torch.autograd.grad(out.float().square().sum(), inputs)
        assert [g.dtype for g in grads] == [t.dtype for t in inputs]
        if dtype == torch.float32:
            rtol = 2e-2 if autocast_dtype == torch.bfloat16 else 2e-3
            torch.testing.assert_close(out.double(), exact, rtol=0, atol=rtol * exact.abs().max().item())


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DEVICES)
def test_bad_scales_are_refused(backend, device, dtype):
    """Checked before any backend runs (the cpu kernel's BLAS would ignore a NaN alpha and return finite values)."""
    inputs = [t.detach() for t in make_inputs(1, 2, 16, 8, dtype=dtype, device=device)]
    for scale in (float("nan"), float("inf"), -float("inf"), 0.0, -0.5):
        with pytest.raises(ValueError, match="scale must be a finite number > 0"):
            gpsa_attention(*inputs, scale=scale, backend=backend)


# ---------------------------------------------------------------- refusals, per backend

# Every registered backend whose module imports here, available or not: its limits are its description's.
REGISTERED = [
    pytest.param(name, marks=[] if impl else [pytest.mark.skip(reason=backend_problem(name))])
    for name, impl in registered_backends()
]


def _declared_limits(impl):
    """(what is beyond it, the reason given) for each limit ``impl`` declares, from arguments it takes otherwise.

    Each is (device type, dtype, head dim, grid, CUDA capability): one argument changed from ``taken``.
    """
    device = impl.devices[0] if impl.devices else "cuda"
    taken = (device, impl.dtypes[0], min(impl.max_head_dim or 64, 64), (4, 4), impl.min_cuda_capability or (9, 0))
    limits = []
    if impl.devices is not None:
        other = next(t for t in ("cpu", "cuda", "mps") if t not in impl.devices)
        limits.append(((other, *taken[1:]), f"runs on {'/'.join(impl.devices)} tensors, not {other}"))
    for dtype in (t for t in FLOAT_DTYPES if t not in impl.dtypes):
        names = ", ".join(map(dtype_name, impl.dtypes))
        limits.append(((device, dtype, *taken[2:]), f"takes {names}, not {dtype_name(dtype)}"))
    if impl.max_head_dim is not None:
        head_dim = impl.max_head_dim + 8
        reason = f"takes head dims up to {impl.max_head_dim}, not {head_dim}"
        limits.append(((*taken[:2], head_dim, *taken[3:]), reason))
    if impl.min_cuda_capability is not None and impl.runs_on("cuda"):
        major, minor = impl.min_cuda_capability
        below = (major, minor - 1) if minor else (major - 1, 9)
        reason = f"needs compute capability sm_{major}{minor} or newer; cuda is sm_{below[0]}{below[1]}"
        limits.append((("cuda", *taken[1:4], below), reason))
    if impl.whole_tables:  # a strip whose whole per-axis tables hold 16.7 M numbers a head
        limits.append(((*taken[:3], (1, 4096), taken[4]), "builds the per-axis positional tables whole"))
    return taken, limits


def _reasons(impl, monkeypatch, device, dtype, head_dim, grid, capability):
    monkeypatch.setattr(backends, "cuda_capability", lambda device: capability)
    return impl.not_supported_reasons(torch.device(device), dtype, head_dim, grid)


@pytest.mark.parametrize("backend", REGISTERED)
def test_each_declared_limit_is_refused_with_its_reason(backend, monkeypatch):
    """Inputs within every limit the backend declares are taken; one beyond a limit gives that limit's reason,
    and an explicit name beyond several raises one BackendError listing each."""
    impl = get_backend(backend)
    taken, limits = _declared_limits(impl)
    assert _reasons(impl, monkeypatch, *taken) == []
    for arguments, reason in limits:
        got = _reasons(impl, monkeypatch, *arguments)
        assert len(got) == 1 and got[0].startswith(reason), (arguments, got, reason)
    # Beyond them all at once: each argument as the first limit that changes it.
    changed = {}
    for arguments, _ in limits:
        for i, (value, base) in enumerate(zip(arguments, taken)):
            if value != base:
                changed.setdefault(i, value)
    device, dtype, head_dim, grid, capability = (changed.get(i, base) for i, base in enumerate(taken))
    reasons = _reasons(impl, monkeypatch, device, dtype, head_dim, grid, capability)
    assert len(reasons) == len(changed) - (4 in changed and device != "cuda"), reasons
    if not reasons:
        return  # a backend that takes every device, dtype, head dim and grid
    monkeypatch.setitem(backends._BACKENDS, backend, dataclasses.replace(impl, unavailable=lambda: None))
    with pytest.raises(BackendError) as refused:
        dispatch.resolve_backend(backend, torch.device(device), dtype, head_dim, grid)
    assert str(refused.value) == f"backend {backend!r} cannot run here: {'; '.join(reasons)}"


@pytest.mark.parametrize("backend", [name for name in backend_names() if backend_problem(name) is not None])
def test_a_backend_that_cannot_run_here_says_why(backend):
    problem = backend_problem(backend)
    with pytest.raises(BackendError, match=f"backend '{backend}' cannot run here: {re.escape(problem)}"):
        gpsa_attention(*make_inputs(1, 2, 16, 8), backend=backend)


# ---------------------------------------------------------------- the suite follows the registry

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_a_registered_backend_meets_the_suite_with_no_edit():
    """A backend registered by a plugin (tests/toy_backend.py, loaded before collection) is a parameter of every
    test of this module: each one runs on it and passes, and its limits are refused with their reasons."""
    if "toy" in backend_names():
        pytest.skip("the toy backend is registered in this process: this is the run the test starts")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-p", "toy_backend"]
    command += [os.path.abspath(__file__), "-k", "toy", "-m", "not gpu"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
    passed = set()
    for line in result.stdout.splitlines():  # -rA: "PASSED tests/test_conformance.py::test_name[toy-...]"
        if line.startswith("PASSED "):
            passed.add(line.split("::")[1].split("[")[0])
    every = {name for name, value in globals().items() if name.startswith("test_") and callable(value)}
    every -= {"test_a_registered_backend_meets_the_suite_with_no_edit", "test_a_backend_that_cannot_run_here_says_why"}
    assert passed == every, sorted(every - passed)
