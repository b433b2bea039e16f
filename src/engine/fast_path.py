"""The fast path, applied from outside to the plain model of src/model/rwkv7.py.

`apply_fast_path(model, perf, device)` sets instance attributes on the model's modules that shadow their class's
plain functions, the way torchtitan applies compile and parallelism to a plain model:
- twins: hand-written kernels that replace one plain function each (table TWINS). Before installing a twin it runs
  twin and plain function, the model's function as it is now, on small random inputs, forward and backward, and
  refuses to train (FastPathMismatch) when they differ by more than the twin's tolerance: an edit to the model is
  never trained as the old math;
- compiled chains: the elementwise functions without a twin, compiled by torch.compile from the model's own
  function, so they follow every edit by construction;
- wrappers that run the model's own functions differently: activation checkpointing (grad_cp), whole blocks
  compiled (compile_blocks), and the trunk's forward and backward replayed as CUDA graphs (cuda_graph).
Decoding with a state, evaluation without gradients and tensors on another device run the plain functions.
"""
import functools
import inspect
import os
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from src.config import PerfConfig
from src.engine.cuda_graph import GraphedFunction
from src.kernels.head_loss import head_loss_chunked
from src.kernels.layer_norm import layer_norm_triton
from src.kernels.token_shift import token_shift_mix, token_shift_mixes
from src.kernels.wkv7 import wkv7_cuda
from src.model.rwkv7 import RWKV, ChannelMix, TimeMix


class FastPathMismatch(RuntimeError):
    """A twin no longer computes what the model's plain function computes."""


# ---- the twins -------------------------------------------------------------------------------------------------

def _layer_norm(ln, x):
    return layer_norm_triton(x, ln.weight, ln.bias, ln.eps)


def _wkv7_kernel(kernel, r, w, k, v, z, b):
    return wkv7_cuda(r, w, k, v, z, b, kernel=kernel)


def _sample_mixes(count):
    def sample(device, C, N, gen):
        return (torch.randn(2, 16, C, generator=gen), None, *[torch.rand(1, 1, C, generator=gen) for _ in range(count)])
    return sample


def _sample_layer_norm(device, C, N, gen):
    ln = nn.LayerNorm(C).to(device)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(C, generator=gen))
        ln.bias.copy_(torch.randn(C, generator=gen))
    return ln, 2 * torch.randn(2, 16, C, generator=gen) + 0.3


def _sample_head_loss(device, C, N, gen):
    return torch.randn(2, 16, C, generator=gen), 0.3 * torch.randn(300, C, generator=gen), \
        torch.randint(0, 300, (2, 16), generator=gen)


def _sample_wkv(device, C, N, gen):
    """Inputs as the model makes them (w <= -0.5, z = -kk, b = kk * a), rounded to bf16 as the kernels read them."""
    shape = (2, 32, 2, N)
    a = torch.sigmoid(torch.randn(shape, generator=gen))
    kk = F.normalize(torch.randn(shape, generator=gen), dim=-1)
    w = -F.softplus(-(-4 + 2 * torch.randn(shape, generator=gen))) - 0.5
    r, k, v = (0.5 * torch.randn(shape, generator=gen) for _ in range(3))
    return tuple(t.bfloat16().float() for t in (r, w, k * a, v, -kk, kk * a))


@dataclass(frozen=True)
class Twin:
    owner: type              # the class whose plain function the twin replaces ...
    name: str                # ... under this name
    fast: Callable           # the twin, called as the plain function is (a method's first argument is its module)
    source: str              # where the twin lives, for messages
    sample: Callable         # (device, C, N, generator) -> small random inputs, CPU tensors moved to device by check
    tolerance: float         # largest relative error (max |twin - plain| / max |plain|) of outputs and gradients
    triton: bool = True      # a Triton kernel: runs on CPU too, in Triton's interpreter
    fix: str = "train with --fused 0 to run the plain model's functions, or bring the twin up to date"


TRITON_TWINS = (
    Twin(TimeMix, "shift_mixes", token_shift_mixes, "src/kernels/token_shift.py token_shift_mixes", _sample_mixes(6), 1e-4),
    Twin(ChannelMix, "shift_mix", token_shift_mix, "src/kernels/token_shift.py token_shift_mixes", _sample_mixes(1), 1e-4),
    Twin(nn.LayerNorm, "forward", _layer_norm, "src/kernels/layer_norm.py layer_norm_triton", _sample_layer_norm, 1e-4),
    Twin(RWKV, "head_loss", head_loss_chunked, "src/kernels/head_loss.py head_loss_chunked", _sample_head_loss, 1e-4),
)
# the elementwise functions without a twin: compiled from the model's own function on the fused CUDA path
COMPILED_CHAINS = ((TimeMix, "wkv_inputs"), (TimeMix, "wkv_output"), (ChannelMix, "relu_square"))


def wkv_twin(kernel):
    """TimeMix.wkv's CUDA kernel: the chunked one on the fused path, the sequential one (the reference's design)
    with --fused 0, where the plain loop would take minutes a step."""
    return Twin(TimeMix, "wkv", functools.partial(_wkv7_kernel, kernel), f"cuda/wkv7_{kernel}.cu ({kernel} kernel)",
                _sample_wkv, 2e-2, triton=False,
                fix="the CUDA kernels compute docs/RECIPE.md section 2's recurrence: for another recurrence train "
                    "with --accelerator cpu (the plain loop) or change the kernels in cuda/")


def _relative_error(got, want):
    scale = want.detach().double().abs().max().clamp_min(1e-30)
    return ((got.detach().double() - want.detach().double()).abs().max() / scale).item()


def _outputs_and_grads(fn, args):
    """fn's outputs, and the gradients of its float tensor inputs (and of a module argument's parameters) under a
    fixed random cotangent."""
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    leaves += [p for a in args if isinstance(a, nn.Module) for p in a.parameters()]
    out = fn(*args)
    out = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(1)
    # a loss (a scalar) gets gradient 1, as training gives it: L2Wrap's extra gradient does not scale with it
    cotangents = [torch.ones_like(o) if o.dim() == 0 else torch.randn(o.shape, generator=gen).to(o.device, o.dtype)
                  for o in out]
    grads = torch.autograd.grad(out, leaves, cotangents, allow_unused=True)
    return list(out), [g for g in grads if g is not None]


def check_twin(twin: Twin, device, C, N):
    """Raise FastPathMismatch unless the twin computes the model's current plain function within its tolerance."""
    plain = getattr(twin.owner, twin.name)
    label = f"{twin.owner.__name__}.{twin.name} of src/model/rwkv7.py"

    def inputs():
        values = twin.sample(device, C, N, torch.Generator().manual_seed(0))
        return [v.to(device).requires_grad_(v.is_floating_point()) if isinstance(v, torch.Tensor) else v
                for v in values]
    try:
        want = _outputs_and_grads(plain, inputs())
        got = _outputs_and_grads(twin.fast, inputs())
    except Exception as e:   # a changed signature or shapes: the twin cannot stand in for the function any more
        raise FastPathMismatch(f"fast path: {twin.source} cannot stand in for {label} as it is now "
                               f"({type(e).__name__}: {e}); {twin.fix}") from e
    for kind, got_values, want_values in zip(("output", "gradient"), got, want):
        if [g.shape for g in got_values] != [w.shape for w in want_values]:
            raise FastPathMismatch(f"fast path: {twin.source} gives {kind}s of shapes "
                                   f"{[tuple(g.shape) for g in got_values]} where {label} gives "
                                   f"{[tuple(w.shape) for w in want_values]}; {twin.fix}")
        for i, (g, w) in enumerate(zip(got_values, want_values)):
            error = _relative_error(g, w)
            if not error <= twin.tolerance:
                raise FastPathMismatch(f"fast path: {twin.source} differs from {label}: relative error {error:.2e} "
                                       f"in {kind} {i} (tolerance {twin.tolerance:.0e}); {twin.fix}")


# ---- installing ------------------------------------------------------------------------------------------------

def _dispatch(fast, plain, device_type, takes_state):
    """fast where it applies (a tensor on the fast path's device, and no decoding state), plain elsewhere."""
    def run(*args):
        if args[0].device.type == device_type and not (takes_state and args[1] is not None):
            return fast(*args)
        return plain(*args)
    return run


def _install(modules, owner, name, fast, device_type):
    """Shadow owner's function `name` with `fast` on each of `modules` (instances of owner). A staticmethod's
    stand-in is one object shared by all of them, so that blocks compiled whole still share their graphs."""
    plain = getattr(owner, name)
    takes_state = "x_prev" in inspect.signature(plain).parameters
    shared = _dispatch(fast, plain, device_type, takes_state)
    for module in modules:
        if isinstance(inspect.getattr_static(owner, name), staticmethod):
            setattr(module, name, shared)
        else:
            setattr(module, name, _dispatch(types.MethodType(fast, module), types.MethodType(plain, module),
                                            device_type, takes_state))


def _compile_input(a):
    """A [1,1,C] parameter as a [C] view (it broadcasts the same): inductor's backward on CUDA returns such a
    parameter's gradient in the flat shape, which autograd refuses."""
    return a.view(-1) if isinstance(a, nn.Parameter) and a.dim() == 3 else a


@functools.cache
def compiled(plain):
    graph = torch.compile(plain, fullgraph=True, dynamic=False)
    return lambda *args: graph(*(_compile_input(a) for a in args))


def install_twins(model: RWKV, twins, device):
    """Check each twin against the model's current function once, then install it on every module it applies to."""
    C, N = model.cfg.n_embd, model.cfg.head_size
    for twin in twins:
        check_twin(twin, device, C, N)
        _install(instances(model, twin.owner), twin.owner, twin.name, twin.fast, device.type)


def instances(model, owner):
    return [m for m in model.modules() if type(m) is owner]


def twins_for(perf: PerfConfig, device):
    """The twins the fast path installs on `device`."""
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"   # Triton's own switch
    twins = []
    if device.type == "cuda":
        twins.append(wkv_twin("chunked" if perf.fused else "sequential"))
    if perf.fused and (device.type == "cuda" or interpreted):
        # inside blocks compiled whole, inductor fuses the elementwise work itself: only the loss keeps its twin
        twins += [t for t in TRITON_TWINS if not perf.compile_blocks or t.owner is RWKV]
    return twins


def apply_fast_path(model: RWKV, perf: PerfConfig, device):
    """Install the fast path for training on `device` (a torch.device); returns the model."""
    install_twins(model, twins_for(perf, device), device)
    if perf.fused and device.type == "cuda" and not perf.compile_blocks:
        for owner, name in COMPILED_CHAINS:
            _install(instances(model, owner), owner, name, compiled(getattr(owner, name)), device.type)
    compiled_block = CompiledBlock() if perf.compile_blocks and device.type == "cuda" else None
    for block in model.blocks:
        block.forward = TrainingBlock(block, perf, compiled_block)
    if perf.cuda_graph and device.type == "cuda":
        model.trunk = GraphedTrunk(model, model.trunk)
    return model


# ---- wrappers of the model's own functions ---------------------------------------------------------------------

def keep_products(n_embd, keep_wkv7):
    """grad_cp 2 and 3's checkpoint contexts: the recomputation of a checkpointed block reuses the outputs of the
    forward's matrix products that read an n_embd-wide activation (receptance, key, value, output, the FFN's key and
    the LoRA down-projections) and, with keep_wkv7, its wkv7 kernel outputs (most of a block's forward time); it runs
    the rest again. A LoRA up-projection (inner size 32 to 160) costs little to run again next to what its [B,T,C]
    output costs to hold, and the backward never needs the FFN value product's output. The wkv7 outputs include its
    fp32 state after every 16 steps (alone they took the Pile size from 17 to 55 GB), which is why grad_cp 3 leaves
    them out."""
    products = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
    kept_ops = (torch.ops.rwkv7.wkv7_forward.default,) if keep_wkv7 else ()

    def policy(ctx, op, *args, **kwargs):
        if op in products:
            keep = args[-2].shape[-1] == n_embd   # mm(a, b), addmm(bias, a, b): a's inner size
        else:
            keep = op in kept_ops
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE
    return create_selective_checkpoint_contexts(policy)


class CompiledBlock:
    """A block's training forward compiled whole by torch.compile: one graph for block 0 and one shared by the
    others (the guards see only `first`), the wkv7 kernels inside as custom ops. The [1,1,C] parameters go in as
    [C] views."""

    def __init__(self, backend="inductor"):
        self.graph = torch.compile(self._forward, fullgraph=True, dynamic=False, backend=backend)

    @staticmethod
    def _forward(block, vectors, x, v_first):
        # the class's forward, not block.forward (a TrainingBlock of its own for each block, which the graph's
        # guards would tell apart); functional_call's own reparametrization
        with torch.nn.utils.stateless._reparametrize_module(block, vectors):
            return type(block).forward(block, x, v_first)[:2]

    def __call__(self, block, x, v_first):
        vectors = {name: _compile_input(p) for name, p in block.named_parameters() if p.dim() == 3}
        return self.graph(block, vectors, x, v_first)


class TrainingBlock:
    """Block.forward when training from a zero state: compiled whole and/or checkpointed as the perf config says;
    the block's own forward otherwise (decoding, evaluation, and while being compiled)."""

    def __init__(self, block, perf: PerfConfig, compiled_block):
        self.block, self.forward, self.perf, self.compiled_block = block, block.forward, perf, compiled_block

    def __call__(self, x, v_first, state=None):
        if state is not None or not (self.block.training and torch.is_grad_enabled()) \
                or torch.compiler.is_compiling():
            return self.forward(x, v_first, state)
        if self.perf.grad_cp:
            x, v_first = self.checkpointed(x, v_first)
        else:
            x, v_first = self.run(x, v_first)
        return x, v_first, None

    def run(self, x, v_first):
        if self.compiled_block is not None:
            return self.compiled_block(self.block, x, v_first)
        return self.forward(x, v_first)[:2]

    def checkpointed(self, x, v_first):
        if self.perf.deepspeed_checkpointing and self.perf.grad_cp == 1:
            import deepspeed
            return deepspeed.checkpointing.checkpoint(self.run, x, v_first)
        if self.perf.grad_cp == 1:
            keep = torch.utils.checkpoint.noop_context_fn
        else:
            keep = functools.partial(keep_products, x.shape[-1], keep_wkv7=self.perf.grad_cp == 2)
        # the model draws no random numbers: nothing to restore for the recomputation (nor to read while recording)
        return torch.utils.checkpoint.checkpoint(self.run, x, v_first, use_reentrant=False, preserve_rng_state=False,
                                                 context_fn=keep)


class GraphedTrunk:
    """RWKV.trunk (the blocks and ln_out) in training, recorded as CUDA graphs on first use and replayed
    (src/engine/cuda_graph.py); the model's own trunk elsewhere. Not under autocast (Lightning's bf16 without
    DeepSpeed): its cache of cast weights would be freed inside a recording."""

    def __init__(self, model, trunk):
        self.model, self.trunk, self.graphed = model, trunk, None

    def __call__(self, x):
        if not (self.model.training and x.is_cuda and torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cuda")):
            return self.trunk(x)
        if self.graphed is None or not self.graphed.fits(x):
            self.record(x)
        return self.graphed(x)

    def record(self, x):
        self.graphed = None   # frees the old recording's memory first
        names = [n for n, _ in self.model.named_parameters() if n.startswith(("blocks.", "ln_out."))]
        try:
            self.graphed = GraphedFunction(self.trunk, self.model, names, x)
        except RuntimeError as e:   # CUDA errors included
            raise RuntimeError(f"recording the blocks as CUDA graphs failed: {e}\nTrain with --cuda_graph 0 to "
                               f"run them eagerly (slower where the host bounds the step)") from e

