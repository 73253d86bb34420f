"""How the package writes a torch dtype in its messages and reports: ``float32``, not ``torch.float32``."""

from __future__ import annotations

import torch

__all__ = ["dtype_name"]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
