"""The Triton kernels of the fused path (LayerNorm, the head's softmax), run on the CPU by Triton's interpreter where
Triton is installed (.ci/run installs it), against their PyTorch references. The GPU runs them compiled in
tests/gpu/test_norm_loss_kernels.py; here their indexing, masks and partial sums are checked on every CI run.
The fast path's guard runs here too: with the model's functions edited, it refuses the Triton twins.
Each check runs in its own process: TRITON_INTERPRET must be set before Triton is first imported."""
import pytest
import torch
import torch.nn.functional as F

from src.kernels import head_loss, layer_norm, token_shift
from src.model.rwkv7 import ChannelMix, TimeMix
from tests.conftest import run

pytest.importorskip("triton")


def run_interpreted(call):
    return run("-c", f"import tests.test_triton_interpreted as t; t.{call}", timeout=600, env={"TRITON_INTERPRET": "1"})


def check_layer_norm():
    layer_norm.backward_programs = lambda device: 3
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


def check_token_shift():
    # tiles of 4 rows x 16 columns: they cross sequence ends, the last column block is ragged, and the backward's
    # row ranges (3 asked for: two of 8 rows, the last one ragged, each 2 tiles) end inside sequences
    token_shift.FORWARD_ROWS = token_shift.BACKWARD_ROWS = 4
    token_shift.FORWARD_COLUMNS = token_shift.BACKWARD_COLUMNS = 16
    token_shift.backward_programs = lambda rows, column_blocks, device: 3
    for (B, T, C), plain in [((3, 5, 40), TimeMix.shift_mixes), ((2, 7, 16), ChannelMix.shift_mix),
                             ((1, 1, 24), TimeMix.shift_mixes)]:
        check_token_shift_shape(B, T, C, plain)


def check_token_shift_shape(B, T, C, plain):
    gen = torch.Generator().manual_seed(T)
    mixes = 6 if plain is TimeMix.shift_mixes else 1
    x = torch.randn(B, T, C, generator=gen).requires_grad_()
    mus = [torch.rand(1, 1, C, generator=gen).requires_grad_() for _ in range(mixes)]
    grads = [torch.randn(B, T, C, generator=gen) for _ in range(mixes)]
    outs = token_shift.token_shift_mixes(x, None, *mus)
    got = (*outs, *torch.autograd.grad(outs, (x, *mus), grads))
    x64, *mus64 = (t.detach().double().requires_grad_() for t in (x, *mus))
    outs64 = plain(x64, None, *mus64)
    outs64 = outs64 if isinstance(outs64, tuple) else (outs64,)
    expected = (*outs64, *torch.autograd.grad(outs64, (x64, *mus64), [g.double() for g in grads]))
    assert len(got) == len(expected) == 2 * mixes + 1
    for a, e in zip(got, expected):
        assert a.shape == e.shape and a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5)


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


def test_token_shift_kernels():
    """The six mixes of the time mix and the one of the channel mix, forward and backward, against the plain chains in
    float64: tiles that cross sequence ends (shift(x) is zero at each first token, and x[t] feeds only its own
    sequence's next token), a ragged column block, row ranges ending inside sequences, and one-token sequences."""
    run_interpreted("check_token_shift()")


def check_guard(edit):
    """The fast path on the CPU (its Triton twins in the interpreter) for a model whose plain function `edit` names
    was changed: prints the guard's refusal, or "accepted"."""
    from src.config import ModelConfig, PerfConfig
    from src.engine.fast_path import FastPathMismatch, apply_fast_path
    from src.model.rwkv7 import RWKV
    from src.model.rwkv7 import token_shift as shift_minus_x
    layer_norm.backward_programs = lambda device: 3
    token_shift.backward_programs = lambda rows, column_blocks, device: 3

    def time_mixes_one_changed(x, x_prev, *mus):
        return tuple(x + shift_minus_x(x, x_prev) * mu * (1.5 if i == 3 else 1.0) for i, mu in enumerate(mus))

    def channel_mix_changed(x, x_prev, x_k):
        return x + shift_minus_x(x, x_prev) * (1 - x_k)
    edits = {"one time-mix mix": (TimeMix, "shift_mixes", time_mixes_one_changed),
             "channel-mix mix": (ChannelMix, "shift_mix", channel_mix_changed)}
    if edit in edits:
        owner, name, fn = edits[edit]
        setattr(owner, name, staticmethod(fn))
    model = RWKV(ModelConfig(n_layer=2, n_embd=64, head_size=16, vocab_size=300))
    try:
        apply_fast_path(model, PerfConfig(fused=True), torch.device("cpu"))
        print("accepted")
    except FastPathMismatch as e:
        print(f"refused: {e}")


@pytest.mark.parametrize("edit, refused", [("none", None), ("one time-mix mix", "TimeMix.shift_mixes"),
                                           ("channel-mix mix", "ChannelMix.shift_mix")])
def test_guard_refuses_a_changed_model_function(edit, refused):
    """Edit one token-shift mix of the plain model and the fast path refuses to train, naming the function, the error
    and --fused 0; unedited, it accepts its Triton twins (token shift, LayerNorm) and the chunked loss."""
    out = run_interpreted(f"check_guard({edit!r})").stdout
    if refused is None:
        assert out.strip().endswith("accepted"), out
    else:
        assert f"refused: fast path: src/kernels/token_shift.py token_shift_mixes differs from {refused} of " \
               f"src/model/rwkv7.py: relative error" in out and "--fused 0" in out, out
