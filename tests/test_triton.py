"""The "triton" backend compiled: on a GPU, its autotuning space, and the interpreter suite's own process.

The interpreter tests (tests/test_triton_interpreter.py, and the conformance suite's claims of the
backend on CPU tensors) need TRITON_INTERPRET=1 set before triton is imported; this module runs them
in a child process so one ``python -m pytest`` covers both modes. On a GPU the conformance suite runs
the backend's CUDA claims in this process.
"""

import os

import pytest
import torch

from convit_kernels.backends.triton import configs, launch
from convit_kernels.bench.saturated import NEAR_TIED_LOGITS, dq_dk_relative_errors, near_tied_inputs
from convit_kernels.dispatch import resolve_backend

from gpsa_cases import (
    assert_matches_reference,
    make_inputs,
    max_error,
    outputs_and_grads,
    pytest_in_interpreter_process,
)

TESTS = os.path.dirname(os.path.abspath(__file__))
INTERPRETER_TESTS = os.path.join(TESTS, "test_triton_interpreter.py")
CONFORMANCE_TESTS = os.path.join(TESTS, "test_conformance.py")


@pytest.mark.slow
def test_interpreter_suite_in_its_own_process():
    """The interpreter's own tests and the conformance suite's claims of the triton backend on CPU tensors."""
    if configs.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 in this process: test_triton_interpreter.py runs here")
    selected = ("-k", "triton", "-m", "not gpu")  # every test of test_triton_interpreter.py: its name matches
    result, summary = pytest_in_interpreter_process(INTERPRETER_TESTS, CONFORMANCE_TESTS, *selected)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
    assert " passed" in summary and " skipped" not in summary, summary


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("N", [196, 7, 576])
def test_autotune_space_is_pruned_by_n_and_dtype(N, dtype):
    if not launch.autotune_enabled():
        pytest.skip("CONVIT_KERNELS_TRITON_AUTOTUNE=0 or the interpreter")
    q = torch.empty(0, dtype=dtype)
    for name, tuner in launch._TUNED.items():
        assert tuner.keys == ["N", "HEAD_DIM", "ARCH"]
        kept = tuner.early_config_prune(tuner.configs, {"Q": q, "N": N})
        assert kept and all(c in tuner.configs for c in kept)
        fixed = configs.FIXED_CONFIGS[name][q.element_size()]
        if dtype == torch.float32:  # the fp32 tiles are the largest without spills: nothing to tune
            assert kept == [fixed]
            continue
        cap = max(64, 2 ** (N - 1).bit_length())
        assert all(max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= cap for c in kept) or len(kept) == 1
        if N == 196:
            assert any(c.kwargs == fixed.kwargs and c.num_warps == fixed.num_warps for c in kept), name


def test_tf32_split_is_exact_with_a_tf32_high_part():
    """3xTF32's operands (the kernels' SPLIT): high exact in TF32, high + low == x, low within half a TF32 ulp."""
    x = torch.randn(4, 3, 50, 16) * torch.logspace(-30, 30, 16)
    x[0, 0, 0, :4] = torch.tensor([0.0, -0.0, 1 + 2**-11, -(1 + 3 * 2**-11)])  # ties round away from zero
    high, low = launch.tf32_split(x.transpose(1, 2))  # any strides in; contiguous parts out
    assert high.is_contiguous() and low.is_contiguous()
    high, low = high.transpose(1, 2), low.transpose(1, 2)
    assert torch.equal(high.view(torch.int32) & 0x1FFF, torch.zeros_like(high, dtype=torch.int32))
    assert torch.equal(high + low, x)
    assert (low.abs() <= x.abs() * 2**-11).all()
    assert high[0, 0, 0, :4].tolist() == [0.0, 0.0, 1 + 2**-10, -(1 + 2 * 2**-10)]


@pytest.mark.parametrize("setting,split", [("highest", True), ("high", False), ("medium", False)])
def test_fp32_dots_follow_torch_matmul_precision(setting, split):
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(setting)
        assert launch.dot_constexprs(torch.float32)["SPLIT"] is split
        assert launch.dot_constexprs(torch.float32)["PRECISION"] == "tf32"
        assert launch.dot_constexprs(torch.bfloat16)["SPLIT"] is False  # 16-bit operands ignore it
    finally:
        torch.set_float32_matmul_precision(previous)


# ---------------------------------------------------------------- on a GPU, compiled


def _cuda(inputs):
    return [t.detach().cuda().requires_grad_() for t in inputs]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_auto_runs_head_dims_above_the_kernels_elsewhere(dtype):
    """backend="auto" with d = 160 (the Triton kernels take up to 128) runs, on sdpa, instead of raising in Triton."""
    inputs = _cuda(make_inputs(2, 2, 49, 160, dtype=dtype))
    assert resolve_backend("auto", inputs[0].device, dtype, 160) == "sdpa"
    assert_matches_reference(inputs, rtol_fp32=1e-4, backend="auto")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_deterministic_mode_is_bitwise_stable(dtype):
    inputs = _cuda(make_inputs(4, 9, 196, 48, dtype=dtype))
    torch.use_deterministic_algorithms(True)
    try:
        runs = [outputs_and_grads(inputs, backend="triton") for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_saturated_content_softmax():
    q, k, v, *params = make_inputs(2, 4, 196, 16)
    with torch.no_grad():
        q, k = (t * 100 for t in (q, k))
    inputs = _cuda([q, k, v, *params])
    exact = outputs_and_grads([t.detach().double().requires_grad_() for t in inputs], backend="reference")
    sdpa = outputs_and_grads(inputs, backend="sdpa")
    got = outputs_and_grads(inputs, backend="triton")
    for have, ref, want in zip(got[1], sdpa[1], exact[1]):
        assert max_error(have, want) <= 3 * max_error(ref, want) + 2e-5 * want.abs().max().item() + 1e-12


@pytest.mark.gpu
@pytest.mark.parametrize("logit", NEAR_TIED_LOGITS, ids=lambda x: f"L{x:g}")
def test_gpu_near_tied_rows_within_twice_the_eager_error(logit):
    # The interpreter test of the same name, compiled: the row max and sum kept apart hold fp32 dq and dk
    # at the eager math's accuracy up to logits of 1e4.
    inputs, options = near_tied_inputs(logit, grid=(6, 8), d=64)
    inputs = _cuda(inputs)
    eager = dq_dk_relative_errors(inputs, "torch", **options)
    got = dq_dk_relative_errors(inputs, "triton", **options)
    for name, have, bound in zip(("dq", "dk"), got, eager):
        assert have <= 2 * bound, f"{name}: relative error {have:.2e} > 2x the fp32 eager math's {bound:.2e}"
