"""The one way this package registers a differentiable custom op: a forward op, a backward op, fakes, autograd.

Both of the package's custom op pairs go through :func:`define_op_pair`: the GPSA op
(:mod:`convit_kernels.gpsa_op`) and the sdpa backend's positional mix. Each direction is an
opaque ``torch.library.custom_op`` with a fake (meta) function, so ``torch.compile(fullgraph=True)``
and ``torch.export`` see one node per direction, and ``torch.library.opcheck`` can test them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["define_op_pair"]


def define_op_pair(
    forward_name: str,
    backward_name: str,
    forward: Callable,
    forward_fake: Callable,
    backward: Callable,
    backward_fake: Callable,
    setup_context: Callable,
    gradients: Callable,
):
    """Register the ops ``forward_name`` and ``backward_name`` ("namespace::op"); return both.

    ``forward`` and ``backward`` are annotated functions (their annotations are the schemas);
    ``setup_context(ctx, inputs, output)`` saves what the backward needs, and
    ``gradients(ctx, backward_op, *grad_outputs)`` returns one gradient per forward input.
    """
    forward_op = torch.library.custom_op(forward_name, forward, mutates_args=())
    forward_op.register_fake(forward_fake)
    backward_op = torch.library.custom_op(backward_name, backward, mutates_args=())
    backward_op.register_fake(backward_fake)

    def autograd_backward(ctx, *grad_outputs):
        # One gradient per input the call passed: the dispatcher drops trailing arguments equal to their
        # defaults, and torch 2.11 wants no gradient for them (later torch takes either count).
        return gradients(ctx, backward_op, *grad_outputs)[: len(ctx.needs_input_grad)]

    forward_op.register_autograd(autograd_backward, setup_context=setup_context)
    return forward_op, backward_op
