"""flash-attention's accuracy rule, shared by the bench (before it times anything) and the on-device check."""

from __future__ import annotations

import torch

__all__ = ["ERROR_FLOOR", "accuracy_failure"]

# Floor of the rule's error bound, relative to each tensor's largest value: about an ulp for the half
# types (every result, a bf16 parameter's gradient included, is rounded to the dtype), and room for
# another summation order in float32.
ERROR_FLOOR = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def accuracy_failure(
    candidate: list[torch.Tensor],
    exact: list[torch.Tensor],
    same_precision: list[torch.Tensor],
    names: list[str],
    dtype: torch.dtype,
) -> str | None:
    """None when ``candidate`` matches the float64 ``exact`` results, else what is wrong.

    flash-attention's rule: each tensor's error may be at most 3x the error of
    the reference computed in the same precision, plus a small floor.
    """
    for name, have, want, ref in zip(names, candidate, exact, same_precision):
        if have.shape != want.shape:
            return f"{name}: shape {tuple(have.shape)}, expected {tuple(want.shape)}"
        if not torch.isfinite(have).all():
            return f"{name}: non-finite values"
        error = (have - want).abs().max().item()
        bound = 3 * (ref - want).abs().max().item() + ERROR_FLOOR[dtype] * want.abs().max().item()
        if error > bound:
            return f"{name}: max error {error:.3g} > bound {bound:.3g} (3x the same-precision reference's + floor)"
    return None
