"""A saturated content softmax on the op-pair backends that save each content row's maximum and sum apart.

Two kinds of rows: q and k scaled by 100 (logits of ~1e4, one key takes nearly all of each row),
and rows with two near-tied top logits of size 100 to 3e6 held exactly in float32
(benchmarks/saturated_precision.py prints the table), where dq and dk must stay within 2x the
fp32 eager math's own error.

The backends are the registry's whose forward saves the stats state (``stats_state_like``: B x H x N x 2,
each row's maximum and sum), on each device and dtype they claim; float64 rows of every backend are
tests/test_conformance.py's. The sdpa backend's saturated cases are in tests/test_sdpa.py (its error is
PyTorch's SDPA kernel's), the triton backend's in tests/test_triton_interpreter.py.
"""

import pytest
import torch

from convit_kernels.backends import stats_state_like
from convit_kernels.bench.saturated import NEAR_TIED_LOGITS, dq_dk_relative_errors, near_tied_inputs

from gpsa_cases import assert_saturated_matches_reference, backend_param, registered_backends, saturated_inputs


def _stats_backends(dtypes=(torch.float32,)):
    """(backend, device, dtype) of each registered op pair saving the stats state, for each of ``dtypes`` it takes."""
    return [
        backend_param(name, device, dtype)
        for name, impl in registered_backends()
        if impl is not None and impl.is_op_pair and impl.state_like is stats_state_like
        for device in filter(impl.runs_on, ("cpu", "cuda"))
        for dtype in dtypes
        if dtype in impl.dtypes
    ]


def _on(device, inputs):
    return [t.detach().to(device).requires_grad_() for t in inputs]


# Strided q, k, v are copied into scratch tiles at other offsets in the forward and the backward, where
# BLAS need not repeat the forward's logits bit for bit; 576 patches take three query blocks.
@pytest.mark.parametrize("shape", [(2, 4, 49, 16), (1, 2, 576, 16)], ids=["N49", "N576"])
@pytest.mark.parametrize("backend,device,dtype", _stats_backends())
def test_saturated_rows(backend, device, dtype, shape):
    assert_saturated_matches_reference(_on(device, saturated_inputs(dtype, *shape)), backend=backend)


@pytest.mark.parametrize("logit", NEAR_TIED_LOGITS, ids=lambda x: f"L{x:g}")
@pytest.mark.parametrize("backend,device,dtype", _stats_backends())
def test_near_tied_rows_within_twice_the_eager_error(backend, device, dtype, logit):
    inputs, options = near_tied_inputs(logit)
    inputs = _on(device, inputs)
    eager = dq_dk_relative_errors(inputs, "reference", **options)
    got = dq_dk_relative_errors(inputs, backend, **options)
    # Plus one float32 ulp of the largest value: the errors here are a few ulps, and which summation
    # order lands an ulp closer is luck (torch itself reaches 2.2x on one of 12 seeds x 3 sizes; torch
    # and cpu reach at most 0.78 and 0.88 of this bound over 30 seeds x 3 sizes). A float32 lse cost
    # the cpu kernel 7x (L = 100) to 1000x (L = 1e4) the bound.
    for name, have, reference in zip(("dq", "dk"), got, eager):
        bound = 2 * reference + 2.0**-23
        assert have <= bound, f"{name}: relative error {have:.2e} > 2x the fp32 eager math's {reference:.2e} + an ulp"


@pytest.mark.parametrize("backend,device,dtype", _stats_backends((torch.float32, torch.float64)))
def test_forward_saves_the_row_max_and_sum_apart(backend, device, dtype):
    inputs, options = near_tied_inputs(1e4, dtype)
    q, k, v, w, b, lam = (t.detach() for t in _on(device, inputs))
    _, (stats,) = torch.ops.convit_kernels.gpsa_fwd(
        q, k, v, w, b, lam, options["grid_size"][1], options["scale"], backend
    )
    logits = options["scale"] * q.double() @ k.double().mT  # exact in dtype (near_tied_inputs)
    row_max = logits.amax(-1)
    assert stats.shape == (*q.shape[:3], 2) and stats.dtype == dtype
    assert torch.equal(stats[..., 0].double(), row_max)
    rtol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(stats[..., 1].double(), (logits - row_max[..., None]).exp().sum(-1), rtol=rtol, atol=0)
