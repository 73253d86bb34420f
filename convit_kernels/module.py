"""Drop-in modules: ``FusedGPSA`` for timm's / facebookresearch's GPSA, ``SDPAMHSA`` for their MHSA.

Both keep the parameter names and shapes of the modules they replace, so a
stock ConViT state_dict loads with ``strict=True``, and both can wrap an
existing module, sharing its Parameter objects (``from_gpsa`` / ``from_mhsa``).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .attention import gpsa_attention, square_grid_side
from .backends import BackendError, backend_names, get_backend
from .reference import gpsa_attention_probs, gpsa_reference, relative_positions

try:  # runs a function while Dynamo traces (torch._dynamo's own, no public API does it): warnings under compile
    from torch._dynamo.comptime import comptime
except ImportError:  # a torch without it: no warning under torch.compile, the graph still compiles

    def comptime(fn):
        return None


__all__ = ["FusedGPSA", "SDPAMHSA"]


@torch.no_grad()
def _trunc_normal_(tensor: torch.Tensor, std: float, a: float = -2.0, b: float = 2.0) -> torch.Tensor:
    """timm.layers.trunc_normal_ (mean 0), the same draws without importing timm."""

    def norm_cdf(x: float) -> float:
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    low, high = norm_cdf(a / std), norm_cdf(b / std)
    tensor.uniform_(2 * low - 1, 2 * high - 1)
    tensor.erfinv_()
    tensor.mul_(std * math.sqrt(2.0))
    return tensor.clamp_(min=a, max=b)


def timm_convit():
    """timm.models.convit, imported on first use: the layers themselves run without timm."""
    try:
        from timm.models import convit
    except ImportError as exc:
        raise ImportError("this needs timm: pip install 'convit-kernels[timm]' (or pip install timm)") from exc
    return convit


def _split_heads(t: torch.Tensor, parts: int, num_heads: int) -> torch.Tensor:
    """B x N x (parts * C) projection -> parts x B x H x N x d strided view (no copy)."""
    B, N, width = t.shape
    return t.reshape(B, N, parts, num_heads, width // (parts * num_heads)).permute(2, 0, 3, 1, 4)


def _is_composite(backend: str) -> bool:
    """Whether ``backend`` is a composite, not an op pair; False where it does not import (it says why when run)."""
    if backend not in backend_names():
        return False
    try:
        return not get_backend(backend).is_op_pair
    except BackendError:
        return False


def _op_pair_names() -> list[str]:
    """The op-pair backends whose modules import here (what a scripted FusedGPSA can name)."""
    names = []
    for name in backend_names():
        try:
            if get_backend(name).is_op_pair:
                names.append(name)
        except BackendError:
            continue
    return names


try:  # timm's FX registry, where timm is installed (the layers themselves run without it)
    from timm.layers import register_notrace_module
except ImportError:

    def register_notrace_module(module):
        return module


# A leaf for torch.fx, as timm registers its own GPSA: FX cannot trace the grid's validation against N.
@register_notrace_module
class FusedGPSA(nn.Module):
    """Gated positional self-attention computed by the fused op, never storing an N x N matrix.

    Arguments are timm's ``GPSA`` (dim, num_heads, qkv_bias, attn_drop, proj_drop,
    locality_strength, device, dtype), plus keyword-only:

    * ``use_local_init``: initialise as facebookresearch's GPSA does (truncated
      normal Linear weights, then :meth:`local_init`); timm's ConVit re-runs
      both after construction anyway.
    * ``grid_size``: (rows, cols) of the patch grid; default square, sqrt(N).
    * ``backend``: passed to :func:`convit_kernels.gpsa_attention`.
    * ``qk_scale``: facebookresearch's override of the logit scale.

    Parameters: ``qk``, ``v``, ``proj``, ``pos_proj`` (Linear 3 -> H) and
    ``gating_param``, as in both reference implementations. ``rel_indices`` is
    timm's non-persistent 1 x N x N x 3 buffer, for the attention maps only:
    :meth:`get_attention` rebuilds it when N changes, the forward never builds
    it (an N x N table per layer, and under torch.compile a recompilation for
    each new N).

    The forward compiles with ``torch.jit.script``: a scripted module calls the op
    ``convit_kernels::gpsa_fwd`` directly with its backend, which must be an op pair
    ("auto" runs what auto picks at run time, or refuses where that is a composite;
    see :mod:`convit_kernels.gpsa_op`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        locality_strength: float = 1.0,
        device=None,
        dtype=None,
        *,
        use_local_init: bool = True,
        grid_size: tuple[int, int] | None = None,
        backend: str = "auto",
        qk_scale: float | None = None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.dim = dim
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.locality_strength = locality_strength
        self.qk = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        self.v = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.pos_proj = nn.Linear(3, num_heads, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.gating_param = nn.Parameter(torch.ones(num_heads, **dd))
        self._init_fused(grid_size, backend, device=device, dtype=dtype)
        if use_local_init:
            for m in (self.qk, self.v, self.proj, self.pos_proj):
                _trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            self.local_init()

    def _init_fused(self, grid_size, backend, device=None, dtype=None) -> None:
        self.grid_size = tuple(grid_size) if grid_size is not None else None
        self.backend = backend
        self.register_buffer("rel_indices", torch.zeros(1, 1, 1, 3, device=device, dtype=dtype), persistent=False)

    @classmethod
    def from_gpsa(cls, module: nn.Module, *, grid_size=None, backend: str = "auto") -> FusedGPSA:
        """Wrap a timm or facebookresearch GPSA: the new module shares its submodules and Parameters."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.num_heads = module.num_heads
        fused.dim = module.dim
        fused.scale = module.scale
        fused.locality_strength = getattr(module, "locality_strength", 1.0)
        for name in ("qk", "v", "attn_drop", "proj", "pos_proj", "proj_drop"):
            setattr(fused, name, getattr(module, name))
        fused.gating_param = module.gating_param
        weight = module.qk.weight
        fused._init_fused(grid_size, backend, device=weight.device, dtype=weight.dtype)
        fused.train(module.training)
        return fused

    def local_init(self, locality_strength: float | None = None) -> None:
        """Initialise v to the identity and each head to attend around its own offset (the paper's init)."""
        strength = self.locality_strength if locality_strength is None else locality_strength
        with torch.no_grad():
            self.v.weight.copy_(torch.eye(self.dim))
            kernel_size = int(self.num_heads**0.5)
            center = (kernel_size - 1) / 2 if kernel_size % 2 == 0 else kernel_size // 2
            w = self.pos_proj.weight
            for h1 in range(kernel_size):
                for h2 in range(kernel_size):
                    position = h1 + kernel_size * h2
                    w[position, 2] = -1
                    w[position, 1] = 2 * (h1 - center)
                    w[position, 0] = 2 * (h2 - center)
            w.mul_(strength)

    def __prepare_scriptable__(self) -> FusedGPSA:
        """torch.jit.script calls this first: a scripted FusedGPSA runs the op pair, so refuse a composite now."""
        if _is_composite(self.backend):
            raise BackendError(
                f"backend {self.backend!r} is a composite of torch ops, not an op pair: a scripted FusedGPSA "
                f"calls convit_kernels::gpsa_fwd, which runs 'auto' or one of {_op_pair_names()}"
            )
        return self

    def grid(self, num_patches: int) -> tuple[int, int]:
        """(rows, cols) of the patch grid for N patches, with a clear error when none fits."""
        grid_size = self.grid_size
        if grid_size is not None:
            if grid_size[0] * grid_size[1] != num_patches:
                raise ValueError(
                    f"grid_size {grid_size} has {grid_size[0] * grid_size[1]} patches, but N = {num_patches}"
                )
            return grid_size
        side = square_grid_side(num_patches)
        return side, side

    def init_non_persistent_buffers(self) -> None:
        """Rebuild ``rel_indices`` at its current N (timm's hook of the same name, which timm's
        ``reinit_non_persistent_buffers`` calls, e.g. after ``to_empty``). N = 1 is the placeholder
        that get_attention has not replaced yet, rebuilt as one: a rectangular grid_size never has one patch."""
        num_patches = self.rel_indices.shape[1]
        self._build_rel_indices((1, 1) if num_patches == 1 else self.grid(num_patches))

    def _build_rel_indices(self, grid: tuple[int, int]) -> None:
        w = self.qk.weight
        self.rel_indices = relative_positions(*grid, device=w.device, dtype=w.dtype)[None]

    def _refresh_rel_indices(self, num_patches: int) -> tuple[int, int]:
        grid = self.grid(num_patches)
        if self.rel_indices.shape[1] != num_patches:
            self._build_rel_indices(grid)
        return grid

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k = _split_heads(self.qk(x), 2, self.num_heads).unbind(0)
        v = _split_heads(self.v(x), 1, self.num_heads)[0]
        return q, k, v

    def get_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The B x H x N x N mixed attention, materialised as timm's ``get_attention`` does (for maps only)."""
        grid = self._refresh_rel_indices(x.shape[1])
        q, k, _ = self._qkv(x)
        attn = gpsa_attention_probs(
            q, k, self.pos_proj.weight, self.pos_proj.bias, self.gating_param, grid, self.scale, self.rel_indices
        )
        return self.attn_drop(attn)

    def get_attention_map(self, x: torch.Tensor, return_map: bool = False):
        """timm's nonlocality measure, computed from get_attention and rel_indices as timm does, also for one patch
        (timm's rel_indices.squeeze() drops the token axes of N = 1)."""
        attn_map = self.get_attention(x).mean(0)  # over the batch; refreshes rel_indices for x's grid
        distances = self.rel_indices[0, :, :, -1] ** 0.5
        dist = torch.einsum("nm,hnm->h", distances, attn_map) / distances.size(0)
        return (dist, attn_map) if return_map else dist

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        grid = self.grid(N)
        if torch.jit.is_scripting():
            out = self._scripted_attention(x, grid[1])
        else:
            out = self._attention(x, grid)
        return self.proj_drop(self.proj(out.reshape(B, N, C)))

    def _attention(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """B x N x H x d attention output, through :func:`gpsa_attention` (eager and torch.compile)."""
        q, k, v = self._qkv(x)
        params = (q, k, v, self.pos_proj.weight, self.pos_proj.bias, self.gating_param)
        if self.training and self.attn_drop.p > 0:
            if torch.compiler.is_compiling():
                # Dynamo cannot trace warnings.warn (fullgraph=True fails on it): comptime runs it while tracing
                comptime(lambda ctx: _warn_attn_drop_once())
            else:
                _warn_attn_drop_once()
            out = gpsa_reference(*params, grid, self.scale, attn_drop=self.attn_drop)
        else:
            out = gpsa_attention(*params, grid_size=grid, scale=self.scale, backend=self.backend)
        return out.transpose(1, 2)

    def _scripted_attention(self, x: torch.Tensor, grid_w: int) -> torch.Tensor:
        """B x N x H x d attention output under TorchScript: the op itself, which picks the backend."""
        if self.training and self.attn_drop.p > 0:
            raise RuntimeError(
                "a scripted FusedGPSA cannot drop attention weights in training (the fused op never "
                "stores them): script it in eval mode or with attn_drop=0"
            )
        q, k, v = self._qkv(x)
        out, _ = torch.ops.convit_kernels.gpsa_fwd(
            q, k, v, self.pos_proj.weight, self.pos_proj.bias, self.gating_param, grid_w, self.scale, self.backend, ""
        )
        return out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, grid_size={self.grid_size}, backend={self.backend!r}"


_warned_attn_drop = False


def _warn_attn_drop_once() -> None:
    global _warned_attn_drop
    if not _warned_attn_drop:
        _warned_attn_drop = True
        warnings.warn(
            "FusedGPSA with attn_drop > 0 in training runs the reference (unfused) path: "
            "dropout on the N x N attention needs the matrix the fused kernels never store",
            stacklevel=3,
        )


class SDPAMHSA(nn.Module):
    """timm's / facebookresearch's ConViT MHSA (parameters ``qkv``, ``proj``) on F.scaled_dot_product_attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_mhsa(cls, module: nn.Module) -> SDPAMHSA:
        """Wrap an MHSA: the new module shares its submodules and Parameters."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.num_heads = module.num_heads
        fused.scale = module.scale
        for name in ("qkv", "attn_drop", "proj", "proj_drop"):
            setattr(fused, name, getattr(module, name))
        fused.train(module.training)
        return fused

    def get_attention_map(self, *args, **kwargs):
        """timm's MHSA.get_attention_map on this module (needs timm)."""
        return timm_convit().MHSA.get_attention_map(self, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = _split_heads(self.qkv(x), 3, self.num_heads).unbind(0)
        dropout_p = self.attn_drop.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=self.scale)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))
