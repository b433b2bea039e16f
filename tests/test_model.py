"""The plain RWKV-7 model (src/model/rwkv7.py) against docs/RECIPE.md sections 1 and 5 and against the `rwkv` PyPI
package; the model package stands alone."""
import os

import pytest
import torch
import torch.nn.functional as F

from src.config import ConfigError, ModelConfig
from src.model.rwkv7 import RWKV, L2Wrap


def expected_shapes(L, C, V, N=64, F_=None):
    """docs/RECIPE.md section 1's state-dict table, written out independently of the model code."""
    H = C // N
    F_ = F_ or 4 * C
    r = lambda f, p: max(32, round(f * C**p / 32) * 32)
    Dw, Dv, Dg = r(1.8, 0.5), r(1.3, 0.5), r(0.6, 0.8)
    shapes = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
    for l in range(L):
        p = f"blocks.{l}."
        for ln in ("ln1", "ln2"):
            shapes[p + ln + ".weight"] = shapes[p + ln + ".bias"] = (C,)
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a"):
            shapes[p + "att." + name] = (1, 1, C)
        for name, d in (("w", Dw), ("a", Dw), ("v", Dv), ("g", Dg)):
            shapes[p + f"att.{name}1"] = (C, d)
            shapes[p + f"att.{name}2"] = (d, C)
        shapes[p + "att.r_k"] = (H, N)
        for name in ("receptance", "key", "value", "output"):
            shapes[p + f"att.{name}.weight"] = (C, C)
        shapes[p + "att.ln_x.weight"] = shapes[p + "att.ln_x.bias"] = (C,)
        shapes[p + "ffn.x_k"] = (1, 1, C)
        shapes[p + "ffn.key.weight"] = (F_, C)
        shapes[p + "ffn.value.weight"] = (C, F_)
    shapes["ln_out.weight"] = shapes["ln_out.bias"] = (C,)
    shapes["head.weight"] = (V, C)
    return shapes


@pytest.mark.parametrize("L,C,count", [(12, 768, 191_084_544), (18, 1024, 372_860_928), (24, 2048, 1_527_668_736)])
def test_state_dict_matches_spec(L, C, count):
    with torch.device("meta"):
        model = RWKV(ModelConfig(n_layer=L, n_embd=C, vocab_size=65536))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes(L, C, 65536)
    assert sum(p.numel() for p in model.parameters()) == count


def test_lora_widths_table():
    assert ModelConfig(1, 768).lora_dims == (64, 64, 32, 128)
    assert ModelConfig(1, 1024).lora_dims == (64, 64, 32, 160)
    assert ModelConfig(1, 2048).lora_dims == (96, 96, 64, 256)


@pytest.mark.parametrize("kwargs,hint", [
    (dict(n_layer=2, n_embd=100, head_size=64), "head_size"),
    (dict(n_layer=2, n_embd=80, head_size=16), "multiple of 32"),
    (dict(n_layer=2, n_embd=128, dim_att=256), "--dim_att"),
    (dict(n_layer=0, n_embd=128), "--n_layer"),
])
def test_impossible_shapes_are_refused(kwargs, hint):
    with pytest.raises(ConfigError, match=hint):
        RWKV(ModelConfig(**kwargs))


def make_model(L=2, C=128, V=300, seed=0, perturb=True, head_size=64):
    torch.manual_seed(seed)
    model = RWKV(ModelConfig(n_layer=L, n_embd=C, vocab_size=V, head_size=head_size))
    model.init_weights()
    if perturb:   # move every tensor away from its init so that none is trivially zero
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * (0.1 if p.dim() < 2 else 0.05))
    return model


def test_loss_is_cross_entropy_and_l2wrap_gradient():
    torch.manual_seed(0)
    B, T, V = 2, 5, 11
    logits = (torch.randn(B, T, V) * 3).requires_grad_()
    targets = torch.randint(0, V, (B, T))
    ce = F.cross_entropy(logits.view(-1, V), targets.view(-1))
    loss = L2Wrap.apply(ce, logits)
    assert loss.item() == ce.item()
    loss.backward()

    plain = logits.detach().clone().requires_grad_()
    F.cross_entropy(plain.view(-1, V), targets.view(-1)).backward()
    extra = logits.grad - plain.grad
    max_logit, argmax = logits.detach().max(-1)
    expected = torch.zeros(B, T, V)
    for b in range(B):
        for t in range(T):
            expected[b, t, argmax[b, t]] = max_logit[b, t] * 1e-4 / (B * T)
    assert expected.abs().max() > 1e-5
    assert torch.allclose(extra, expected, rtol=0, atol=5e-8)


def test_recurrent_logits_equal_parallel():
    model = make_model(L=3).eval()
    idx = torch.randint(0, 300, (2, 20))
    parallel = model(idx)
    state, steps = model.zero_state(2), []
    for t in range(0, 20, 7):   # uneven pieces: carrying the state must not depend on how the input is cut
        logits, state = model.forward_with_state(idx[:, t:t + 7], state)
        steps.append(logits)
    assert torch.allclose(torch.cat(steps, dim=1), parallel, atol=1e-5, rtol=1e-5)


def test_rwkv_package_runs_our_checkpoint(tmp_path):
    """Independent oracle: the `rwkv` PyPI package loads our state dict unchanged and agrees on logits."""
    os.environ["RWKV_V7_ON"] = "1"
    from rwkv.model import RWKV as PackageRWKV

    model = make_model(L=3, C=128, V=1000).eval()
    torch.save(model.state_dict(), tmp_path / "tiny.pth")
    package = PackageRWKV(str(tmp_path / "tiny"), "cpu fp32")

    idx = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3))
    ours = model(idx[None])[0]
    theirs, _ = package.forward(idx.tolist(), None, full_output=True)
    scale = theirs.abs().max()
    assert scale > 1
    assert (ours - theirs).abs().max() <= 1e-4 * scale

    state, stepwise = None, []
    for token in idx[:16].tolist():
        logits, state = package.forward([token], state)
        stepwise.append(logits)
    assert (torch.stack(stepwise) - ours[:16]).abs().max() <= 1e-4 * scale


def test_model_package_imports_no_kernels_and_no_engine():
    """src/model is plain PyTorch: importing it loads nothing from src.kernels or src.engine, nor Triton, DeepSpeed
    or Lightning (a fresh interpreter, so that other tests' imports do not count)."""
    import subprocess
    import sys
    code = ("import sys, src.model, src.model.rwkv7; print(sorted(m for m in sys.modules if m.startswith(("
            "'src.kernels', 'src.engine', 'src.train', 'triton', 'deepspeed', 'pytorch_lightning'))))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
