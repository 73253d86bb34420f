"""The C++/CUDA extension's backends: "cpu" (fused CPU kernel) and "cuda" (CUDA fallback kernels).

The extension (csrc/) defines the ops ``convit_kernels_ext::gpsa_fwd`` and
``gpsa_bwd``, the project op pair's schema without the backend string, with
CPU and CUDA implementations. ``pip install --no-build-isolation -e .`` builds
them as ``convit_kernels._C`` and ``convit_kernels._C_cuda``; where a part was
not built, its first use builds it with ninja (torch.utils.cpp_extension.load,
cached under ~/.cache/torch_extensions) from the sources next to the package.

The positional softmax tables (per-axis, H x (W^2 + H_p^2)) are computed inside
the extension from ``pos_weight``, the same way as
``separable.positional_axis_probs``, so the ext ops take exactly the project
op's tensors. ``convit_kernels.op`` keeps the public op with its fake and
autograd registrations; this module registers fake implementations for the ext
ops themselves (for torch.library.opcheck and direct tracing).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from ..op import empty_backward_outputs, empty_forward_outputs
from . import FLOAT_DTYPES, HALF_AND_FLOAT, Backend, register_backend

__all__ = ["load_cpu", "load_cuda"]

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CSRC = os.path.join(os.path.dirname(_PACKAGE), "csrc")


def _build_config():
    """csrc/build_config.py (the flags setup.py uses), loaded by path."""
    spec = importlib.util.spec_from_file_location("convit_kernels_build_config", os.path.join(_CSRC, "build_config.py"))
    config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config)
    return config


def _jit_build(name: str, cuda: bool) -> None:
    """Build and load one part of the extension with ninja; raises when it cannot."""
    if not os.path.exists(os.path.join(_CSRC, "build_config.py")):
        raise ImportError(f"the package was installed without its sources ({_CSRC} is missing)")
    config = _build_config()
    if cuda:
        cuda_home, why_not = config.configure_cuda()
        if cuda_home is None:
            raise ImportError(why_not)
    import torch.utils.cpp_extension as cpp_extension

    if cuda:
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]  # read at its import, maybe before configure_cuda
    cpp_extension.load(
        name=name,
        sources=config.CUDA_SOURCES if cuda else config.CPU_SOURCES,
        extra_cflags=["-O3"] if cuda else config.cxx_flags(),
        extra_cuda_cflags=config.nvcc_flags() if cuda else None,
        extra_ldflags=[] if cuda else config.link_flags(),
        extra_include_paths=config.nvidia_include_dirs() if cuda else None,
        is_python_module=False,
        verbose=False,
    )


def _load(module: str, jit_name: str, cuda: bool) -> str | None:
    """Import a built part of the extension, or JIT-build it; return None or why it is unavailable."""
    try:
        importlib.import_module(module)
        return None
    except ImportError as exc:
        built_error = f"{module} is not built ({exc})"
    try:
        _jit_build(jit_name, cuda)
        return None
    except Exception as exc:  # a failed build leaves the backend unavailable, with the reason
        return f"{built_error}; JIT build failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}"


@functools.cache
def load_cpu() -> str | None:
    """Load the CPU part (defines the ext ops); None when loaded, else why not."""
    problem = _load("convit_kernels._C", "convit_kernels_ext_cpu", cuda=False)
    if problem is None:
        _register_fakes()
    return problem


@functools.cache
def load_cuda() -> str | None:
    """Load the CUDA part (the ops' CUDA implementations); None when loaded, else why not."""
    problem = load_cpu()
    if problem is not None:
        return f"the CPU part, which defines the ops, is unavailable: {problem}"
    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    try:
        importlib.import_module("convit_kernels._C_cuda")
        return None
    except ImportError as exc:
        built_error = f"convit_kernels._C_cuda is not built ({exc})"
    if not torch.cuda.is_available():  # nothing to run it on: no point compiling it now
        return built_error
    problem = _load("convit_kernels._C_cuda", "convit_kernels_ext_cuda", cuda=True)
    return problem


def _cuda_unavailable() -> str | None:
    problem = load_cuda()
    if problem is None and not torch.cuda.is_available():
        return "the CUDA part is built, but there is no CUDA device"
    return problem


def _register_fakes() -> None:
    @torch.library.register_fake("convit_kernels_ext::gpsa_fwd")
    def _fwd_fake(q, k, v, pos_weight, gating_param, grid_w, scale):
        return empty_forward_outputs(q)

    @torch.library.register_fake("convit_kernels_ext::gpsa_bwd")
    def _bwd_fake(grad_out, q, k, v, pos_weight, gating_param, lse, grid_w, scale):
        return empty_backward_outputs(q, pos_weight, gating_param)


def _forward(q, k, v, pos_weight, gating_param, grid_w, scale):
    return torch.ops.convit_kernels_ext.gpsa_fwd(q, k, v, pos_weight, gating_param, grid_w, scale)


def _backward(grad_out, q, k, v, pos_weight, gating_param, lse, grid_w, scale):
    return torch.ops.convit_kernels_ext.gpsa_bwd(grad_out, q, k, v, pos_weight, gating_param, lse, grid_w, scale)


register_backend(
    Backend(
        "cpu",
        "fused C++ kernel (multi-threaded, BLAS tiles)",
        devices=("cpu",),
        dtypes=FLOAT_DTYPES,
        forward=_forward,
        backward=_backward,
        unavailable=load_cpu,
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
        unavailable=_cuda_unavailable,
    )
)
