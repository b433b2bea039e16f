"""The Triton kernels of the fused path (LayerNorm, the head's softmax), run on the CPU by Triton's interpreter where
Triton is installed (.ci/run installs it), against their PyTorch references. The GPU runs them compiled in
tests/gpu/test_norm_loss_kernels.py; here their indexing, masks and partial sums are checked on every CI run.
Each check runs in its own process: TRITON_INTERPRET must be set before Triton is first imported."""
import pytest
import torch
import torch.nn.functional as F

from src import head_loss, layer_norm
from tests.conftest import run

pytest.importorskip("triton")


def run_interpreted(call):
    run("-c", f"import tests.test_triton_interpreted as t; t.{call}", timeout=600, env={"TRITON_INTERPRET": "1"})


def check_layer_norm():
    layer_norm.backward_programs = lambda rows, device: 3
    for rows, C in [(1, 48), (13, 48), (21, 100)]:
        check_layer_norm_shape(rows, C)


def check_layer_norm_shape(rows, C):
    g = torch.Generator().manual_seed(rows)
    x = (2 * torch.randn(rows, C, generator=g) + 0.3).requires_grad_()
    w = torch.randn(C, generator=g).requires_grad_()
    b = torch.randn(C, generator=g).requires_grad_()
    grad_y = torch.randn(rows, C, generator=g)
    y = layer_norm.layer_norm_triton(x, w, b, 1e-5)
    got = (y, *torch.autograd.grad(y, (x, w, b), grad_y))
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = F.layer_norm(x64, (C,), w64, b64, 1e-5)
    expected = (y64, *torch.autograd.grad(y64, (x64, w64, b64), grad_y.double()))
    for a, e in zip(got, expected):
        torch.testing.assert_close(a.detach().double(), e.detach(), rtol=1e-5, atol=1e-5)


def check_cross_entropy():
    g = torch.Generator().manual_seed(0)
    rows, V, n = 5, 2500, 40
    logits = 4 * torch.randn(rows, V, generator=g)
    targets = torch.randint(0, V, (rows,), generator=g)
    ties = [7, 1500, 7 + 2048]   # tied maxima: in another lane of the kernel's block, and in the same lane
    logits[0, ties] = 60.0
    targets[1] = logits[1].argmax()
    loss, grad = head_loss.cross_entropy_grad_triton(logits, targets, n)
    ref_loss, ref_grad = head_loss.cross_entropy_grad(logits, targets, n)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    l2wrap = head_loss.L2WRAP_FACTOR * 60 / n   # at the first of the tied maxima only
    torch.testing.assert_close(grad[0, ties] - grad[0, ties[1]], torch.tensor([l2wrap, 0.0, 0.0]),
                               rtol=0, atol=1e-3 * l2wrap)


def test_layer_norm_kernels():
    """Forward and backward against F.layer_norm in float64 for 1, 13 and 21 rows, the backward's rows split over 3
    programs (uneven ranges, a ragged last tile; one program for one row) and its partial sums added by the second
    kernel."""
    run_interpreted("check_layer_norm()")


def test_cross_entropy_kernel():
    """Loss and gradient as cross_entropy_grad over several blocks of the vocabulary with a masked tail; L2Wrap's
    share at the first of three tied maxima; a target at the argmax."""
    run_interpreted("check_cross_entropy()")
