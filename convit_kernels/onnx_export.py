"""Whether an ONNX exporter is tracing: ONNX has no custom ops, so gpsa_attention then runs standard ops.

``torch.onnx.export`` (the dynamo exporter, ``dynamo=True``, and the TorchScript one) sets
``torch.onnx.is_in_onnx_export()`` for the whole export, its ``torch.export`` capture included:
the capture it tries first, ``strict=False``, runs the model's Python, which reads the flag as
True. Under Dynamo the call folds to False (torch._dynamo's tracing-state functions), so
``torch.compile`` keeps the fused backends, and so would the exporter's fallback capture
(``strict=True``, tried only when ``strict=False`` fails). A plain ``torch.export`` keeps
the op too. A program exported with torch.export first and handed to torch.onnx.export
holds the custom op already: export the module instead.
"""

from __future__ import annotations

import torch

__all__ = ["exporting_to_onnx"]


def exporting_to_onnx() -> bool:
    """True while torch.onnx.export traces the model outside Dynamo; then GPSA must be standard ops."""
    return torch.onnx.is_in_onnx_export()
