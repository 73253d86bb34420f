"""The "triton" backend in Triton's interpreter, on CPU tensors: what is particular to its kernels.

``triton.jit`` reads TRITON_INTERPRET when it decorates a function, this
project's kernels and triton.language's own library functions alike, so these
tests need a process that set it before importing triton. The README's test
command runs them that way: tests/test_triton.py starts
``TRITON_INTERPRET=1 python -m pytest tests/test_triton_interpreter.py tests/test_conformance.py -k triton``,
which also runs the conformance suite (every claim against the fp64 reference, edges, layouts,
opcheck, compile, torch.func, double backward, refusals) on the interpreted backend. In a process
without it, these tests skip.
"""

import pytest
import torch

from convit_kernels import available_backends, gpsa_attention
from convit_kernels.backends.triton import configs, launch
from convit_kernels.bench.saturated import NEAR_TIED_LOGITS, dq_dk_relative_errors, near_tied_inputs
from convit_kernels.dispatch import resolve_backend
from convit_kernels.reference import gpsa_reference

from gpsa_cases import (
    PARAM_NAMES,
    assert_matches_reference,
    logit_recompute_bounds,
    make_inputs,
    max_error,
    outputs_and_grads,
    saturated_inputs,
    upcast,
)

pytestmark = pytest.mark.skipif(
    not configs.INTERPRET,
    reason="needs TRITON_INTERPRET=1 before import: tests/test_triton.py runs this module in its own process",
)


def three_tf32_output(inputs):
    """The fp64 reference output with the logits 3xTF32 makes: q_hi k_hi + q_hi k_lo + q_lo k_hi.

    q and k split as the kernels take them (``launch.tf32_split``); the three products are
    one product of q and k each laid three times along d.
    """
    q, k, v, *params = (t.detach().double() for t in inputs)
    q_hi, q_lo = launch.tf32_split(inputs[0].detach()).double()
    k_hi, k_lo = launch.tf32_split(inputs[1].detach()).double()
    q3, k3 = torch.cat((q_hi, q_hi, q_lo), -1), torch.cat((k_hi, k_lo, k_hi), -1)
    side = int(q.shape[2] ** 0.5)
    return gpsa_reference(q3, k3, v, *params, (side, side), q.shape[-1] ** -0.5)


@pytest.mark.parametrize("N", [49, 196], ids=["one-key-tile", "key-tiles"])
def test_saturated_content_softmax(N):
    """q, k x 100 (logits ~1e4): the backward keeps PyTorch's own fused attention's fp32 accuracy.

    The rounding of logits of ~1e4 in fp32 (~1e-3 absolute, recomputed in the backward) bounds
    every fp32 kernel here; the bound is 3x the error of the sdpa backend (PyTorch's flash
    kernel plus the same separable branch), plus what the backward's recomputed logits may move
    by (logit_recompute_bounds): the interpreter's dots are numpy's BLAS, whose kernel (and so the
    last bits of each logit) changes with the operands' shapes and with OPENBLAS_CORETYPE. That
    worst-case share is loose here (up to ~0.4 of q, k, v's gradient scale at these logits, ~100x
    what one BLAS or the other moves them); test_near_tied_rows_within_twice_the_eager_error holds
    dq and dk to 2x the eager error on logits every pass computes exactly. delta_c = dO . O_c
    keeps T - delta_c near 0 where the row is one-hot; the former sum_j A_ij T_ij with a
    natural-log lse gave dq errors of ~0.1 where dq is ~1e-3.
    """
    inputs = saturated_inputs(torch.float32, N=N)
    exact = outputs_and_grads(upcast(inputs), backend="reference")
    sdpa = outputs_and_grads([t.detach().clone().requires_grad_() for t in inputs], backend="sdpa")
    got = outputs_and_grads(inputs, backend="triton")
    split = launch.dot_constexprs(torch.float32)["SPLIT"]
    # Under "highest" the kernels' logits are 3xTF32's, which leave out q_lo . k_lo (~2^-22 of
    # |q| |k|, ~1e-3 at these logits): the 3x budget covers that model's own error too.
    allowed = max_error(sdpa[0], exact[0])
    if split:
        allowed += max_error(three_tf32_output(inputs), exact[0])
    assert max_error(got[0], exact[0]) <= 3 * allowed + 2e-5 * exact[0].abs().max().item()
    recomputed = logit_recompute_bounds(inputs, inputs[0].shape[-1] + 2 if split else inputs[0].shape[-1])
    for i, name in enumerate(PARAM_NAMES):
        scale = exact[1][i].abs().max().item()
        error = (got[1][i].double() - exact[1][i].double()).abs()
        if name in recomputed:
            error = (error - recomputed[name]).clamp(min=0)
        error, sdpa_error = error.max().item(), max_error(sdpa[1][i], exact[1][i])
        assert error <= 3 * sdpa_error + 2e-5 * scale + 1e-12, (name, error, sdpa_error, scale)


@pytest.mark.parametrize("logit", NEAR_TIED_LOGITS, ids=lambda x: f"L{x:g}")
def test_near_tied_rows_within_twice_the_eager_error(monkeypatch, logit):
    """Two near-tied top logits of size L per row: dq and dk within 2x the fp32 eager math's error.

    The logits are exact in fp32 and under 3xTF32 (near_tied_inputs: q k^T has one nonzero
    product per pair, and 3xTF32 splits q exactly), so the error measured is the softmax's: a
    row maximum rounded into a float32 lse, or logits rounded at their full size before the
    maximum is taken off, puts ~1e-3 (log2 units) on every weight. The GPU's fp32 tiles (16
    queries x 32 keys, dk/dv 32 queries x 16 keys) over N = 48 run full and partial tiles and the forward's rescaling.
    """
    assert launch.dot_constexprs(torch.float32)["SPLIT"]  # torch's default "highest": 3xTF32
    gpu_fp32 = {name: by_size[4] for name, by_size in configs.FIXED_CONFIGS.items()}
    monkeypatch.setattr(configs, "INTERPRETER_CONFIGS", gpu_fp32)
    inputs, options = near_tied_inputs(logit, grid=(6, 8), d=64)
    eager = dq_dk_relative_errors(inputs, "torch", **options)
    got = dq_dk_relative_errors(inputs, "triton", **options)
    for name, have, bound in zip(("dq", "dk"), got, eager):
        assert have <= 2 * bound, f"{name}: relative error {have:.2e} > 2x the fp32 eager math's {bound:.2e}"


def test_auto_takes_head_dims_above_the_kernels_to_another_backend(monkeypatch):
    """backend="auto" where triton comes first (CUDA's policy, here on the interpreter's CPU tensors) runs
    d = 160 on the next backend instead of raising inside Triton, and d = 64 on triton."""
    from convit_kernels import dispatch

    monkeypatch.setitem(dispatch.AUTO_POLICY, "cpu", (("triton", "sdpa"), "CUDA's order, for this test"))
    assert resolve_backend("auto", torch.device("cpu"), torch.float32, 64) == "triton"
    assert resolve_backend("auto", torch.device("cpu"), torch.float32, 160) == "sdpa"
    assert_matches_reference(make_inputs(1, 2, 16, 160), backend="auto")
    assert_matches_reference(make_inputs(1, 2, 16, 64), backend="auto")


def test_auto_never_picks_the_interpreter():
    assert available_backends()["triton"].available
    assert resolve_backend("auto", torch.device("cpu"), torch.float32, 48) != "triton"


def test_strided_projection_views_equal_contiguous_copies():
    B, N, H, d = 2, 50, 3, 40
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, 2 * H * d, generator=gen)
    v_proj = torch.randn(B, N, H * d, generator=gen)
    q, k = x.reshape(B, N, 2, H, d).permute(2, 0, 3, 1, 4)  # as timm's GPSA takes them from qk(x)
    v = v_proj.reshape(B, N, H, d).permute(0, 2, 1, 3)
    assert not q.is_contiguous() and not v.is_contiguous()
    params = make_inputs(1, H, N, d)[3:]
    strided = [t.requires_grad_() for t in (q, k, v)]
    copies = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    got_strided = outputs_and_grads(strided + params, backend="triton", grid_size=(5, 10))
    got_copies = outputs_and_grads(copies + params, backend="triton", grid_size=(5, 10))
    assert torch.equal(got_strided[0], got_copies[0])
    for a, b in zip(got_strided[1], got_copies[1]):
        assert torch.equal(a, b)


def test_output_and_saved_state_layout():
    q, k, v, w, _, lam = [t.detach() for t in make_inputs(2, 3, 16, 8)]
    out, content, row_stats = launch.gpsa_forward(q, k, v, w, lam, 4, 8**-0.5)
    assert out.shape == content.shape == (2, 16, 3, 8) and out.is_contiguous() and content.is_contiguous()
    assert out.dtype == content.dtype == q.dtype
    dots = q @ k.transpose(-1, -2)
    logits = dots * 8**-0.5
    # Each row's max of q . k (unscaled) and 1 / its sum of exp((q . k - max) scale), apart.
    assert row_stats.shape == (2, 3, 16, 2) and row_stats.dtype == torch.float32
    row_max, inv_sum = row_stats.unbind(-1)
    torch.testing.assert_close(row_max, dots.amax(-1))
    torch.testing.assert_close(inv_sum, 1 / ((dots - row_max[..., None]) * 8**-0.5).exp().sum(-1))
    torch.testing.assert_close(row_max * 8**-0.5 - inv_sum.log(), logits.logsumexp(-1))  # together: the lse
    torch.testing.assert_close(content.transpose(1, 2), logits.softmax(-1) @ v)


@pytest.mark.parametrize("N", [49, 128], ids=["one-key-tile", "even-key-tiles"])
def test_gpsa_free_twin_is_plain_attention(N):
    q, k, v = [t.detach() for t in make_inputs(2, 3, N, 64)[:3]]
    out, content, _ = launch.attention_forward(q, k, v, 0.125)
    assert content is None
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.125)
    torch.testing.assert_close(out.transpose(1, 2), plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fixed_gpu_configurations_match_reference(monkeypatch, dtype):
    # The tiles a GPU runs without autotuning, interpreted at ConViT's N = 196.
    size = torch.empty(0, dtype=dtype).element_size()
    gpu = {name: by_size[size] for name, by_size in configs.FIXED_CONFIGS.items()}
    monkeypatch.setattr(configs, "INTERPRETER_CONFIGS", gpu)
    assert_matches_reference(make_inputs(1, 2, 196, 48, dtype=dtype, seed=3), backend="triton")


def test_deterministic_mode_runs_the_fixed_configurations(monkeypatch):
    class NotTuned:
        def __getitem__(self, grid):
            raise AssertionError("autotuned launch under torch.use_deterministic_algorithms(True)")

    monkeypatch.setattr(launch, "autotune_enabled", lambda: True)
    monkeypatch.setattr(launch, "_TUNED", dict.fromkeys(launch._TUNED, NotTuned()))
    torch.use_deterministic_algorithms(True)
    try:
        first = outputs_and_grads(make_inputs(1, 2, 49, 16), backend="triton")
    finally:
        torch.use_deterministic_algorithms(False)
    with pytest.raises(AssertionError, match="autotuned launch"):
        outputs_and_grads(make_inputs(1, 2, 49, 16), backend="triton")
    assert torch.isfinite(first[0]).all()


def test_backward_is_deterministic():
    q, k, v, w, _, lam = [t.detach() for t in make_inputs(2, 3, 50, 16)]
    out, content, row_stats = launch.gpsa_forward(q, k, v, w, lam, 10, 0.25)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    args = (grad_out, q, k, v, content, row_stats, w, lam, 10, 0.25)
    for a, b in zip(launch.gpsa_backward(*args), launch.gpsa_backward(*args)):
        assert torch.equal(a, b)


def test_backward_keeps_the_forward_fp32_precision():
    """A change of torch's matmul precision between forward and backward does not reach the backward.

    The backward recomputes the logits; under another split than the forward's its p would no
    longer be normalised by the saved row max and sum.
    """
    previous = torch.get_float32_matmul_precision()

    def grads(backward_precision):
        inputs = make_inputs(1, 2, 49, 16, seed=3)
        torch.set_float32_matmul_precision("highest")
        out = gpsa_attention(*inputs, backend="triton")
        torch.set_float32_matmul_precision(backward_precision)
        return torch.autograd.grad(out.square().sum(), inputs[:3])

    try:
        for same, changed in zip(grads("highest"), grads("high")):
            assert torch.equal(same, changed)
    finally:
        torch.set_float32_matmul_precision(previous)


# Uneven N (50 on 5 x 10, 257 on 1 x 257: two of the interpreter's 256-wide key blocks, 49) and d (40, 24).
NAN_FILLED_CASES = [
    (2, 3, 50, 40, (5, 10), torch.float32),
    (1, 2, 257, 24, (1, 257), torch.float32),
    (2, 2, 49, 40, None, torch.float16),
]


@pytest.mark.parametrize("B,H,N,d,grid_size,dtype", NAN_FILLED_CASES, ids=["N50-d40", "N257-d24", "N49-d40-fp16"])
def test_every_output_and_gradient_element_written(B, H, N, d, grid_size, dtype):
    """Under torch.use_deterministic_algorithms(True) the launchers' torch.empty outputs, saved state and gradients
    start as NaN (tests/test_uninitialised.py shows the fill): every element finite and matching the reference."""
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.empty(4).isnan().all()
        inputs = make_inputs(B, H, N, d, dtype=dtype, seed=N + d)
        assert_matches_reference(inputs, backend="triton", grid_size=grid_size)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reruns_are_bitwise_identical(dtype):
    """Forward and backward through gpsa_attention twice on the same inputs: the same bits (deterministic: fixed
    reduction orders, no atomics). Across thread counts the interpreter's numpy promises nothing: not asserted."""
    inputs = make_inputs(2, 3, 50, 40, dtype=dtype, seed=4)
    runs = [outputs_and_grads([t.detach().requires_grad_() for t in inputs], backend="triton", grid_size=(5, 10))]
    runs.append(outputs_and_grads([t.detach().requires_grad_() for t in inputs], backend="triton", grid_size=(5, 10)))
    (out_a, grads_a), (out_b, grads_b) = runs
    assert torch.equal(out_a, out_b)
    for i, (a, b) in enumerate(zip(grads_a, grads_b, strict=True)):
        assert torch.equal(a, b), i
