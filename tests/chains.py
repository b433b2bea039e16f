"""Inputs for every elementwise function of src/model/rwkv7.py that the fast path replaces or compiles, and their
outputs and gradients (used by tests/test_fast_path.py on CPU and tests/gpu/test_training_gpu.py on CUDA)."""
import torch
import torch.nn as nn

from src.model.rwkv7 import ChannelMix, TimeMix

B, T, H, N = 2, 32, 4, 16
C = H * N
# name -> (class, function name)
CHAINS = {"shift_mixes": (TimeMix, "shift_mixes"), "wkv_inputs": (TimeMix, "wkv_inputs"),
          "wkv_inputs_layer0": (TimeMix, "wkv_inputs"), "wkv_output": (TimeMix, "wkv_output"),
          "shift_mix": (ChannelMix, "shift_mix"), "relu_square": (ChannelMix, "relu_square")}


def chain_inputs(name, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def act(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()

    def param(*shape):   # learned vectors at their init's scale, [1,1,C] like the model's
        return nn.Parameter(torch.rand(*shape, generator=g).to(device, dtype))

    return {
        "shift_mixes": (act(B, T, C), None, *[param(1, 1, C) for _ in range(6)]),
        "wkv_inputs": (*[act(B, T, C) for _ in range(6)], *[param(1, 1, C) for _ in range(5)], N),
        "wkv_inputs_layer0": (act(B, T, C), act(B, T, C), None, act(B, T, C), act(B, T, C), None,
                              *[param(1, 1, C) for _ in range(5)], N),
        "wkv_output": (*[act(B, T, H, N) for _ in range(4)], act(B, T, C), param(H, N), param(C), param(C), 64e-5),
        "shift_mix": (act(B, T, C), None, param(1, 1, C)),
        "relu_square": (act(B, T, C),),
    }[name]


def outputs_and_grads(fn, args, seed=1):
    """Outputs and the gradients of every tensor input under a fixed random cotangent, all in float64."""
    for a in args:
        if isinstance(a, torch.Tensor):
            a.grad = None
    out = fn(*args)
    out = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    if any(o.requires_grad for o in out):
        loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum() for o in out)
        loss.backward()
    grads = [a.grad for a in args if isinstance(a, torch.Tensor)]   # None for an input the function ignores
    return [None if t is None else t.detach().double() for t in (*out, *grads)]


def plain(name):
    owner, attr = CHAINS[name]
    return getattr(owner, attr)
