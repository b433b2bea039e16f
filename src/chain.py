"""Named chains of elementwise math, compiled into few kernels on the fused CUDA path."""
import torch
import torch.nn as nn


class Chain:
    """A chain of elementwise math between two matrix products, as one named function.

    Called with fused=True on CUDA tensors it runs compiled by torch.compile: one or two kernels instead of
    dozens, each reading its inputs once (computed in fp32 and rounded once, where the plain form rounds every
    op to bf16). Otherwise it runs as written: the plain form, and the reference its tests compare with."""

    def __init__(self, fn):
        self.fn, self.compiled = fn, None
        self.__name__, self.__doc__ = fn.__name__, fn.__doc__

    def __call__(self, *args, fused=False):
        return self.run_compiled(*args) if fused and args[0].is_cuda else self.fn(*args)

    def run_compiled(self, *args):
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, fullgraph=True, dynamic=False)
        # [1,1,C] parameters go in as [C] views: the compiled backward returns gradients in the flat shape
        return self.compiled(*(a.view(-1) if isinstance(a, nn.Parameter) and a.dim() == 3 else a for a in args))
