"""The init that `train.py --train_stage 1` writes, measured tensor by tensor against docs/RECIPE.md section 3.

The rules below are transcribed from the recipe's words, not from src/model/rwkv7.py: each state-dict key matches exactly
one row, and each row is checked by measurement (singular values of matrices, exact constants of vectors, the bound
and spread of uniform tensors), so a misread rule or a new parameter without a rule fails here."""
import math
import re

import pytest
import torch

from tests.conftest import run


def ddd(C):
    return torch.arange(C, dtype=torch.float64) / C


def r1(l, L):   # "1 to almost 0"
    return 1 - l / L


def r0(l, L):   # "0 to 1", 0 when L == 1
    return l / (L - 1) if L > 1 else 0.0


def const(formula):
    return ("const", formula)


def ortho(singular_value):
    return ("ortho", singular_value)


def uniform(bound):
    return ("uniform", bound)


ZEROS, ONES = const(lambda l, L, C, n: 0.0), const(lambda l, L, C, n: 1.0)

# (key pattern, rule); l: the layer of the key, L layers, C channels, n: rows of a [n] or [1,1,n] tensor
INIT_TABLE = [
    (r"emb\.weight", uniform(1e-4)),
    (r"blocks\.0\.ln0\.weight", ONES),
    (r"blocks\.0\.ln0\.bias", ZEROS),
    (r"blocks\.\d+\.ln[12]\.weight", ONES),
    (r"blocks\.\d+\.ln[12]\.bias", ZEROS),
    (r"blocks\.\d+\.att\.x_r", const(lambda l, L, C, n: 1 - ddd(C) ** (0.2 * r1(l, L)))),
    (r"blocks\.\d+\.att\.x_w", const(lambda l, L, C, n: 1 - ddd(C) ** (0.9 * r1(l, L)))),
    (r"blocks\.\d+\.att\.x_k", const(lambda l, L, C, n: 1 - (ddd(C) ** (0.9 * r1(l, L)) + 0.4 * r0(l, L)))),
    (r"blocks\.\d+\.att\.x_v", const(lambda l, L, C, n: 1 - (ddd(C) ** (0.4 * r1(l, L)) + 0.6 * r0(l, L)))),
    (r"blocks\.\d+\.att\.x_a", const(lambda l, L, C, n: 1 - ddd(C) ** (0.9 * r1(l, L)))),
    (r"blocks\.\d+\.att\.x_g", const(lambda l, L, C, n: 1 - ddd(C) ** (0.2 * r1(l, L)))),
    (r"blocks\.\d+\.att\.w0", const(lambda l, L, C, n: -7 + 5 * (n / (C - 1)) ** (0.85 + 1.0 * r0(l, L) ** 0.5) + 0.5)),
    (r"blocks\.\d+\.att\.[wavg]1", ZEROS),
    (r"blocks\.\d+\.att\.[wavg]2", ortho(0.1)),
    (r"blocks\.\d+\.att\.a0", ZEROS),
    (r"blocks\.\d+\.att\.v0", ONES),
    (r"blocks\.\d+\.att\.k_k", const(lambda l, L, C, n: 0.85)),
    (r"blocks\.\d+\.att\.k_a", ONES),
    (r"blocks\.\d+\.att\.r_k", ZEROS),
    (r"blocks\.\d+\.att\.ln_x\.weight", const(lambda l, L, C, n: ((1 + l) / L) ** 0.7)),
    (r"blocks\.\d+\.att\.ln_x\.bias", ZEROS),
    (r"blocks\.\d+\.att\.(receptance|value)\.weight", ortho(1.0)),   # plain orthogonal_, gain 1
    (r"blocks\.\d+\.att\.key\.weight", ortho(0.1)),
    (r"blocks\.\d+\.att\.output\.weight", ZEROS),
    (r"blocks\.\d+\.ffn\.x_k", const(lambda l, L, C, n: 1 - ddd(C) ** (r1(l, L) ** 4))),
    (r"blocks\.\d+\.ffn\.key\.weight", ortho(1.0)),   # [4C, C]: plain orthogonal_, no sqrt(rows/cols) factor
    (r"blocks\.\d+\.ffn\.value\.weight", ZEROS),
    (r"ln_out\.weight", ONES),
    (r"ln_out\.bias", ZEROS),
    (r"head\.weight", ortho(lambda V, C: 0.5 * math.sqrt(V / C) if V > C else 0.5)),
]


def rule_of(key):
    rows = [rule for pattern, rule in INIT_TABLE if re.fullmatch(pattern, key)]
    assert len(rows) == 1, f"{key} matches {len(rows)} rows of INIT_TABLE: give every parameter exactly one rule"
    return rows[0]


def check_tensor(key, tensor, L, C, V):
    """Assert that `tensor` follows its row's rule; bf16 files get bf16's rounding (8 mantissa bits) as slack."""
    kind, value = rule_of(key)
    bf16 = tensor.dtype == torch.bfloat16
    t = tensor.double()
    match = re.match(r"blocks\.(\d+)\.", key)
    l = int(match.group(1)) if match else None
    if kind == "const":
        want = torch.as_tensor(value(l, L, C, torch.arange(t.numel(), dtype=torch.float64)), dtype=torch.float64)
        want = want.expand(t.numel())
        rtol = 2 ** -8 if bf16 else 0.0   # bf16 rounds to 8 significant bits
        assert torch.allclose(t.reshape(-1), want, rtol=rtol, atol=1e-6), \
            f"{key}: max error {(t.reshape(-1) - want).abs().max():.3g}"
    elif kind == "ortho":
        s = value(V, C) if callable(value) else value
        singular = torch.linalg.svdvals(t)
        tol = 0.01 if bf16 else 1e-5
        assert singular.min() >= s * (1 - tol) and singular.max() <= s * (1 + tol), \
            f"{key} {tuple(t.shape)}: singular values {singular.min():.4f}..{singular.max():.4f}, want all {s:.4f}"
    else:
        bound = value
        assert t.abs().max() <= bound * (1 + (2 ** -8 if bf16 else 1e-6)), f"{key}: exceeds the bound {bound}"
        assert t.abs().max() > 0.99 * bound, f"{key}: max {t.abs().max():.3g}, far inside the bound {bound}"
        assert t.std() == pytest.approx(bound / math.sqrt(3), rel=0.02), f"{key}: std of uniform(-{bound}, {bound})"


def check_state_dict(sd, L, C, V):
    """Assert that every tensor of the init state dict `sd` follows its rule; reports all that do not."""
    failures = []
    for key, tensor in sd.items():
        try:
            check_tensor(key, tensor, L, C, V)
        except AssertionError as e:
            failures.append(str(e).splitlines()[0])
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("L,C,precision", [(4, 256, "bf16"), (3, 192, "fp32")])
def test_stage1_init_follows_the_recipe_table(tmp_path, L, C, precision):
    V = 65536
    run("train.py", "--train_stage", "1", "--proj_dir", tmp_path, "--n_layer", L, "--n_embd", C,
        "--vocab_size", V, "--precision", precision, "--accelerator", "cpu", "--random_seed", 0)
    sd = torch.load(tmp_path / "rwkv-init.pth", weights_only=True)
    assert {v.dtype for v in sd.values()} == {torch.bfloat16 if precision == "bf16" else torch.float32}
    check_state_dict(sd, L, C, V)


def test_every_table_row_is_used():
    """A row whose pattern no key matches is a rule for a parameter that no longer exists."""
    from src.config import ModelConfig
    from src.model import RWKV
    with torch.device("meta"):
        keys = RWKV(ModelConfig(n_layer=2, n_embd=64, vocab_size=65536)).state_dict().keys()
    unused = [pattern for pattern, _ in INIT_TABLE if not any(re.fullmatch(pattern, k) for k in keys)]
    assert not unused
