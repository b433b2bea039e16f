"""One GPU: the optimized path keeps the recipe's numbers (issue 5's loss-parity rule), and the fast path
(src/engine/fast_path.py) follows an edit of the plain model (src/model/rwkv7.py) on CUDA: a compiled chain trains
the edited function, a hand-written twin that no longer matches refuses to train."""
import re

import pytest
import torch

from src.config import ModelConfig, PerfConfig
from src.engine import fast_path
from src.engine.fast_path import FastPathMismatch, apply_fast_path
from src.model import RWKV
from src.model.rwkv7 import ChannelMix, TimeMix, token_shift, wkv7_recurrence
from tests.chains import CHAINS, chain_inputs, outputs_and_grads, plain
from tests.conftest import run_steps
from tests.gpu.conftest import compare_losses, minipile_flags

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
CUDA = torch.device("cuda")


def test_fused_path_matches_plain_pytorch_path(corpus_binidx, minipile_init, tmp_path):
    """Same init, same data, 300 steps: fused (chunked kernel, chunked head loss, blocks replayed as CUDA graphs)
    against the plain path (sequential kernel, full-logit loss, eager): per-step losses within 0.01, no drift."""
    fused = run_steps(tmp_path, "fused", 300, minipile_flags(corpus_binidx, minipile_init, tmp_path / "a", fused=1))
    plain = run_steps(tmp_path, "plain", 300, minipile_flags(corpus_binidx, minipile_init, tmp_path / "b", fused=0))
    assert fused["cuda_graph"] and not plain["cuda_graph"]
    mean, tail = compare_losses(fused, plain, "fused vs plain")
    print(f"peak memory: fused {fused['peak_mem_gb']:.2f} GB, plain {plain['peak_mem_gb']:.2f} GB")
    assert mean < 0.01 and tail < 0.01
    assert plain["losses"][-1] < plain["losses"][0] - 2   # it trained


def fast_chain(name):
    """The function the fused path runs on CUDA for the chain `name`: its Triton twin where it has one, else the
    chain compiled from the model's own function."""
    owner, attr = CHAINS[name]
    twins = [t.fast for t in fast_path.TRITON_TWINS if (t.owner, t.name) == (owner, attr)]
    if twins:
        return twins[0]
    assert (owner, attr) in fast_path.COMPILED_CHAINS
    return fast_path.compiled(plain(name))


@pytest.mark.parametrize("name", list(CHAINS))
def test_fused_chain_on_bf16_is_as_accurate_as_plain(name):
    """On bf16 CUDA inputs, the chain as the fused path runs it (its Triton kernel, or compiled) is no further from
    the float64 result than the plain bf16 form, for its outputs and every gradient."""
    args = chain_inputs(name, "cuda", torch.bfloat16)
    exact = outputs_and_grads(plain(name), chain_inputs(name, "cuda", torch.float64))
    plain_bf16 = outputs_and_grads(plain(name), args)
    fused = outputs_and_grads(fast_chain(name), args)
    for i, (e, p, f) in enumerate(zip(exact, plain_bf16, fused)):
        if e is None:
            assert p is None and f is None
            continue
        scale = e.pow(2).mean().sqrt()
        err_plain, err_fused = ((p - e).pow(2).mean().sqrt() / scale).item(), ((f - e).pow(2).mean().sqrt() / scale).item()
        print(f"{name}[{i}]: relative RMS error plain {err_plain:.2e}, fused {err_fused:.2e}")
        assert err_fused <= 1.5 * err_plain + 1e-3


# ---- the guard on CUDA: an edit of the plain model is trained, or refused, never ignored -----------------------

def small_model():
    """fp32 on the GPU with the chunked kernel's head size; the constructor's weights, moved off their init (not
    init_weights': its zero output matrices would all but hide what the blocks compute)."""
    torch.manual_seed(0)
    model = RWKV(ModelConfig(n_layer=2, n_embd=128, head_size=64, vocab_size=1000))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.dim() < 2 else 0.02))
    return model.cuda().train()


def batch():
    idx = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(1)).cuda()
    return idx, idx.roll(-1, 1)


def test_edited_compiled_chain_is_trained(monkeypatch):
    """ChannelMix.relu_square edited: the fast path does not refuse (relu_square has no twin; the compiled chain is
    made from the edited function) and the fast-path model's loss is the plain edited model's within 1e-4 of it (the
    wkv7 kernel's bf16 rounding, simulated on CPU, moves it by 4e-7 of it), where the edit moves it by 3e-3 of it."""
    unedited = small_model().loss(*batch()).item()

    def relu_square_edited(k):
        return torch.relu(k) ** 2 * 1.5
    monkeypatch.setattr(ChannelMix, "relu_square", staticmethod(relu_square_edited))
    plain_loss = small_model().loss(*batch()).item()
    model = apply_fast_path(small_model(), PerfConfig(fused=True, cuda_graph=False), CUDA)
    assert model.blocks[0].ffn.relu_square is not ChannelMix.relu_square   # the compiled chain stands in
    fast_loss = model.loss(*batch()).item()
    print(f"relu_square x 1.5: fast path {fast_loss:.5f}, plain {plain_loss:.5f}, unedited {unedited:.5f}")
    tolerance = 1e-4 * abs(plain_loss)
    assert abs(fast_loss - plain_loss) < tolerance
    assert abs(unedited - plain_loss) > 10 * tolerance


def test_edited_twin_function_is_refused(monkeypatch):
    """TimeMix.shift_mixes edited (one of its six mixes scaled by 1.5): the fast path on CUDA refuses its Triton twin,
    naming the function and --fused 0."""
    def shift_mixes_one_changed(x, x_prev, *mus):
        xx = token_shift(x, x_prev)
        return tuple(x + xx * mu * (1.5 if i == 3 else 1.0) for i, mu in enumerate(mus))
    monkeypatch.setattr(TimeMix, "shift_mixes", staticmethod(shift_mixes_one_changed))
    with pytest.raises(FastPathMismatch, match=r"differs from TimeMix\.shift_mixes of src/model/rwkv7\.py.*--fused 0"):
        apply_fast_path(small_model(), PerfConfig(fused=True, cuda_graph=False), CUDA)


@pytest.mark.parametrize("fused, kernel", [(True, "chunked"), (False, "sequential")])
def test_edited_recurrence_is_refused_with_and_without_fused(monkeypatch, fused, kernel):
    """The plain recurrence edited (TimeMix.wkv returning 1.1 y): the fast path on CUDA refuses its wkv7 kernel, the
    chunked one on the fused path and the sequential one that --fused 0 installs on CUDA."""
    def wkv_changed(r, w, k, v, z, b):
        return (1.1 * wkv7_recurrence(r, w, k, v, z, b)[0]).to(r.dtype)
    monkeypatch.setattr(TimeMix, "wkv", staticmethod(wkv_changed))
    with pytest.raises(FastPathMismatch, match=re.escape(f"cuda/wkv7_{kernel}.cu ({kernel} kernel) differs from "
                                                         f"TimeMix.wkv of src/model/rwkv7.py")):
        apply_fast_path(small_model(), PerfConfig(fused=fused, cuda_graph=False), CUDA)
