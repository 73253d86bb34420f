"""Shared test inputs and tolerances for every backend's tests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from convit_kernels import gpsa_attention
from convit_kernels.accuracy import ERROR_FLOOR
from convit_kernels.backends import BackendError, backend_names, backend_problem, get_backend
from convit_kernels.dtypes import dtype_name
from convit_kernels.reference import relative_positions
from convit_kernels.separable import dense_positional_probs, positional_axis_probs

PARAM_NAMES = ("q", "k", "v", "pos_weight", "pos_bias", "gating_param")

# With locality 10 the positional softmax is peaked and its logits reach ~40 near the peak, so
# float32 rounding of P alone moves d pos_weight by ~1e-4 relative (timm's own float32 error
# here is 1.2e-4); the bound allows that conditioning, the other tensors keep 2e-5.
LARGE_WEIGHT_RTOL = {"pos_weight": 1e-3}


def local_pos_weight(num_heads: int, locality_strength: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    """pos_weight as the paper's local init sets it: head h attends around its own offset."""
    kernel = max(1, int(num_heads**0.5))
    center = (kernel - 1) / 2 if kernel % 2 == 0 else kernel // 2
    w = torch.zeros(num_heads, 3, dtype=dtype)
    w[:, 2] = -1
    for h in range(num_heads):
        w[h, 0] = 2 * (h // kernel % kernel - center)
        w[h, 1] = 2 * (h % kernel - center)
    return w * locality_strength


def make_inputs(
    B, H, N, d, *, dtype=torch.float32, gate=None, locality_strength=1.0, seed=0, strided=True, device="cpu"
):
    """q, k, v as strided views of a projection output (B x N x 3 x H x d), and the positional parameters.

    Every tensor is a leaf requiring grad (q, k, v through the projection buffer), on ``device``; the values
    are drawn on the CPU, the same on every device.
    """
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(B, N, 3, H, d, generator=g, dtype=torch.float64)
    if strided:
        proj = proj.to(device, dtype).requires_grad_()
        q, k, v = proj.permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (t.contiguous().to(device, dtype).requires_grad_() for t in proj.permute(2, 0, 3, 1, 4).unbind(0))
    pos_weight = local_pos_weight(H, locality_strength) + 0.1 * torch.randn(H, 3, generator=g, dtype=torch.float64)
    pos_bias = torch.randn(H, generator=g, dtype=torch.float64)
    gating = (
        torch.randn(H, generator=g, dtype=torch.float64)
        if gate is None
        else torch.full((H,), float(gate), dtype=torch.float64)
    )
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype  # as under AMP
    params = [t.to(device, param_dtype).requires_grad_() for t in (pos_weight, pos_bias, gating)]
    return [q, k, v, *params]


def upcast(inputs):
    """fp64 leaf copies of make_inputs' tensors, for the reference."""
    return [t.detach().to(torch.float64).requires_grad_() for t in inputs]


def projection_weight(shape, grad_seed=1) -> torch.Tensor:
    """The fixed random projection of the output whose gradients the tests compare (float64)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)


def outputs_and_grads(inputs, grad_seed=1, **kwargs):
    """Forward through gpsa_attention and the gradients of a fixed random projection of the output."""
    out = gpsa_attention(*inputs, **kwargs)
    weight = projection_weight(out.shape, grad_seed).to(out.device, out.dtype)
    grads = torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)
    return out.detach(), [torch.zeros_like(t) if gr is None else gr for t, gr in zip(inputs, grads)]


def term_sizes(inputs, grid=None, scale=None) -> dict[str, float]:
    """For each result, the largest sum of the absolute values of the terms it adds (float64): the scale its
    rounding error follows, for assert_matches_reference's ``magnitudes``.

    A result's rounding error scales with these sums, not with the result, which cancels to zero
    for a broadcast v or k (one value for every token) or N = 1. With M = (1 - g) A + g P the
    attention, t = dO v^T (dO the tests' projection of the output) and the row deltas
    delta_c = sum_j A t, delta_p = sum_j P t: dq sums (1 - g) A (t - delta_c) scale k over the keys,
    dk the same over the queries, dv M^T dO, d pos_weight g P (t - delta_p) rel, and d gating
    g (1 - g) (delta_p - delta_c). The float64 reference (timm's math) takes 1 - g as 1 - sigmoid(lambda),
    exact to an absolute 1e-16 only, which at lambda = 15 is 3e-10 of 1 - g: so 1 - g counts as at least
    1e-6 here (1e-16 over float64's floor of 1e-10).
    """
    q, k, v, pos_weight, _, gating = (t.detach().double().cpu() for t in inputs)
    B, H, N, d = q.shape
    if q.numel() == 0:
        return {}
    grid = grid or (int(N**0.5), int(N**0.5))
    scale = d**-0.5 if scale is None else scale
    g, one_minus_g = torch.sigmoid(gating).view(1, H, 1, 1), torch.sigmoid(-gating).clamp(min=1e-6).view(1, H, 1, 1)
    A = (scale * q @ k.transpose(-2, -1)).softmax(-1)
    P = dense_positional_probs(positional_axis_probs(pos_weight, *grid))
    d_out = projection_weight(q.shape)
    t = d_out @ v.transpose(-2, -1)
    delta_c, delta_p = (A * t).sum(-1, keepdim=True), (P * t).sum(-1, keepdim=True)
    ds_c = one_minus_g * A * (t.abs() + delta_c.abs())
    ds_p = (g * P * (t.abs() + delta_p.abs())).sum(0)
    rel = relative_positions(*grid, dtype=torch.float64).abs()
    return {
        "out": ((one_minus_g * A + g * P) @ v.abs()).max().item(),
        "q": scale * (ds_c @ k.abs()).max().item(),
        "k": scale * (ds_c.transpose(-2, -1) @ q.abs()).max().item(),
        "v": ((one_minus_g * A + g * P).transpose(-2, -1) @ d_out.abs()).max().item(),
        "pos_weight": torch.einsum("hij,ijc->hc", ds_p, rel).max().item(),
        "gating_param": (g * one_minus_g * (delta_p.abs() + delta_c.abs())).sum(dim=(0, 2, 3)).max().item(),
    }


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_matches_reference(
    inputs,
    rtol_fp32=2e-5,
    rtol_overrides=None,
    same_precision_rule=False,
    accuracy_rule=False,
    magnitudes=None,
    **kwargs,
):
    """The backend's output and gradients against the fp64 reference.

    fp32/fp64 within ``rtol_fp32`` of each tensor's scale (``rtol_overrides``
    maps a name in ("out",) + PARAM_NAMES to its own bound); half precisions by
    flash-attention's rule: error at most 3x the reference computed in the same
    precision, plus a small floor. ``same_precision_rule`` applies that rule to
    fp32 too (with ``rtol_fp32`` of the scale as its floor), where the inputs
    make fp32 itself inaccurate. ``accuracy_rule`` holds every dtype to the on-device
    check's rule (:func:`convit_kernels.accuracy.accuracy_failure`): 3x the same-precision
    reference's error plus ERROR_FLOOR of the scale, an ulp for the half types.
    ``magnitudes`` maps a name to a scale that replaces the tensor's own where
    larger: the size of the terms summed into it, for inputs where those cancel
    to (nearly) zero.
    """
    dtype = inputs[0].dtype
    problem = {name: kwargs[name] for name in ("grid_size", "scale") if name in kwargs}
    exact = outputs_and_grads(upcast(inputs), backend="reference", **problem)
    got = outputs_and_grads(inputs, **kwargs)
    relative_rule = (
        accuracy_rule or dtype in (torch.float16, torch.bfloat16) or (same_precision_rule and dtype == torch.float32)
    )
    if relative_rule:
        same_precision = outputs_and_grads(
            [t.detach().clone().requires_grad_() for t in inputs], backend="reference", **problem
        )
    for i, name in enumerate(("out",) + PARAM_NAMES):
        want = exact[0] if i == 0 else exact[1][i - 1]
        have = got[0] if i == 0 else got[1][i - 1]
        assert torch.isfinite(have).all(), f"{name}: non-finite values"
        if want.numel() == 0:  # B = 0 or H = 0
            assert have.shape == want.shape, (name, have.shape, want.shape)
            continue
        scale = max(want.abs().max().item(), (magnitudes or {}).get(name, 0.0))
        if name == "pos_bias":  # exactly zero in exact arithmetic; the reference shows rounding only
            assert max_error(have, want) <= 1e-6 * max(1.0, exact[1][3].abs().max().item()), name
            continue
        if relative_rule:
            ref_err = max_error(same_precision[0] if i == 0 else same_precision[1][i - 1], want)
            if accuracy_rule:
                floor = ERROR_FLOOR[dtype] * scale
            else:
                floor = rtol_fp32 * scale if dtype == torch.float32 else 1e-3 * scale + 1e-5
            assert max_error(have, want) <= 3 * ref_err + floor, (name, max_error(have, want), ref_err)
        else:
            rtol = (rtol_overrides or {}).get(name, rtol_fp32)
            assert max_error(have, want) <= rtol * scale + 1e-12, (name, max_error(have, want), scale)


def pytest_in_interpreter_process(test_file: str, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    """Run pytest on ``test_file`` in a child process with TRITON_INTERPRET=1; (its result, its summary line).

    triton reads TRITON_INTERPRET when it is imported, so the interpreter needs a process of its own.
    """
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    print(f"TRITON_INTERPRET=1 {test_file} {' '.join(args)}: {summary}")
    return result, summary


def saturated_inputs(dtype, B=2, H=4, N=49, d=16, device="cpu"):
    """make_inputs with q and k scaled by 100: content logits of ~1e4, one key takes nearly all of each row."""
    q, k, v, *params = make_inputs(B, H, N, d, dtype=dtype, device=device)
    with torch.no_grad():
        q, k = (t * 100 for t in (q, k))
    return [t.detach().requires_grad_() for t in (q, k, v, *params)]


def logit_recompute_bounds(inputs, dot_terms: int, grad_seed=1) -> dict[str, torch.Tensor]:
    """How far q, k and v's gradients may move, elementwise, when a backward recomputes the content logits with
    other roundings than its forward (another BLAS kernel, tile shape or MMA order): the error model's share.

    Each pass computes s_ij = q_i . k_j from ``dot_terms`` fp32 roundings at most (d; d + 2 under 3xTF32's three
    products), so the two differ by |D_ij| <= 2 n u (|q| |k|^T)_ij with u = 2^-23 (rounding or truncating
    accumulation, as tensor cores may). The backward's weights P' = P exp(scale D), taken against the forward's
    row maximum and sum, move by E P with E = expm1(scale |D|): dv by (E P)^T |dO_c|, dS = P (dP - delta) by
    E P |dP - delta|, dq by scale (E P |dP - delta|) |k| and dk by its transpose times |q|. The same bound holds
    on any BLAS and on a GPU; pos_weight, pos_bias and the gate read the forward's O_c, not recomputed weights.
    """
    q, k, v, _, _, gating_param = (t.detach().double() for t in inputs)
    scale = q.shape[-1] ** -0.5
    d_max = 2 * dot_terms * 2.0**-23 * (q.abs() @ k.abs().transpose(-2, -1))
    probs = torch.softmax(scale * (q @ k.transpose(-2, -1)), dim=-1)
    moved = torch.expm1(scale * d_max) * probs
    one_minus_g = torch.sigmoid(-gating_param).view(1, -1, 1, 1)
    d_content = one_minus_g * projection_weight(q.shape, grad_seed).double()  # dO of (out * weight).sum()
    d_probs = d_content @ v.transpose(-2, -1)
    delta = (d_content * (probs @ v)).sum(-1, keepdim=True)
    moved_ds = moved * (d_probs - delta).abs()
    return {
        "q": scale * moved_ds @ k.abs(),
        "k": scale * moved_ds.transpose(-2, -1) @ q.abs(),
        "v": moved.transpose(-2, -1) @ d_content.abs(),
    }


def assert_saturated_matches_reference(inputs, **kwargs):
    """A saturated content softmax (saturated_inputs) against the fp64 reference.

    Rounding logits of 1e4 to float32 moves the fp32 reference's own dq and dk by ~1e-2 of
    their scale, so fp32 is held to the same-precision rule; fp64 to 1e-10 of each tensor's
    scale (its lse rounds by ~2e-12 there). A backend that takes the weights as exp(s - lse)
    from a rounded lse misses both by orders of magnitude.
    """
    rtol = 1e-10 if inputs[0].dtype == torch.float64 else 2e-5
    assert_matches_reference(inputs, rtol_fp32=rtol, same_precision_rule=True, **kwargs)


def registered_backends() -> list:
    """(name, its Backend) of every registered backend, in the registry's order; None where its module does not
    import here (its tests skip with the reason)."""
    found = []
    for name in backend_names():
        try:
            found.append((name, get_backend(name)))
        except BackendError:
            found.append((name, None))
    return found


def backend_param(name: str, *values):
    """``pytest.param(name, *values)`` for a test of backend ``name`` (values: device type, dtype, ...): its id, the
    ``gpu`` marker on a CUDA device, and a skip with the backend's own reason where it cannot run in this process."""
    marks = [pytest.mark.gpu] if values and values[0] == "cuda" else []
    problem = backend_problem(name)
    if problem is not None:
        marks.append(pytest.mark.skip(reason=f"backend {name!r} cannot run here: {problem}"))
    shown = [dtype_name(v) if isinstance(v, torch.dtype) else str(v) for v in values if v is not None]
    return pytest.param(name, *values, id="-".join([name, *shown]), marks=marks)
