"""The "cpu" and "cuda" backends: the extension's ops ``convit_kernels_ext::gpsa_fwd`` / ``gpsa_bwd``.

Those are the kernels, not the package's GPSA op ``convit_kernels::gpsa_fwd`` / ``gpsa_bwd``
(:mod:`convit_kernels.gpsa_op`), which runs them through this module when one of these backends is
chosen. Both pairs keep their registered names (saved and exported graphs hold them); in Python the
extension's are reached only as ``torch.ops.convit_kernels_ext.*``.

They keep the op-pair contract minus the precision (the kernels accumulate in fp32 / fp64 with
plain FMA); the per-axis positional tables are computed inside the extension from ``pos_weight``.
Loading and building the extension is :mod:`convit_kernels.extension_loader`'s job; fakes of the
ext ops are registered here once the CPU part (which defines them) is loaded, for opcheck.
"""

from __future__ import annotations

import functools

import torch

from .. import settings
from ..extension_loader import load_cpu, load_cuda
from . import FLOAT_DTYPES, HALF_AND_FLOAT, Backend, empty_backward_outputs, register_backend, stats_state_like
from .decomposed import sdpa_gpsa_exported
from .eager import gpsa_backward_torch, torch_attention

__all__ = ["cpu_unavailable", "cuda_unavailable"]


@functools.cache
def cpu_unavailable() -> str | None:
    """Why the CPU part cannot run here (None when it can: then the ext ops have their fakes)."""
    problem = load_cpu()
    if problem is None:
        _register_fakes()
    return problem


def cuda_unavailable() -> str | None:
    problem = load_cuda() or cpu_unavailable()
    if problem is None and not torch.cuda.is_available():
        return "the CUDA part is built, but there is no CUDA device"
    return problem


def _register_fakes() -> None:
    @torch.library.register_fake("convit_kernels_ext::gpsa_fwd")
    def _fwd_fake(q, k, v, pos_weight, gating_param, grid_w, scale, use_blas=True):
        B, H, N, d = q.shape
        return q.new_empty((B, N, H, d)), stats_state_like(q)[0]

    @torch.library.register_fake("convit_kernels_ext::gpsa_bwd")
    def _bwd_fake(grad_out, q, k, v, pos_weight, gating_param, stats, grid_w, scale, use_blas=True):
        return empty_backward_outputs(q, pos_weight, gating_param)


def _use_blas(q: torch.Tensor) -> bool:
    """The CPU kernel's tile products through BLAS unless CONVIT_KERNELS_NO_BLAS (the CUDA kernels ignore it)."""
    return q.device.type != "cpu" or not settings.enabled("CONVIT_KERNELS_NO_BLAS")


def _forward(q, k, v, pos_weight, gating_param, grid_w, scale, precision):
    extension_ops = torch.ops.convit_kernels_ext
    out, stats = extension_ops.gpsa_fwd(q, k, v, pos_weight, gating_param, grid_w, scale, _use_blas(q))
    return out, [stats]


def _backward(grad_out, q, k, v, pos_weight, gating_param, state, grid_w, scale, precision):
    (stats,) = state
    extension_ops = torch.ops.convit_kernels_ext
    return extension_ops.gpsa_bwd(grad_out, q, k, v, pos_weight, gating_param, stats, grid_w, scale, _use_blas(q))


register_backend(
    Backend(
        "cpu",
        "fused C++ kernel (multi-threaded, BLAS tiles)",
        devices=("cpu",),
        dtypes=FLOAT_DTYPES,
        forward=_forward,
        backward=_backward,
        unavailable=cpu_unavailable,
        double_backward=gpsa_backward_torch,
        functorch=torch_attention,
        onnx_export=sdpa_gpsa_exported,
    )
)
register_backend(
    Backend(
        "cuda",
        "CUDA extension kernels (fallback for GPUs Triton does not serve; sm_75+)",
        devices=("cuda",),
        dtypes=HALF_AND_FLOAT,
        forward=_forward,
        backward=_backward,
        max_head_dim=128,
        min_cuda_capability=(7, 5),
        whole_tables=True,
        large_logits="the cpu kernel's algorithm (each row's maximum and sum apart); never run on a GPU yet",
        unavailable=cuda_unavailable,
        double_backward=gpsa_backward_torch,
        functorch=torch_attention,
        onnx_export=sdpa_gpsa_exported,
    )
)
