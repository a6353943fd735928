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
    """Under torch.compile, or when the tensors are subclasses (fake or functional tensors
    of a tracer such as aot_autograd or opcheck): then the registered op must run."""
    return torch.compiler.is_compiling() or type(first_arg) not in (torch.Tensor,
                                                                     torch.nn.Parameter)


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
