"""The "triton" backend against the fp64 reference: in Triton's interpreter on CPU tensors, and on a GPU.

How triton reads TRITON_INTERPRET: ``triton.jit`` looks at it
(``triton.knobs.runtime.interpret``, read from the environment on each access)
when it *decorates* a function. That covers this project's kernels and also
triton.language's own @jit library functions (tl.sum, tl.max, tl.zeros,
tl.sigmoid, ...), decorated when triton.language is first imported. In a
full-suite run another module imports triton first, so the ``interpreter``
fixture sets the variable, swaps those library functions for interpreted ones
(monkeypatch, undone after each test) and reloads ``convit_kernels.triton_gpsa``
(which re-registers the backend with CPU support), and afterwards undoes the
patches the interpreter leaves on triton.language; ``compiled`` does the
reverse for the GPU tests. At the end the module reloads triton_gpsa in the
mode the environment had, so later modules see what they would have seen.
"""

import importlib
import os

import pytest
import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from convit_kernels import available_backends, gpsa_attention
from convit_kernels.backends import triton_gpsa
from convit_kernels.backends import BackendError, resolve_backend

from gpsa_cases import LARGE_WEIGHT_RTOL, assert_matches_reference, make_inputs, outputs_and_grads



def _reload_kernels(interpret: bool):
    if triton_gpsa.INTERPRET != interpret:
        importlib.reload(triton_gpsa)
    assert triton_gpsa.INTERPRET == interpret
    return triton_gpsa


@pytest.fixture(scope="module", autouse=True)
def _restore_mode():
    yield
    _reload_kernels(os.environ.get("TRITON_INTERPRET") == "1")


# Namespaces the interpreter patches while a kernel runs. Its nested @jit calls (tl.sum and the
# like) patch triton.language.core and never undo it (triton 3.8), which breaks later compiles in
# this process (`convit-kernels aot`, GPU tests): each interpreted test restores them afterwards.
_LANGUAGE_NAMESPACES = (tl, tl.core, tl.math, tl.core.tensor, tl.core.dtype, tl.core.tensor_descriptor_base)


@pytest.fixture
def interpreter(monkeypatch):
    saved = [(namespace, dict(vars(namespace))) for namespace in _LANGUAGE_NAMESPACES]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for module in (tl, tl.standard):  # imported in compiled mode: interpret its @jit functions too
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                monkeypatch.setattr(module, name, InterpretedFunction(value.fn))
    yield _reload_kernels(True)
    for namespace, attrs in saved:
        for name in set(vars(namespace)) - set(attrs):
            delattr(namespace, name)
        for name, value in attrs.items():
            if vars(namespace).get(name) is not value:
                setattr(namespace, name, value)


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return _reload_kernels(False)


# (B, H, N, d, grid_size, dtype). ConViT-Ti/S heads at N = 196, d = 48; uneven N (1, 7, 50, 197)
# and d (16, 40, 64, 80) with rectangular grids; each dtype on some of them. N = 1 runs in half
# precision: there A = P = 1 and dq = dk = 0 exactly, which fp32 meets only up to rounding.
# N = 257 (a prime), 289 and 576 span several key blocks of the interpreter's 256-wide tiles: the
# two-pass paths of the forward and of dq; the rest fit one key block.
CASES = [
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
CASE_IDS = [
    f"B{b}-H{h}-N{n}-d{d}" + (f"-grid{g[0]}x{g[1]}" if g else "") + "-" + str(t).replace("torch.", "")
    for b, h, n, d, g, t in CASES
]


@pytest.mark.parametrize("B,H,N,d,grid_size,dtype", CASES, ids=CASE_IDS)
def test_matches_reference(interpreter, B, H, N, d, grid_size, dtype):
    assert_matches_reference(make_inputs(B, H, N, d, dtype=dtype, seed=N + d), backend="triton", grid_size=grid_size)


@pytest.mark.parametrize(
    "gate,locality_strength,rtol_overrides",
    [(-20.0, 1.0, None), (20.0, 1.0, None), (0.0, 10.0, LARGE_WEIGHT_RTOL)],
    ids=["gate-20", "gate+20", "locality10"],
)
@pytest.mark.parametrize("N", [49, 289], ids=["one-key-block", "key-blocks"])
def test_gate_extremes_and_large_positional_weights(interpreter, gate, locality_strength, rtol_overrides, N):
    inputs = make_inputs(2, 4, N, 16, gate=gate, locality_strength=locality_strength)
    assert_matches_reference(inputs, rtol_overrides=rtol_overrides, backend="triton")


def test_strided_projection_views_equal_contiguous_copies(interpreter):
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


def test_output_and_saved_state_layout(interpreter):
    q, k, v, w, _, lam = [t.detach() for t in make_inputs(2, 3, 16, 8)]
    out, lse = triton_gpsa.gpsa_forward(q, k, v, w, lam, 4, 8**-0.5)
    assert out.shape == (2, 16, 3, 8) and out.is_contiguous() and out.dtype == q.dtype
    assert lse.shape == (2, 3, 16) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, (q @ k.transpose(-1, -2) * 8**-0.5).logsumexp(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fixed_gpu_configurations_match_reference(interpreter, monkeypatch, dtype):
    # The tiles a GPU runs at ConViT's N = 196 without autotuning (fp32: the 16 x 256 one-tile
    # forward, dq over 32 x 32 key blocks; fp16: one-tile forward and dq), interpreted: the
    # autotuner gets every fixed configuration and its pruning picks the GPU's.
    for name, tuner in interpreter.KERNELS.items():
        monkeypatch.setattr(tuner, "configs", [c for path in interpreter.FIXED_CONFIGS[name].values() for c in path.values()])
        monkeypatch.setattr(tuner, "cache", {})
    assert_matches_reference(make_inputs(1, 2, 196, 48, dtype=dtype, seed=3), backend="triton")
    element_size = torch.empty(0, dtype=dtype).element_size()
    for name, tuner in interpreter.KERNELS.items():
        assert tuner.best_config is interpreter.fixed_config(name, element_size, 196, 64), name


def test_reductions_deterministic_and_atomics_agree(interpreter):
    q, k, v, w, _, lam = [t.detach() for t in make_inputs(2, 3, 50, 16)]
    out, lse = triton_gpsa.gpsa_forward(q, k, v, w, lam, 10, 0.25)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    args = (grad_out, q, k, v, w, lam, lse, 10, 0.25)
    first, again = triton_gpsa.gpsa_backward(*args), triton_gpsa.gpsa_backward(*args)
    atomic = triton_gpsa.gpsa_backward(*args, atomic_reductions=True)
    for a, b, c in zip(first, again, atomic):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-6)


def test_backend_registration(interpreter):
    assert available_backends()["triton"].available
    assert resolve_backend("triton", torch.device("cpu"), torch.bfloat16, 48) == "triton"
    assert resolve_backend("auto", torch.device("cpu"), torch.float32, 48) != "triton"  # the interpreter is never the fast choice
    with pytest.raises(BackendError, match="takes head dims up to 128, not 136"):
        gpsa_attention(*make_inputs(1, 1, 4, 136), backend="triton")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("N,block_d", [(196, 64), (7, 64), (576, 128)])
def test_autotune_space_is_pruned_by_n_and_head_dim(compiled, N, block_d, dtype):
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


def test_unavailable_without_gpu_or_interpreter_says_why(compiled):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        gpsa_attention(*make_inputs(1, 1, 4, 8), backend="triton")


# ---------------------------------------------------------------- on a GPU, compiled


def _cuda(inputs):
    return [t.detach().cuda().requires_grad_() for t in inputs]


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,N,d,grid_size,dtype", CASES, ids=CASE_IDS)
def test_gpu_matches_reference(compiled, B, H, N, d, grid_size, dtype):
    # fp32 dots run as 3xTF32 on the tensor cores: fp32-level, not IEEE-exact, products.
    inputs = _cuda(make_inputs(B, H, N, d, dtype=dtype, seed=N + d))
    assert_matches_reference(inputs, rtol_fp32=1e-4, backend="triton", grid_size=grid_size)


@pytest.mark.gpu
@pytest.mark.parametrize("gate,locality_strength", [(-20.0, 1.0), (20.0, 1.0), (0.0, 10.0)])
def test_gpu_gate_extremes_and_large_positional_weights(compiled, gate, locality_strength):
    inputs = _cuda(make_inputs(4, 9, 196, 48, gate=gate, locality_strength=locality_strength))
    assert_matches_reference(inputs, rtol_fp32=1e-4, rtol_overrides=LARGE_WEIGHT_RTOL, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_compile_fullgraph(compiled, dtype):
    torch._dynamo.reset()

    def layer(q, k, v, w, b, lam):
        return gpsa_attention(q, k, v, w, b, lam, backend="triton").float().square().sum()

    inputs = _cuda(make_inputs(2, 4, 196, 48, dtype=dtype))
    got = torch.autograd.grad(torch.compile(layer, fullgraph=True)(*inputs), inputs)
    want = torch.autograd.grad(layer(*inputs), inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
