"""A backend from outside the package, registered when pytest loads this module as a plugin (``-p toy_backend``).

"toy" is an op pair on CPU tensors in float64, head dims up to 64: the torch backend's tensor
ops under a name of its own, declaring its own limits and capabilities. tests/test_conformance.py loads it
in a child process to show that the conformance suite runs on any registered backend with no edit.
"""

import torch

from convit_kernels.backends import Backend, register_backend, stats_state_like
from convit_kernels.backends.decomposed import sdpa_gpsa_exported
from convit_kernels.backends.eager import gpsa_backward_torch, gpsa_forward_torch, torch_attention

register_backend(
    Backend(
        "toy",
        "the torch backend's tensor ops under another name, with limits of its own (tests only)",
        devices=("cpu",),
        dtypes=(torch.float64,),
        forward=gpsa_forward_torch,
        backward=gpsa_backward_torch,
        state_like=stats_state_like,
        max_head_dim=64,
        double_backward=gpsa_backward_torch,
        functorch=torch_attention,
        onnx_export=sdpa_gpsa_exported,
    )
)
