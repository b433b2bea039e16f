"""A function's training forward and backward, each recorded once as a CUDA graph and replayed every step.

At the MiniPile size the GPU runs a step's ~2,700 kernels faster than the host's Python (autograd, the compiled
chains' wrappers, the kernel bindings) launches them. A CUDA graph records the launches of one call and replays
them all with one launch. GraphedFunction records fn(x) (the whole stack of blocks, activation checkpoints
included) as one graph and its backward (the recomputation included) as another, and joins them to autograd as
one node whose backward returns the gradients of x and of every parameter: DeepSpeed's and DDP's gradient hooks
then see each parameter's gradient arrive as they do without graphs.

While recording, fn sees each parameter as a new leaf tensor on the same memory: autograd keeps a parameter's
gradient node on the stream where it was made (the default stream, by DeepSpeed's hooks), and making that
stream wait on a recording stream fails the recording.

The graphs read and write fixed memory: the parameters where they were when recorded (the optimizer updates
them in place), and their own input, output and gradient buffers. `fits` tells when they no longer apply: a
new input shape, or parameters moved to other memory (a new recording is needed).
"""
import contextlib
import sys
import time

import torch


@contextlib.contextmanager
def parameters_replaced(module, tensors):
    """Inside the block, module's parameter `name` is tensors[name] (names as module.named_parameters gives)."""
    originals = []
    for name, tensor in tensors.items():
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        originals.append((owner, attr, owner._parameters[attr]))
        owner._parameters[attr] = tensor
    try:
        yield
    finally:
        for owner, attr, param in originals:
            owner._parameters[attr] = param


class GraphedFunction:
    def __init__(self, fn, module, param_names, sample, warmup_calls=3):
        """fn(x) -> y on CUDA tensors, reading module's parameters `param_names`; differentiated in x and in those
        parameters that train and that y depends on."""
        named = dict(module.named_parameters())
        started = time.time()
        stream = torch.cuda.Stream(sample.device)
        stream.wait_stream(torch.cuda.current_stream(sample.device))
        self.x = sample.detach().clone().requires_grad_(True)
        leaves = {n: torch.nn.Parameter(named[n].detach(), requires_grad=named[n].requires_grad) for n in param_names}
        trained = [n for n in param_names if named[n].requires_grad]
        inputs = [self.x] + [leaves[n] for n in trained]
        # the calls before recording compile the chains and make cuBLAS's workspaces for this stream
        with torch.cuda.stream(stream), parameters_replaced(module, leaves):
            for _ in range(warmup_calls):
                y = fn(self.x)
                torch.autograd.grad(y, inputs, torch.zeros_like(y), allow_unused=True)
        del y
        self.forward_graph, self.backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with parameters_replaced(module, leaves):
            # thread_local: the data loader's pin-memory thread keeps using CUDA while this thread records
            with torch.cuda.graph(self.forward_graph, stream=stream, capture_error_mode="thread_local"):
                y = fn(self.x)
            self.dy = torch.empty_like(y)
            # one memory pool: the backward graph reads what the forward graph saved for it
            with torch.cuda.graph(self.backward_graph, pool=self.forward_graph.pool(), stream=stream,
                                  capture_error_mode="thread_local"):
                grads = torch.autograd.grad(y, inputs, self.dy, allow_unused=True)
        self.y = y.detach()
        torch.cuda.current_stream(sample.device).wait_stream(stream)
        # parameters y does not depend on (block 0's v0, v1, v2) stay out of the autograd node, as they stay out of
        # the eager graph: a gradient hook would otherwise be called for them with no gradient
        used = [i for i, g in enumerate(grads[1:]) if g is not None]
        self.params = [named[trained[i]] for i in used]
        self.grads = [grads[0]] + [grads[1 + i] for i in used]
        self.param_addresses = self.addresses(self.params)
        print(f"cuda graphs: recorded the blocks' forward and backward for input {list(sample.shape)} in "
              f"{time.time() - started:.1f} s", file=sys.stderr, flush=True)

    @staticmethod
    def addresses(params):
        return [p.data_ptr() for p in params]

    def fits(self, x):
        return (x.shape == self.x.shape and x.dtype == self.x.dtype and x.device == self.x.device
                and self.addresses(self.params) == self.param_addresses)

    def release_grads(self):
        """Before the replays rewrite the pool's memory: a parameter whose .grad is still a gradient buffer of the
        last backward (kept past its step, as gradient accumulation keeps it) gets its own copy."""
        for p, g in zip(self.params, self.grads[1:]):
            if p.grad is not None and p.grad.data_ptr() == g.data_ptr():
                p.grad = p.grad.clone()

    def __call__(self, x):
        return _Replay.apply(self, x, *self.params)


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graphed, x, *params):
        ctx.graphed = graphed
        graphed.release_grads()
        graphed.x.copy_(x)
        graphed.forward_graph.replay()
        return graphed.y.clone()   # the output buffer is rewritten by the next replay

    @staticmethod
    def backward(ctx, dy):
        graphed = ctx.graphed
        graphed.dy.copy_(dy)
        graphed.backward_graph.replay()
        # new tensors on the buffers, which autograd takes over as the parameters' .grad instead of copying them
        # (one copy per parameter and step); the embedding's backward reads the first
        return (None, *(g.detach() for g in graphed.grads))
