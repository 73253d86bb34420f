"""Launchers of the Triton kernels: explicit strides, constexprs, the 3xTF32 operand split, autotuning or not.

:func:`gpsa_forward` / :func:`gpsa_backward` are the backend's two directions; :func:`attention_forward`
also runs the GPSA-free twin (plain attention), the yardstick of `convit-kernels aot`.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from ... import settings
from ...separable import (
    apply_positional,
    bhnd,
    head_major,
    positional_axes,
    positional_backward,
)
from .configs import INTERPRET, MAX_HEAD_DIM, TUNING_SPACE, fixed_config, tuned
from .kernels import EVEN_FLAGS, KERNELS, LOG2E, runtime_loop_probe

__all__ = [
    "gpsa_forward",
    "gpsa_backward",
    "attention_forward",
    "dot_precision",
    "dot_constexprs",
    "head_dims",
    "tf32_split",
    "autotune_enabled",
    "interpreter_runs_loops",
]


def _with_even_flag(name, kernel):
    if name not in EVEN_FLAGS:
        return kernel
    flag, block = EVEN_FLAGS[name]
    return triton.heuristics({flag: lambda args: args["N"] % args[block] == 0})(kernel)


_FIXED = {name: _with_even_flag(name, kernel) for name, kernel in KERNELS.items()}
_TUNED = {name: tuned(name)(_FIXED[name]) for name in KERNELS if TUNING_SPACE[name]}


def dot_dtype(dtype: torch.dtype):
    """Element type of the tl.dot operands: the input's, except bf16 under the interpreter (fp32 there)."""
    if dtype == torch.bfloat16 and INTERPRET:
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


def dot_precision(dtype: torch.dtype, matmul_precision: str | None = None) -> str:
    """tl.dot's input_precision: fp32 follows torch's matmul precision (default its current one); 16-bit ignores it.

    "highest" (torch's default) takes 3xTF32, three tensor-core products per dot with fp32-level
    accuracy; "high" / "medium" one TF32 product, about 3x cheaper and ~1e-3 relative.
    """
    matmul_precision = matmul_precision or torch.get_float32_matmul_precision()
    if dtype == torch.float32 and matmul_precision == "highest":
        return "tf32x3"
    return "tf32"


def head_dims(d: int):
    """(HEAD_DIM, BLOCK_D) of a head dim the registry let through (d <= MAX_HEAD_DIM)."""
    if d > MAX_HEAD_DIM:
        raise ValueError(f"the triton backend takes head dims up to {MAX_HEAD_DIM}, got {d}")
    return d, max(16, triton.next_power_of_2(d))


def _arch(device: torch.device) -> int:
    """10 major + minor of a CUDA device (0 elsewhere): the autotuning key's architecture."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def autotune_enabled() -> bool:
    """Compiled kernels autotune unless CONVIT_KERNELS_TRITON_AUTOTUNE is off; interpreted ones never do."""
    return settings.enabled("CONVIT_KERNELS_TRITON_AUTOTUNE") and not INTERPRET  # read first: a bad value is refused


@functools.cache
def interpreter_runs_loops() -> bool:
    """Whether Triton's interpreter runs a loop with a runtime bound here.

    triton 3.6's interpreter takes int() of the bound's 1-element array, which numpy 2.4 refuses
    (TypeError); triton 3.8's squeezes it first. Asked once, by running a one-program kernel.
    """
    out = torch.zeros(1, dtype=torch.int32)
    try:
        runtime_loop_probe[(1,)](out, 3)
    except Exception:  # the interpreter's own error types change between releases
        return False
    return int(out) == 3


def _launch(kernel_name, grid, q, args, **constexprs):
    """Run a kernel on q's device: autotuned, or in its fixed configuration.

    The fixed configuration is the same in every process, so under
    ``torch.use_deterministic_algorithms(True)`` (or CONVIT_KERNELS_TRITON_AUTOTUNE=0) results
    are bitwise stable across processes and ranks; an autotuned choice depends on timings.
    """
    head_dim, block_d = head_dims(q.shape[-1])
    constexprs.update(HEAD_DIM=head_dim, BLOCK_D=block_d, ARCH=_arch(q.device))
    autotuned = _TUNED.get(kernel_name)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if autotune_enabled() and autotuned is not None and not torch.are_deterministic_algorithms_enabled():
            autotuned[lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **constexprs)
            return
        config = fixed_config(kernel_name, q.element_size())
        _FIXED[kernel_name][grid(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"])](
            *args, **constexprs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
        )


def dot_constexprs(dtype: torch.dtype, precision: str | None = None) -> dict:
    """DOT_DTYPE, PRECISION and SPLIT of the kernels; the fp32 precision defaults to torch's (:func:`dot_precision`).

    3xTF32 is SPLIT: the launchers hand the kernels each fp32 operand as a TF32 high part and
    its remainder (:func:`tf32_split`) and the kernels make the three TF32 products themselves.
    Triton's own "tf32x3" splits operands inside the kernel, where the resident ones then spill
    registers; and the forward and both backward kernels split alike, so the backward's logits
    are the forward's to the last bit that matters for saturated softmaxes.
    """
    if precision is None or dtype != torch.float32:
        precision = dot_precision(dtype)
    split = precision == "tf32x3"
    return dict(DOT_DTYPE=dot_dtype(dtype), PRECISION="tf32" if split else precision, SPLIT=split)


def tf32_split(x: torch.Tensor) -> torch.Tensor:
    """2 x (x's shape) contiguous fp32: x rounded to TF32 (exact as a TF32 operand) and x minus that (exact).

    The operands of the SPLIT kernels: a product of x and y is then three TF32 products,
    hi hi + hi lo + lo hi, which leaves out only lo lo (~2^-22 relative): 3xTF32.
    """
    x = x.detach()  # the kernels' operands: the custom ops' autograd is their own
    pair = torch.empty((2, *x.shape), device=x.device, dtype=torch.float32)
    high = pair[0]
    high.copy_(x)
    # The bits as int32: + half an ulp of TF32, then clear the 13 bits TF32 drops (nearest, ties away).
    high.view(torch.int32).add_(0x1000).bitwise_and_(~0x1FFF)
    torch.sub(x, high, out=pair[1])
    return pair


def _gates_table(gating_param: torch.Tensor) -> torch.Tensor:
    """H x 2 fp32 (g, 1 - g), with 1 - g = sigmoid(-lambda): exact where g rounds to 1."""
    lam = gating_param.detach().to(torch.float32)
    return torch.stack((torch.sigmoid(lam), torch.sigmoid(-lam)), -1).contiguous()


def attention_forward(q, k, v, scale: float, positional=None, gates=None, precision: str | None = None):
    """(out, O_c, row_stats) of the forward kernel; plain attention (its GPSA-free twin) when positional is None.

    q, k, v: B x H x N x d, any strides. positional: B x H x N x d fp32 ``g P v``, gates: the
    H x 2 (g, 1 - g) table. out and O_c are B x N x H x d in q's dtype (O_c None for the twin).
    row_stats is B x H x N x 2 fp32: each row's max m of q . k (unscaled) and 1 / l, l the sum of
    exp((q . k - m) scale), kept apart so that the backward's weights are exp((q . k - m) scale) / l
    with no float32 lse rounded at the logits' size. precision: fp32's dots (:func:`dot_precision`'s
    value; default torch's current setting).
    """
    B, H, N, d = q.shape
    gpsa = positional is not None
    out = torch.empty((B, N, H, d), device=q.device, dtype=q.dtype)
    dots, lo_offset = dot_constexprs(q.dtype, precision), 0
    if dots["SPLIT"]:  # each operand's TF32 high part, its low part lo_offset elements further on
        q, k, v = (tf32_split(t)[0] for t in (q, k, v))
        lo_offset = q.numel()
    out_bhnd = out.transpose(1, 2)
    content = torch.empty_like(out) if gpsa else None
    row_stats = torch.empty((B, H, N, 2), device=q.device, dtype=torch.float32)
    if not gpsa:  # the twin reads neither: any tensors of the right kind fill the slots
        positional, gates = out_bhnd, row_stats
    _launch(
        "fwd", lambda bm, bn: (triton.cdiv(N, bm), B * H), q,
        (q, k, v, positional, gates, out_bhnd, content.transpose(1, 2) if gpsa else out_bhnd, row_stats,
         *q.stride(), *k.stride(), *v.stride(), *positional.stride(), *out_bhnd.stride(),
         H, N, scale * LOG2E, lo_offset),
        **dots, GPSA=gpsa,
    )  # fmt: skip
    return out, content, row_stats


def gpsa_forward(q, k, v, pos_weight, gating_param, grid_w: int, scale: float, precision: str | None = None):
    """(out, O_c, row_stats): the content branch in the kernel, g P v from the separable unit mixed in its epilogue."""
    grid_h = q.shape[2] // grid_w
    gates = _gates_table(gating_param)
    gated = positional_axes(pos_weight.float(), grid_h, grid_w, gates[:, 0])  # g P = (g py) (x) px
    positional = bhnd(apply_positional(gated, head_major(v, grid_h, torch.float32)))  # g P v, fp32
    return attention_forward(q, k, v, scale, positional, gates, precision)


def gpsa_backward(
    grad_out, q, k, v, content, row_stats, pos_weight, gating_param, grid_w: int, scale: float,
    precision: str | None = None,
):  # fmt: skip
    """(dq, dk, dv in B x N x H x d, d pos_weight, d gating_param); grad_out and content are B x N x H x d.

    row_stats: the forward's (:func:`attention_forward`).

    precision: the forward's (its logits are recomputed here as the forward made them).
    """
    B, H, N, d = q.shape
    grid_h = N // grid_w
    gates = _gates_table(gating_param)
    g = gates[:, 0]
    dout = grad_out.transpose(1, 2)  # B x H x N x d views
    content = content.transpose(1, 2)

    # The positional half on head-major fp32 copies: P^T dO, the tables' gradients, sum dO . P v.
    axes = positional_axes(pos_weight.float(), grid_h, grid_w)
    v_hm, dout_hm = head_major(v, grid_h, torch.float32), head_major(dout, grid_h, torch.float32)
    pt_dout_hm, dw, sum_delta_p = positional_backward(axes, dout_hm, v_hm)  # sum_delta_p: sum dO . P v per head
    d_pos_weight = g.view(H, 1) * dw
    pt_dout = bhnd(pt_dout_hm)

    delta = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    _launch(
        "bwd_pre", lambda bm, bn: (triton.cdiv(N, bm), B * H), q,
        (content, dout, delta, *content.stride(), *dout.stride(), H, N),
    )  # fmt: skip
    dq, dk, dv = (torch.empty((B, N, H, d), device=q.device, dtype=q.dtype) for _ in range(3))
    dq_bhnd, dk_bhnd, dv_bhnd = (t.transpose(1, 2) for t in (dq, dk, dv))
    dots, lo_offset = dot_constexprs(q.dtype, precision), 0
    if dots["SPLIT"]:
        q, k, v, dout = (tf32_split(t)[0] for t in (q, k, v, dout))
        lo_offset = q.numel()
    _launch(
        "bwd_dkdv", lambda bm, bn: (triton.cdiv(N, bn), B * H), q,
        (q, k, v, dout, row_stats, delta, pt_dout, gates, dk_bhnd, dv_bhnd,
         *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *pt_dout.stride(), *dk_bhnd.stride(),
         H, N, scale * LOG2E, scale, lo_offset),
        **dots,
    )  # fmt: skip
    _launch(
        "bwd_dq", lambda bm, bn: (triton.cdiv(N, bm), B * H), q,
        (q, k, v, dout, row_stats, delta, gates, dq_bhnd,
         *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq_bhnd.stride(),
         H, N, scale * LOG2E, scale, lo_offset),
        **dots,
    )  # fmt: skip
    # d lambda = g (1 - g) sum_(b, i) (delta_p - delta_c): fixed-order sums, deterministic.
    d_gating = g * gates[:, 1] * (sum_delta_p - delta.sum((0, 2)))
    return dq, dk, dv, d_pos_weight.to(pos_weight.dtype), d_gating.to(gating_param.dtype)
