"""Custom ops that stay cheap in eager mode.

Each order's forward and backward are registered as torch.library custom ops with fake
implementations, so torch.compile(fullgraph=True) sees one opaque node per unit. Calling a
Python custom op eagerly is not free, though: the dispatcher round trip and the autograd
wrapper that `register_autograd` installs cost ~0.4 ms per unit and step here, more than
the BN passes of a small layer. Outside torch.compile the same Python implementation,
setup_context and backward therefore run under a plain torch.autograd.Function; under
torch.compile the registered op runs. Both paths execute the same code."""
from __future__ import annotations

from typing import Callable

import torch


def _tracing(first_arg) -> bool:
    """Under torch.compile, for tensor subclasses (fake or functional tensors of a tracer
    such as aot_autograd or opcheck) and for meta tensors (shape propagation, MAC counting):
    then the registered op, with its fake implementation, must run."""
    return (torch.compiler.is_compiling()
            or type(first_arg) not in (torch.Tensor, torch.nn.Parameter)
            or first_arg.is_meta)


def cpp_node_runs(x, norm: str, mean_in, sync: int) -> bool:
    """Whether a unit's C++ autograd node (csrc/unit.cpp) takes the call: an eager call on
    the C++ backend, with batch statistics of this process alone."""
    from . import _backend
    return (sync < 0 and mean_in is None and norm != "affine" and not _tracing(x)
            and _backend.name_for(x.device) == "cpp")


def eager_or_op(op: Callable, impl: Callable) -> Callable:
    """Call `impl` directly in eager mode, the registered `op` while tracing."""
    def call(*args):
        return op(*args) if _tracing(args[0]) else impl(*args)
    return call


def with_autograd(op, impl: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """Register autograd on `op` and return the entry point that picks the cheap eager path."""
    op.register_autograd(backward, setup_context=setup_context)

    class EagerFunction(torch.autograd.Function):
        # forward(ctx, ...) rather than a separate setup_context staticmethod: apply() then
        # skips binding default arguments through inspect.signature on every call.
        @staticmethod
        def forward(ctx, *args):
            output = impl(*args)
            setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    EagerFunction.__name__ = f"{impl.__name__.strip('_')}_function"

    def call(*args):
        return op(*args) if _tracing(args[0]) else EagerFunction.apply(*args)
    return call


# --------------------------------------------------------------------------------------
# Autograd plumbing shared by the unit ops (conv→norm and norm→conv). Both take the inputs
# (x, weight, bias, stride, padding, dilation, groups, gamma, beta, mean_in, var_in, eps,
#  norm, relu, [fold,] sync) and return gradients for x, weight, bias, gamma and beta.
# --------------------------------------------------------------------------------------

def no_grads(ctx):
    """The backward's answer when only the statistics were used downstream."""
    return (None,) * len(ctx.needs_input_grad)


def statistics_used(norm: str, mean_in, var_in, batch_mean, batch_var):
    """(batch_stats, mean, var): the statistics the forward normalized with."""
    batch_stats = norm != "affine" and mean_in is None
    return (batch_stats, batch_mean, batch_var) if batch_stats else (False, mean_in, var_in)


def grad_mask(ctx, has_bias: bool):
    """Which of (dx, dweight, dbias, dgamma, dbeta) the backward must produce."""
    needs = ctx.needs_input_grad
    return [needs[0], needs[1], has_bias and needs[2], needs[7], needs[8]]


def input_grads(ctx, mask, dx, dweight, dbias, dgamma, dbeta, gamma, beta):
    """The gradient tuple for the unit op's inputs; gamma/beta grads in their own dtype."""
    needs = ctx.needs_input_grad
    dgamma = dgamma.to(gamma.dtype) if gamma is not None and needs[7] else None
    dbeta = dbeta.to(beta.dtype) if beta is not None and needs[8] else None
    grads = (dx if mask[0] else None, dweight if mask[1] else None,
             dbias if mask[2] else None, None, None, None, None, dgamma, dbeta)
    return grads + (None,) * (len(needs) - len(grads))  # the configuration inputs


def backward_outputs(x, dx, dweight, dbias, dgamma, dbeta):
    """A unit op's backward result: custom ops cannot return None, so an empty tensor
    stands for a gradient that was not asked for."""
    def present(t):  # a fresh empty tensor each: custom-op outputs may not alias
        return x.new_empty(0) if t is None else t
    return present(dx), present(dweight), present(dbias), dgamma, dbeta


def fake_grads(x, weight, mask, norm_channels: int, acc_dtype):
    """Fake (meta) outputs of a unit op's backward: (dx, dweight, dbias, dgamma, dbeta)."""
    stat = x.new_empty(norm_channels, dtype=acc_dtype)
    e = x.new_empty(0)
    return (torch.empty_like(x) if mask[0] else e,
            torch.empty_like(weight) if mask[1] else e,
            x.new_empty(weight.shape[0]) if mask[2] else e, stat, stat.clone())
