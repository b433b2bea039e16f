"""One GPU: the Triton LayerNorm (src/kernels/layer_norm.py) and cross-entropy (src/kernels/head_loss.py) against
their references."""
import pytest
import torch
import torch.nn.functional as F

from src.kernels.head_loss import cross_entropy_grad, cross_entropy_grad_triton
from src.kernels.layer_norm import layer_norm_triton
from src.model.rwkv7 import L2WRAP_FACTOR
from tools.bench_kernel import rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def layer_norm_case(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = (1.5 * torch.randn(shape, generator=g) + 0.3).cuda().to(dtype).requires_grad_()
    w = (1 + 0.2 * torch.randn(C, generator=g)).cuda().to(dtype).requires_grad_()
    b = (0.2 * torch.randn(C, generator=g)).cuda().to(dtype).requires_grad_()
    grad_y = torch.randn(shape, generator=g).cuda().to(dtype)
    return x, w, b, grad_y


def outputs_and_grads(fn, x, w, b, grad_y):
    y = fn(x, w, b)
    return (y, *torch.autograd.grad(y, (x, w, b), grad_y.to(y.dtype)))


@pytest.mark.parametrize("shape", [(1, 1, 48), (3, 7, 100), (16, 512, 768), (1, 4133, 1024)])
def test_layer_norm_kernel_is_as_accurate_as_pytorch(shape):
    """bf16 in and out: the output and the gradients of x, weight and bias are as close to the float64 result
    as PyTorch's own bf16 LayerNorm, from one row to MiniPile's 8192 and an odd count of Pile-width rows."""
    x, w, b, grad_y = layer_norm_case(shape, torch.bfloat16)
    exact = outputs_and_grads(lambda *a: F.layer_norm(a[0], shape[-1:], a[1], a[2], 1e-5),
                              *(t.detach().double().requires_grad_() for t in (x, w, b)), grad_y)
    pytorch = outputs_and_grads(lambda *a: F.layer_norm(a[0], shape[-1:], a[1], a[2], 1e-5), x, w, b, grad_y)
    kernel = outputs_and_grads(lambda *a: layer_norm_triton(*a, 1e-5), x, w, b, grad_y)
    for name, e, p, k in zip(("y", "grad x", "grad weight", "grad bias"), exact, pytorch, kernel):
        assert k.shape == p.shape and k.dtype == p.dtype
        err_pytorch, err_kernel = rel_err(p, e), rel_err(k, e)
        print(f"{shape} {name}: relative RMS error PyTorch {err_pytorch:.2e}, kernel {err_kernel:.2e}")
        assert err_kernel <= 1.5 * err_pytorch + 1e-6


def test_layer_norm_kernel_in_fp32_and_under_autocast():
    """fp32 in: equal to F.layer_norm to fp32 rounding. Under bf16 autocast (Lightning without DeepSpeed) it returns
    fp32, as F.layer_norm does there, with gradients in each input's dtype."""
    shape = (5, 33, 192)
    case = layer_norm_case(shape, torch.float32)
    reference = outputs_and_grads(lambda *a: F.layer_norm(a[0], shape[-1:], a[1], a[2], 1e-5), *case)
    kernel = outputs_and_grads(lambda *a: layer_norm_triton(*a, 1e-5), *case)
    for k, r in zip(kernel, reference):
        torch.testing.assert_close(k, r, rtol=1e-5, atol=1e-5)

    x, w, b, grad_y = layer_norm_case(shape, torch.float32, seed=1)
    x = x.detach().bfloat16().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        reference = outputs_and_grads(lambda *a: F.layer_norm(a[0], shape[-1:], a[1], a[2], 1e-5), x, w, b, grad_y)
        kernel = outputs_and_grads(lambda *a: layer_norm_triton(*a, 1e-5), x, w, b, grad_y)
    for k, r in zip(kernel, reference):
        assert k.dtype == r.dtype
        torch.testing.assert_close(k, r, rtol=1e-2, atol=1e-2)


def test_layer_norm_kernel_is_deterministic():
    """The weight and bias gradients are sums over every row, summed in a fixed order: the same bits every run."""
    case = layer_norm_case((24, 1000, 1024), torch.bfloat16)
    first = outputs_and_grads(lambda *a: layer_norm_triton(*a, 1e-5), *case)
    second = outputs_and_grads(lambda *a: layer_norm_triton(*a, 1e-5), *case)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows, vocab", [(37, 1000), (300, 65536)])
def test_cross_entropy_kernel_equals_reference(dtype, rows, vocab):
    """Loss and gradient (softmax minus the target's one-hot, plus L2Wrap at the first of tied maxima) as the plain
    cross_entropy_grad, for a vocabulary that is not a multiple of the kernel's block and for RWKV's."""
    g = torch.Generator().manual_seed(0)
    n = 4 * rows   # the loss is a mean over all chunks' tokens
    logits = 4 * torch.randn(rows, vocab, generator=g)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    logits[0, 3] = logits[0, vocab - 2] = 300.0   # tied maxima, far apart: L2Wrap's share goes to index 3 only
    targets[1] = logits[1].argmax()                # a target at the argmax
    logits, targets = logits.cuda().to(dtype), targets.cuda()
    loss, grad = cross_entropy_grad_triton(logits, targets, n)
    ref_loss, ref_grad = cross_entropy_grad(logits, targets, n)
    assert grad.dtype == dtype and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss.float(), rtol=1e-5, atol=1e-3)
    tolerance = dict(rtol=1e-2, atol=1e-6) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(grad, ref_grad, **tolerance)
    # at the tie: half the softmax each, and 1e-4 x 300 more at the first index
    tie = grad[0, [3, vocab - 2]].double() * n
    assert abs(tie[1] - 0.5) < 1e-2 and abs(tie[0] - tie[1] - L2WRAP_FACTOR * 300) < 5e-3
