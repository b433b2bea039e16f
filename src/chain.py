"""Named chains of elementwise math, compiled into few kernels on the fused CUDA path."""
import torch
import torch.nn as nn


def compile_input(p):
    """A tensor as compiled code takes it: a [1,1,C] parameter as a [C] view (it broadcasts the same), because
    inductor's backward on CUDA returns such a parameter's gradient in the flat shape, which autograd refuses."""
    return p.view(-1) if isinstance(p, nn.Parameter) and p.dim() == 3 else p


class Chain:
    """A chain of elementwise math between two matrix products, as one named function.

    Called with fused=True on CUDA tensors it runs its hand-written kernel where it has one, else compiled by
    torch.compile: one or two kernels instead of dozens, each reading its inputs once (computed in fp32 and rounded
    once, where the plain form rounds every op to bf16). Otherwise it runs as written: the plain form, and the
    reference its tests compare with."""

    def __init__(self, fn, kernel=None):
        self.fn, self.kernel, self.compiled = fn, kernel, None
        self.__name__, self.__doc__ = fn.__name__, fn.__doc__

    def __call__(self, *args, fused=False):
        # inside a compiled block, the plain form is traced into the block's own graph
        if fused and args[0].is_cuda and not torch.compiler.is_compiling():
            return self.kernel(*args) if self.kernel else self.run_compiled(*args)
        return self.fn(*args)

    def run_compiled(self, *args):
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, fullgraph=True, dynamic=False)
        return self.compiled(*(compile_input(a) for a in args))


def chain_with_kernel(kernel):
    """@chain_with_kernel(k) def f(...): the Chain of f whose fused form is the kernel k, called with f's arguments."""
    return lambda fn: Chain(fn, kernel)
