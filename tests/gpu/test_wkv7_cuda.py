"""GPU tests of the WKV7 CUDA kernels of src/kernels/wkv7.py (both the chunked fast path and the sequential
baseline) against the float64 PyTorch oracle (src/model/rwkv7.py's wkv7_recurrence, the plain loop) on the same bf16
inputs. Skipped without CUDA.

Run on a GPU machine: python -m pytest -q tests/gpu/test_wkv7_cuda.py"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from src.kernels.wkv7 import KERNELS, wkv7_backward, wkv7_cuda, wkv7_forward, wkv7_kernel  # noqa: E402
from src.model.rwkv7 import wkv7_recurrence  # noqa: E402
from tools.bench_kernel import make_inputs, rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
NAMES = ["y", "dr", "dw", "dk", "dv", "dz", "db"]
TOL = 4e-3  # bf16 rounding of the outputs is ~1.7e-3 relative RMS


def poison_allocator():
    """Fill memory the caching allocator will hand out next with NaN, so unwritten outputs show."""
    x = torch.full((64 << 20,), float("nan"), device="cuda")
    del x


def oracle(xs, dy):
    xs64 = [x.detach().double().requires_grad_() for x in xs]
    y, _ = wkv7_recurrence(*xs64)
    return [y] + list(torch.autograd.grad(y, xs64, dy.double()))


def run_kernel(xs, dy, kernel):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    poison_allocator()
    y = wkv7_cuda(*xs, kernel=kernel)
    y.backward(dy)
    return [y] + [x.grad for x in xs]


def check(xs, dy, kernel, tol=TOL):
    ref = oracle(xs, dy)
    got = run_kernel(xs, dy, kernel)
    for name, a, b in zip(NAMES, got, ref):
        assert a.dtype == torch.bfloat16 and a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{kernel} {name}: non-finite values (unwritten output?)"
        e = rel_err(a, b)
        assert e < tol, f"{kernel} {name}: relative error {e:.2e}"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(1, 16, 1, 64), (2, 32, 3, 64), (3, 48, 2, 64), (1, 256, 2, 64)])
def test_kernel_matches_oracle(kernel, shape):
    xs, dy = make_inputs(*shape, seed=sum(shape))
    check(xs, dy, kernel)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("decay", ["fast", "slow"])
def test_kernel_extreme_decays(kernel, decay):
    xs, dy = make_inputs(2, 512, 2, 64, decay=decay, seed=7)
    check(xs, dy, kernel)


@pytest.mark.parametrize("kernel", KERNELS)
def test_padding_any_T(kernel):
    """T not a multiple of 16: wkv7_cuda pads at the end and slices; outputs and gradients exact."""
    for T in (2, 17, 37):
        xs, dy = make_inputs(2, T, 2, 64, seed=T)
        check(xs, dy, kernel)


@pytest.mark.parametrize("kernel", KERNELS)
def test_head_size_32(kernel):
    """Another compile-time head size (a second build of the extension)."""
    xs, dy = make_inputs(2, 48, 3, 32, seed=3)
    check(xs, dy, kernel)


def test_wkv7_dispatch_autograd_and_dtypes():
    """The fast path's stand-in for TimeMix.wkv (wkv7_cuda): bf16 CUDA in -> kernel; gradients through the custom op's
    registered autograd; fp32 CUDA inputs are computed in bf16 and returned as fp32; non-contiguous inputs work."""
    xs, dy = make_inputs(2, 40, 3, 64, seed=11)
    ref = oracle(xs, dy)
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    y = wkv7_cuda(*leaves)
    assert y.dtype == torch.bfloat16 and y.shape == xs[0].shape
    y.backward(dy)
    for name, a, b in zip(NAMES, [y] + [x.grad for x in leaves], ref):
        assert rel_err(a, b) < TOL, name
    y32 = wkv7_cuda(*[x.float() for x in xs])
    assert y32.dtype == torch.float32 and rel_err(y32, ref[0]) < TOL
    nc = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in xs]  # same values, other strides
    assert not nc[0].is_contiguous()
    assert torch.equal(wkv7_cuda(*nc), y.detach())


def test_kernels_agree_and_are_deterministic():
    xs, dy = make_inputs(4, 128, 4, 64, seed=5)
    a = run_kernel(xs, dy, "chunked")
    b = run_kernel(xs, dy, "chunked")
    c = run_kernel(xs, dy, "sequential")
    for name, x, y, z in zip(NAMES, a, b, c):
        assert torch.equal(x, y), f"{name}: chunked kernel not deterministic"
        assert rel_err(x, z) < TOL, name


@pytest.mark.parametrize("kernel", KERNELS)
def test_backward_launches_only_the_kernels(kernel):
    """Forward + backward run the wkv7 kernels and nothing else: in particular no zero-filled gradients for the
    forward's fp32 buffers (sa, states), which autograd would otherwise build and the backward ignore."""
    from torch.profiler import ProfilerActivity, profile
    xs, dy = make_inputs(2, 64, 3, 64, seed=4)
    leaves = [x.to(torch.bfloat16).contiguous().requires_grad_() for x in xs]
    dy = dy.to(torch.bfloat16).contiguous()
    torch.autograd.grad(wkv7_kernel(*leaves, kernel), leaves, dy)  # build and warm up outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.autograd.grad(wkv7_kernel(*leaves, kernel), leaves, dy)
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    assert names and all("wkv7" in n for n in names), sorted(names)


def test_function_rejects_bad_T():
    xs, _ = make_inputs(1, 20, 1, 64, seed=1)
    with pytest.raises(ValueError, match="multiple of 16"):
        wkv7_kernel(*[x.to(torch.bfloat16).contiguous() for x in xs], "chunked")


@pytest.mark.parametrize("kernel", KERNELS)
def test_custom_ops_pass_opcheck(kernel):
    """The kernels as torch.library ops (what torch.compile traces a block through): the fake implementations'
    shapes, strides and dtypes equal the real outputs, and the registered autograd reaches the backward kernel."""
    xs, dy = make_inputs(2, 32, 3, 64, seed=11)
    leaves = [x.to(torch.bfloat16).contiguous().requires_grad_() for x in xs]
    torch.library.opcheck(wkv7_forward, (*leaves, kernel == "chunked"))
    y, sa, states = wkv7_forward(*[x.detach() for x in leaves], kernel == "chunked")
    torch.library.opcheck(wkv7_backward, (*[x.detach() for x in leaves], dy.to(torch.bfloat16), sa, states,
                                          kernel == "chunked"))


@pytest.mark.parametrize("fused, kernel", [(True, "chunked"), (False, "sequential")])
def test_fast_path_runs_the_kernel_for_the_models_wkv(fused, kernel):
    """apply_fast_path on CUDA stands a kernel in for the model's TimeMix.wkv: the chunked one on the fused path, the
    sequential one (the reference's design) with --fused 0; CPU tensors still run the plain loop."""
    from src.config import ModelConfig, PerfConfig
    from src.engine.fast_path import apply_fast_path
    from src.model import RWKV
    from src.model.rwkv7 import TimeMix
    model = RWKV(ModelConfig(n_layer=1, n_embd=128, vocab_size=100)).cuda()
    apply_fast_path(model, PerfConfig(fused=fused, cuda_graph=False), torch.device("cuda"))
    wkv = model.blocks[0].att.wkv
    xs, _ = make_inputs(2, 32, 2, 64, seed=9)
    assert torch.equal(wkv(*xs), wkv7_cuda(*xs, kernel=kernel))
    cpu = [x.cpu().float() for x in xs]
    assert torch.equal(wkv(*cpu), TimeMix.wkv(*cpu))


def test_compiled_block_matches_eager_block():
    """Blocks compiled whole by inductor (the fused training path) against the same blocks run eagerly with the
    compiled chains (--compile_blocks 0): the same loss and gradients up to bf16 rounding."""
    from src.config import ModelConfig, PerfConfig
    from src.engine.fast_path import TrainingBlock, apply_fast_path
    from src.model import RWKV

    def loss_and_grads(compile_blocks):
        torch.manual_seed(0)
        model = RWKV(ModelConfig(n_layer=3, n_embd=256, vocab_size=1000))
        model.init_weights()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * (0.1 if p.dim() < 2 else 0.02))
        model = model.cuda().bfloat16().train()
        apply_fast_path(model, PerfConfig(grad_cp=1, compile_blocks=compile_blocks, cuda_graph=False),
                        torch.device("cuda"))
        idx = torch.randint(0, 1000, (4, 128), generator=torch.Generator().manual_seed(1)).cuda()
        loss = model.loss(idx, idx.roll(-1, 1))
        loss.backward()
        runner = model.blocks[0].forward
        assert isinstance(runner, TrainingBlock) and (runner.compiled_block is not None) == compile_blocks
        return loss.float(), torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])

    (compiled_loss, compiled_grads), (eager_loss, eager_grads) = loss_and_grads(True), loss_and_grads(False)
    err = rel_err(compiled_grads, eager_grads)
    print(f"compiled vs eager blocks: loss {compiled_loss:.5f} / {eager_loss:.5f}, gradient relative RMS {err:.2e}")
    assert abs(compiled_loss - eager_loss) < 5e-3 * eager_loss
    assert err < 2e-2
