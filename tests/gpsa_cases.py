"""Shared test inputs and tolerances for every backend's tests."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from convit_kernels import gpsa_attention
from convit_kernels.accuracy import GATE_FLOOR

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


def make_inputs(B, H, N, d, *, dtype=torch.float32, gate=None, locality_strength=1.0, seed=0, strided=True):
    """q, k, v as strided views of a projection output (B x N x 3 x H x d), and the positional parameters.

    Every tensor is a leaf requiring grad (q, k, v through the projection buffer).
    """
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(B, N, 3, H, d, generator=g, dtype=torch.float64)
    if strided:
        proj = proj.to(dtype).requires_grad_()
        q, k, v = proj.permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (t.contiguous().to(dtype).requires_grad_() for t in proj.permute(2, 0, 3, 1, 4).unbind(0))
    pos_weight = local_pos_weight(H, locality_strength) + 0.1 * torch.randn(H, 3, generator=g, dtype=torch.float64)
    pos_bias = torch.randn(H, generator=g, dtype=torch.float64)
    gating = (
        torch.randn(H, generator=g, dtype=torch.float64)
        if gate is None
        else torch.full((H,), float(gate), dtype=torch.float64)
    )
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype  # as under AMP
    params = [t.to(param_dtype).requires_grad_() for t in (pos_weight, pos_bias, gating)]
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


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_matches_reference(
    inputs, rtol_fp32=2e-5, rtol_overrides=None, same_precision_rule=False, gate_rule=False, magnitudes=None, **kwargs
):
    """The backend's output and gradients against the fp64 reference.

    fp32/fp64 within ``rtol_fp32`` of each tensor's scale (``rtol_overrides``
    maps a name in ("out",) + PARAM_NAMES to its own bound); half precisions by
    flash-attention's rule: error at most 3x the reference computed in the same
    precision, plus a small floor. ``same_precision_rule`` applies that rule to
    fp32 too (with ``rtol_fp32`` of the scale as its floor), where the inputs
    make fp32 itself inaccurate. ``gate_rule`` holds every dtype to the on-device
    check's rule (:func:`convit_kernels.accuracy.gate`): 3x the same-precision
    reference's error plus GATE_FLOOR of the scale, an ulp for the half types.
    ``magnitudes`` maps a name to a scale that replaces the tensor's own where
    larger: the size of the terms summed into it, for inputs where those cancel
    to (nearly) zero.
    """
    dtype = inputs[0].dtype
    problem = {name: kwargs[name] for name in ("grid_size", "scale") if name in kwargs}
    exact = outputs_and_grads(upcast(inputs), backend="reference", **problem)
    got = outputs_and_grads(inputs, **kwargs)
    relative_rule = (
        gate_rule or dtype in (torch.float16, torch.bfloat16) or (same_precision_rule and dtype == torch.float32)
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
            if gate_rule:
                floor = GATE_FLOOR[dtype] * scale
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


def saturated_inputs(dtype, B=2, H=4, N=49, d=16):
    """make_inputs with q and k scaled by 100: content logits of ~1e4, one key takes nearly all of each row."""
    q, k, v, *params = make_inputs(B, H, N, d, dtype=dtype)
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


# Logit sizes of the near-tied rows (near_tied_inputs): every fp32 backend but sdpa within 2x eager up to 3e6.
NEAR_TIED_LOGITS = (100.0, 1e4, 1e6, 3e6)


def near_tied_inputs(logit: float, dtype=torch.float32, B=2, H=2, grid=(4, 4), d=32, seed=0):
    """(inputs, options): content rows with two near-tied top logits of size ``logit``.

    Row i's logits: ``logit`` and ``logit - U(0, 1)`` on two random keys, ``logit - U(2, 12)`` on
    the others. They are exact in float32: k_j is the unit vector e_j in channels < N (random in
    the others, where q is 0) and scale is 1/4, so q k^T rounds nowhere and the fp32 eager math's
    error is its softmax's alone. A backend that rounds the row maximum into a float32 lse (an ulp
    of ~1e-3 at 1e4) puts that error on every weight; one that keeps the maximum and the sum apart
    stays at the eager math's level. ``options`` are gpsa_attention's grid_size and scale.
    """
    N, scale = grid[0] * grid[1], 0.25
    g = torch.Generator().manual_seed(seed)
    logits = logit - 2 - 10 * torch.rand(B, H, N, N, generator=g, dtype=torch.float64)
    top_two = torch.rand(B, H, N, N, generator=g).argsort(-1)[..., :2]
    gaps = torch.rand(B, H, N, 2, generator=g, dtype=torch.float64) * torch.tensor([0.0, 1.0], dtype=torch.float64)
    logits.scatter_(-1, top_two, logit - gaps)
    k = torch.randn(B, H, N, d, generator=g, dtype=torch.float64)
    k[..., :N] = torch.eye(N, dtype=torch.float64)
    q = torch.zeros(B, H, N, d, dtype=torch.float64)
    q[..., :N] = logits.to(dtype).double() / scale
    _, _, v, *params = (t.detach() for t in make_inputs(B, H, N, d, dtype=dtype, seed=seed))
    inputs = [q.to(dtype), k.to(dtype), v, *params]
    return [t.requires_grad_() for t in inputs], {"grid_size": grid, "scale": scale}


def dq_dk_relative_errors(inputs, backend: str, **options) -> tuple[float, float]:
    """Max errors of dq and dk against the float64 reference, each relative to its largest value."""
    _, exact = outputs_and_grads(upcast(inputs), backend="reference", **options)
    _, got = outputs_and_grads(inputs, backend=backend, **options)
    return tuple(max_error(got[i], exact[i]) / exact[i].abs().max().item() for i in (0, 1))


# The Triton backend's cases, run under the interpreter and on a GPU: (B, H, N, d, grid_size, dtype).
# ConViT-Ti/S heads at N = 196, d = 48; uneven N (1, 7, 50, 197)
# and d (16, 40, 64, 80) with rectangular grids; each dtype on some of them. N = 1 runs in half
# precision: there A = P = 1 and dq = dk = 0 exactly, which fp32 meets only up to rounding.
# N = 257 (a prime), 289 and 576 span several key blocks of the interpreter's 256-wide tiles: the
# two-pass paths of the forward and of dq; the rest fit one key block.
TRITON_CASES = [
    (2, 4, 196, 48, None, torch.float32),
    (2, 4, 196, 48, None, torch.bfloat16),
    (1, 9, 196, 48, None, torch.float16),
    (3, 3, 7, 40, (1, 7), torch.float32),
    (2, 2, 50, 16, (5, 10), torch.float32),
    (2, 2, 50, 16, (5, 10), torch.float16),
    (1, 2, 197, 80, (197, 1), torch.float32),
    (1, 2, 197, 80, (197, 1), torch.bfloat16),
    (2, 3, 1, 64, None, torch.float16),
    (2, 2, 49, 64, None, torch.bfloat16),
    (1, 2, 257, 16, (1, 257), torch.float32),
    (1, 1, 576, 32, None, torch.bfloat16),
    (1, 2, 289, 16, None, torch.float16),
]
TRITON_CASE_IDS = [
    f"B{b}-H{h}-N{n}-d{d}" + (f"-grid{g[0]}x{g[1]}" if g else "") + "-" + str(t).replace("torch.", "")
    for b, h, n, d, g, t in TRITON_CASES
]
