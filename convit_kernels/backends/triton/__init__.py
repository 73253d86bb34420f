"""The "triton" backend: (1 - g) FlashAttention-2 Triton kernels + g separable P v mixed in their epilogues.

An op-pair backend whose state is [O_c (B x N x H x d), row_stats (B x H x N x 2, fp32: each row's
max of q . k and 1 / its sum of exponentials, apart)]: the dk/dv and dq kernels read both (docs/design.md,
"Triton kernels"). Runs on CUDA GPUs of sm_80 and newer, and on CPU tensors when TRITON_INTERPRET=1
was set before import (tests).
"""

from __future__ import annotations

import torch
import triton

from .. import HALF_AND_FLOAT, Backend, register_backend
from ..decomposed import sdpa_gpsa_exported
from ..eager import gpsa_backward_torch, torch_attention
from .configs import INTERPRET, MAX_HEAD_DIM
from .launch import dot_precision, gpsa_backward, gpsa_forward, interpreter_runs_loops

__all__ = ["INTERPRET"]


def _forward(q, k, v, pos_weight, gating_param, grid_w, scale, precision):
    dots = dot_precision(q.dtype, precision)
    out, content, row_stats = gpsa_forward(q, k, v, pos_weight, gating_param, grid_w, scale, dots)
    return out, [content, row_stats]


def _backward(grad_out, q, k, v, pos_weight, gating_param, state, grid_w, scale, precision):
    content, row_stats = state
    dots = dot_precision(q.dtype, precision)
    return gpsa_backward(grad_out, q, k, v, content, row_stats, pos_weight, gating_param, grid_w, scale, dots)


def _state_like(q: torch.Tensor) -> list[torch.Tensor]:
    B, H, N, d = q.shape
    return [q.new_empty((B, N, H, d)), q.new_empty((B, H, N, 2), dtype=torch.float32)]


def _unavailable() -> str | None:
    if INTERPRET:
        if interpreter_runs_loops():
            return None
        import numpy  # the interpreter's own dependency

        return (
            f"triton {triton.__version__}'s interpreter cannot run a loop over N beside numpy {numpy.__version__} "
            "(it takes int() of a 1-element array, which numpy >= 2.4 refuses): use numpy < 2.4 or triton >= 3.8"
        )
    if torch.cuda.is_available():
        return None
    return (
        "no CUDA GPU here (set TRITON_INTERPRET=1 before import to run the kernels on CPU tensors "
        "in Triton's interpreter)"
    )


register_backend(
    Backend(
        "triton",
        "(1 - g) FlashAttention-2 Triton kernels + g separable P v in their epilogues (sm_80+; "
        "CPU tensors under TRITON_INTERPRET=1)",
        devices=("cuda", "cpu") if INTERPRET else ("cuda",),
        dtypes=HALF_AND_FLOAT,
        forward=_forward,
        backward=_backward,
        state_like=_state_like,
        max_head_dim=MAX_HEAD_DIM,
        min_cuda_capability=(8, 0),
        interpreted=INTERPRET,
        large_logits="within 2x the fp32 eager error up to L = 3e6 under the interpreter (3xTF32 dots, each row's "
        "maximum and 1 / sum apart); not yet measured on a GPU",
        unavailable=_unavailable,
        double_backward=gpsa_backward_torch,
        functorch=torch_attention,
        onnx_export=sdpa_gpsa_exported,
    )
)
