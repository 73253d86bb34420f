"""The "triton" backend compiled: on a GPU, its autotuning space, and the interpreter suite's own process.

The interpreter tests (tests/test_triton_interpreter.py) need TRITON_INTERPRET=1
set before triton is imported; this module runs them in a child process so one
``python -m pytest`` covers both modes.
"""

import os
import subprocess
import sys

import pytest
import torch

from convit_kernels import gpsa_attention
from convit_kernels.backends import resolve_backend, triton_gpsa

from gpsa_cases import LARGE_WEIGHT_RTOL, TRITON_CASE_IDS, TRITON_CASES, assert_matches_reference, make_inputs

INTERPRETER_TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_triton_interpreter.py")


@pytest.mark.slow
def test_interpreter_suite_in_its_own_process():
    if triton_gpsa.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 in this process: test_triton_interpreter.py runs here")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", INTERPRETER_TESTS]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    print(f"TRITON_INTERPRET=1 {INTERPRETER_TESTS}: {summary}")
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
    assert " passed" in summary and " skipped" not in summary, summary


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("N,block_d", [(196, 64), (7, 64), (576, 128)])
def test_autotune_space_is_pruned_by_n_and_head_dim(N, block_d, dtype):
    if not triton_gpsa.AUTOTUNE:
        pytest.skip("CONVIT_KERNELS_TRITON_AUTOTUNE=0")
    q = torch.empty(0, dtype=dtype)
    for name, tuner in triton_gpsa.KERNELS.items():
        fixed = triton_gpsa.fixed_config(name, q.element_size(), N, block_d)
        kept = tuner.early_config_prune(tuner.configs, {"Q": q, "N": N}, BLOCK_D=block_d)
        assert kept and all(c in tuner.configs for c in kept)
        for c in kept:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            assert max(bm, bn) <= max(16, 2 ** (N - 1).bit_length()) or kept == [fixed]
            assert bm * bn <= (64 * 64 if dtype == torch.float32 or block_d > 64 else 128 * 64)
            if name == "bwd_dkdv" or (name == "bwd_dq" and dtype == torch.float32):  # 16 x 256 spills there
                assert bn <= 128
        if N == 196 and block_d == 64:
            assert fixed in kept


def test_unavailable_without_gpu_or_interpreter_says_why():
    if torch.cuda.is_available() or triton_gpsa.INTERPRET:
        pytest.skip("the triton backend is available in this process")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        gpsa_attention(*make_inputs(1, 1, 4, 8), backend="triton")


# ---------------------------------------------------------------- on a GPU, compiled


def _cuda(inputs):
    return [t.detach().cuda().requires_grad_() for t in inputs]


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,N,d,grid_size,dtype", TRITON_CASES, ids=TRITON_CASE_IDS)
def test_gpu_matches_reference(B, H, N, d, grid_size, dtype):
    # fp32 dots run as 3xTF32 on the tensor cores: fp32-level, not IEEE-exact, products.
    inputs = _cuda(make_inputs(B, H, N, d, dtype=dtype, seed=N + d))
    assert_matches_reference(inputs, rtol_fp32=1e-4, backend="triton", grid_size=grid_size)


@pytest.mark.gpu
@pytest.mark.parametrize("gate,locality_strength", [(-20.0, 1.0), (20.0, 1.0), (0.0, 10.0)])
def test_gpu_gate_extremes_and_large_positional_weights(gate, locality_strength):
    inputs = _cuda(make_inputs(4, 9, 196, 48, gate=gate, locality_strength=locality_strength))
    assert_matches_reference(inputs, rtol_fp32=1e-4, rtol_overrides=LARGE_WEIGHT_RTOL, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_auto_runs_head_dims_above_the_kernels_elsewhere(dtype):
    """backend="auto" with d = 160 (the Triton kernels take up to 128) runs, on sdpa, instead of raising in Triton."""
    inputs = _cuda(make_inputs(2, 2, 49, 160, dtype=dtype))
    assert resolve_backend("auto", inputs[0].device, dtype, 160) == "sdpa"
    assert_matches_reference(inputs, rtol_fp32=1e-4, backend="auto")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_compile_fullgraph(dtype):
    torch._dynamo.reset()

    def layer(q, k, v, w, b, lam):
        return gpsa_attention(q, k, v, w, b, lam, backend="triton").float().square().sum()

    inputs = _cuda(make_inputs(2, 4, 196, 48, dtype=dtype))
    got = torch.autograd.grad(torch.compile(layer, fullgraph=True)(*inputs), inputs)
    want = torch.autograd.grad(layer(*inputs), inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
