"""The WKV7 recurrence (docs/RECIPE.md section 2) as CUDA kernels: `wkv7_cuda` replaces `TimeMix.wkv` of
src/model/rwkv7.py (the plain loop `wkv7_recurrence`, the oracle these kernels are tested against) on CUDA.

It runs the kernels of cuda/ (bf16 in and out, fp32 state): `wkv7_chunked.cu` (the
fused path) or the sequential baseline `wkv7_sequential.cu` (the reference recipe's design). They
are built with torch.utils.cpp_extension on first use, once per head size, flags and sources, into
~/.cache/rwkv7_kernels, with a stale build lock removed (see _load_ops).
The chunked kernels assume w <= -0.5 as the model produces (d >= 0.3 keeps 1/prod(d) over 16
steps in range).
"""
import hashlib
import os
import sys
import time

import torch

CHUNK_LEN = 16  # the CUDA kernel works on T in multiples of this; callers pad at the end
KERNELS = ("chunked", "sequential")
CHUNKED_HEAD_SIZES = (32, 64)  # the chunked kernels' layouts; other head sizes run the sequential one

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CUDA_DIR = os.path.join(_ROOT, "cuda")
_SOURCES = ("wkv7_op.cpp", "wkv7_sequential.cu", "wkv7_chunked.cu")
_HEADERS = ("wkv7_common.cuh", "wkv7_launch.h")
_ops = {}  # head size -> op namespace torch.ops.wkv7_n<N>_<key> of the loaded build


def build_flags(head_size, arch=None):
    """nvcc flags of the extension for a head size and a compute capability such as (9, 0)."""
    if arch is None:
        arch = torch.cuda.get_device_capability()
    cc = f"{arch[0]}{arch[1]}"
    return ["-O3", "--use_fast_math", "-res-usage", "-Xptxas=-O3", f"-D_N_={head_size}",
            f"-gencode=arch=compute_{cc},code=sm_{cc}"]


def _build_key(head_size, flags):
    h = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        with open(os.path.join(_CUDA_DIR, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    h.update(repr((head_size, flags, torch.__version__, torch.version.cuda, sys.version_info[:2])).encode())
    return h.hexdigest()[:16]


def _acquire_build_dir(build_dir):
    """Take our builder lock on build_dir and clear a stale torch FileBaton lock left in it.

    torch's load() guards a build with a 'lock' file and waits for it to vanish, forever if its
    builder was killed. Every builder of ours holds an flock on 'builder.flock' while it runs
    load(); the kernel drops an flock when its process dies, however it dies. So once we hold it,
    any 'lock' file is a leftover of a dead build and is removed. Returns the fd to release."""
    import fcntl
    os.makedirs(build_dir, exist_ok=True)
    fd = os.open(os.path.join(build_dir, "builder.flock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"wkv7: waiting for another process building in {build_dir}", file=sys.stderr, flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
    lock = os.path.join(build_dir, "lock")
    if os.path.exists(lock):
        print(f"wkv7: removing stale build lock {lock} (its builder is gone)", file=sys.stderr, flush=True)
        os.remove(lock)
    return fd


def _load_ops(head_size):
    """The compiled extension for this head size, built on first use."""
    if head_size in _ops:
        return _ops[head_size]
    from torch.utils.cpp_extension import load
    flags = build_flags(head_size)
    key = _build_key(head_size, flags)
    name = f"wkv7_n{head_size}_{key}"
    root = os.path.join(os.path.expanduser("~"), ".cache", "rwkv7_kernels")
    build_dir = os.path.join(root, name)
    fd = _acquire_build_dir(build_dir)
    try:
        cached = os.path.exists(os.path.join(build_dir, f"{name}.so"))
        t0 = time.time()
        load(name=name, sources=[os.path.join(_CUDA_DIR, s) for s in _SOURCES],
             extra_cflags=["-O3", f"-D_N_={head_size}", f"-DWKV7_NS={name}"], extra_cuda_cflags=flags,
             extra_include_paths=[_CUDA_DIR], build_directory=build_dir, is_python_module=False, verbose=False)
        print(f"wkv7: {'loaded' if cached else 'built'} CUDA kernels (N={head_size}) in {time.time() - t0:.1f} s"
              f" [{build_dir}]", file=sys.stderr, flush=True)
    finally:
        os.close(fd)  # releases the flock
    _ops[head_size] = getattr(torch.ops, name)  # forward / backward, see cuda/wkv7_op.cpp
    return _ops[head_size]


def _check_kernel_inputs(*xs):
    r = xs[0]
    if r.dim() != 4 or r.shape[1] % CHUNK_LEN:
        raise ValueError(f"wkv7: inputs must be [B,T,H,N] with T a multiple of {CHUNK_LEN}, got {tuple(r.shape)}")
    for x in xs:
        if not (x.is_cuda and x.dtype == torch.bfloat16 and x.is_contiguous() and x.shape == r.shape
                and x.device == r.device):
            raise ValueError("wkv7: kernel inputs must be contiguous bf16 CUDA tensors of one shape and device")


def _raise_on(ops, status, what):
    err = int(status[0])
    if err:
        raise RuntimeError(f"wkv7: CUDA {what} launch failed: {ops.error_string(err)}")


# The kernels as torch.library custom ops, so that torch.compile traces a whole block through them (the fake
# implementations give the output shapes without running anything) and autograd reaches the backward kernel.

@torch.library.custom_op("rwkv7::wkv7_forward", mutates_args=(), device_types="cuda")
def wkv7_forward(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, z: torch.Tensor,
                 b: torch.Tensor, chunked: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (bf16), and for the backward sa = S_{t-1} z_t (fp32 [B,T,H,N]) and the state after every chunk
    (fp32 [B,H,T/16,N,N])."""
    _check_kernel_inputs(r, w, k, v, z, b)
    ops = _load_ops(r.shape[-1])
    y, sa, states, status = ops.forward(chunked, r, w, k, v, z, b, torch.cuda.current_stream(r.device).cuda_stream)
    _raise_on(ops, status, "forward")
    return y, sa, states


@wkv7_forward.register_fake
def _(r, w, k, v, z, b, chunked):
    B, T, H, N = r.shape
    return torch.empty_like(r), r.new_empty(r.shape, dtype=torch.float32), \
        r.new_empty((B, H, T // CHUNK_LEN, N, N), dtype=torch.float32)


@torch.library.custom_op("rwkv7::wkv7_backward", mutates_args=(), device_types="cuda")
def wkv7_backward(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, z: torch.Tensor,
                  b: torch.Tensor, dy: torch.Tensor, sa: torch.Tensor, states: torch.Tensor,
                  chunked: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor]:
    """dr, dw, dk, dv, dz, db (bf16) from the forward's inputs and buffers and dy (bf16, contiguous)."""
    ops = _load_ops(r.shape[-1])
    *grads, status = ops.backward(chunked, r, w, k, v, z, b, dy, sa, states,
                                  torch.cuda.current_stream(r.device).cuda_stream)
    _raise_on(ops, status, "backward")
    return tuple(grads)


@wkv7_backward.register_fake
def _(r, w, k, v, z, b, dy, sa, states, chunked):
    return tuple(torch.empty_like(r) for _ in range(6))


def _save_for_backward(ctx, inputs, output):
    *xs, chunked = inputs
    _, sa, states = output
    ctx.chunked = chunked
    ctx.save_for_backward(*xs, sa, states)
    # sa and states are buffers, never differentiated: without this autograd hands the backward zero-filled
    # gradients for them (fp32, 5x the size of y at ctx 4096: a fill of ~2 GB per layer and step)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _dsa, _dstates):
    if dy is None:  # y took no part in the loss
        return (None,) * 7
    *xs, sa, states = ctx.saved_tensors
    return (*wkv7_backward(*xs, dy.to(torch.bfloat16).contiguous(), sa, states, ctx.chunked), None)


wkv7_forward.register_autograd(_backward, setup_context=_save_for_backward)


def wkv7_kernel(r, w, k, v, z, b, kernel="chunked"):
    """y = WKV7(r, w, k, v, z, b) on CUDA through the kernel `kernel`; bf16 contiguous [B,T,H,N] with
    T % CHUNK_LEN == 0."""
    return wkv7_forward(r, w, k, v, z, b, kernel == "chunked")[0]


def wkv7_cuda(r, w, k, v, z, b, kernel="chunked"):
    """WKV7 on CUDA through the kernel `kernel` ('chunked' or 'sequential'). Inputs are cast to
    contiguous bf16 and T is padded at the end with zeros to a multiple of CHUNK_LEN (exact for the
    causal outputs); y comes back in r's dtype with r's T."""
    if kernel not in KERNELS:
        raise ValueError(f"wkv7: unknown kernel {kernel!r}, expected one of {KERNELS}")
    if r.shape[-1] not in CHUNKED_HEAD_SIZES:
        kernel = "sequential"
    T = r.shape[1]
    pad = -T % CHUNK_LEN
    xs = []
    for x in (r, w, k, v, z, b):
        x = x.to(torch.bfloat16)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        xs.append(x.contiguous())
    y = wkv7_kernel(*xs, kernel)
    if pad:
        y = y[:, :T]
    return y.to(r.dtype)
