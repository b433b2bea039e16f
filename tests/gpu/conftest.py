import os

import pytest

from tests.conftest import ROOT, run

# real text for the training checks: four Pile-format shards train-00.jsonl.zst .. train-03.jsonl.zst (about 17 M
# tokens together) copied into the repository's data/corpus (ignored by git)
SHARDS = os.path.join(ROOT, "data", "corpus")


@pytest.fixture(scope="session")
def corpus_binidx(tmp_path_factory):
    """Real English text as binidx (rwkv_vocab_v20230424), about 17 M tokens; returns (prefix, magic_prime at ctx 512)."""
    from src.data.binidx import BinIdx
    from src.data.dataset import find_magic_prime
    prefix = str(tmp_path_factory.mktemp("corpus") / "corpus")
    shards = [os.path.join(SHARDS, f"train-0{i}.jsonl.zst") for i in range(4)]
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: copy four Pile-format .jsonl.zst shards of real English text there")
    run("tools/make_data.py", *shards, "--output", prefix, "--ctx_len", "512")
    return prefix, find_magic_prime(BinIdx(prefix).num_tokens, 512)


@pytest.fixture(scope="session")
def minipile_init(tmp_path_factory):
    """rwkv-init.pth of L12-D768 in bf16, written by the prepare script's flags."""
    proj = tmp_path_factory.mktemp("init")
    run("train.py", "--train_stage", "1", "--proj_dir", proj, "--n_layer", 12, "--n_embd", 768, "--ctx_len", 512,
        "--vocab_size", 65536, "--accelerator", "cpu", "--precision", "bf16", "--strategy", "deepspeed_stage_2")
    return os.path.join(proj, "rwkv-init.pth")


def minipile_flags(corpus, init, proj, **overrides):
    """The MiniPile recipe's flags (demo-training-run.sh), starting from `init`."""
    prefix, magic_prime = corpus
    flags = dict(load_model=init, train_stage=0, proj_dir=proj, data_file=prefix, data_type="binidx",
                 magic_prime=magic_prime, my_exit_tokens=magic_prime * 512, vocab_size=65536, ctx_len=512,
                 n_layer=12, n_embd=768, micro_bsz=16, lr_init=6e-4, lr_final=6e-5, warmup_steps=10, beta1=0.9,
                 beta2=0.99, adam_eps=1e-18, weight_decay=0.001, epoch_save=10, head_size=64, accelerator="gpu",
                 devices=1, precision="bf16", strategy="deepspeed_stage_2", grad_cp=1, ds_bucket_mb=200,
                 enable_progress_bar=False, random_seed=0)
    flags.update(overrides)
    return [a for k, v in flags.items() for a in (f"--{k}", str(v))]


def compare_losses(a, b, label):
    """Mean absolute difference of two per-step loss curves, overall and over the last quarter (drift)."""
    import numpy as np
    a, b = np.array(a["losses"]), np.array(b["losses"])
    assert len(a) == len(b) and len(a) > 0
    diff = np.abs(a - b)
    tail = diff[-max(1, len(diff) // 4):]
    signed_tail = (a - b)[-len(tail):].mean()   # a bias shows here, noise averages out
    print(f"\n{label}: {len(a)} steps, mean |diff| {diff.mean():.5f}, last quarter {tail.mean():.5f} "
          f"(signed {signed_tail:+.5f}), max {diff.max():.4f}; first loss {a[0]:.4f} / {b[0]:.4f}, "
          f"last {a[-1]:.4f} / {b[-1]:.4f}")
    return diff.mean(), tail.mean()
