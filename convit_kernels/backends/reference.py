"""The "reference" backend: timm's GPSA math op for op, differentiated by autograd (materialises N x N)."""

from __future__ import annotations

from ..reference import gpsa_reference
from . import FLOAT_DTYPES, Backend, register_backend

register_backend(
    Backend(
        "reference",
        "timm's math through autograd (B x H x N x N tensors; the specification every backend is tested against)",
        devices=None,
        dtypes=FLOAT_DTYPES,
        attention=gpsa_reference,
    )
)
