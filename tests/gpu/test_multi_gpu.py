"""Two GPUs with DeepSpeed (issue 6): same numbers as one GPU, disjoint stream shares, every ZeRO stage's
checkpoints load on one GPU and on CPU."""
import os

import pytest
import torch

from tests.data_helpers import check_two_ranks_stream
from tests.conftest import run, run_steps
from tests.gpu.conftest import SHARDS, compare_losses, minipile_flags

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


@pytest.fixture(scope="module")
def one_gpu_losses(corpus_binidx, minipile_init, tmp_path_factory):
    """200 steps of the MiniPile recipe on 1 GPU x micro_bsz 16 (the blocks replayed as CUDA graphs)."""
    tmp = tmp_path_factory.mktemp("one_gpu")
    return run_steps(tmp, "one", 200, minipile_flags(corpus_binidx, minipile_init, tmp / "a", micro_bsz=16))


@pytest.mark.parametrize("cuda_graph", [1, 0], ids=["graphs", "eager"])
def test_two_gpus_match_one(one_gpu_losses, corpus_binidx, minipile_init, tmp_path, cuda_graph):
    """2 GPUs x micro_bsz 8 read the same 16 samples per step as 1 GPU x 16 (the sampler interleaves ranks), with
    the blocks replayed as CUDA graphs and run eagerly on the 2 GPUs."""
    two = run_steps(tmp_path, "two", 200, minipile_flags(corpus_binidx, minipile_init, tmp_path / "b", micro_bsz=8,
                                                          devices=2, cuda_graph=cuda_graph))
    assert two["world_size"] == 2 and two["cuda_graph"] == bool(cuda_graph)
    mean, tail = compare_losses(two, one_gpu_losses, f"2 GPUs x 8 (cuda_graph {cuda_graph}) vs 1 GPU x 16")
    assert mean < 0.01 and tail < 0.01


def test_two_gpus_stream_every_document_once(tmp_path):
    """The streamed loader on 2 GPUs under DeepSpeed: no document twice within a pass, none skipped."""
    check_two_ranks_stream(tmp_path, "--accelerator", "gpu", "--precision", "bf16", "--strategy", "deepspeed_stage_2",
                           "--n_embd", 64, "--head_size", 64)  # the built kernel's head size (later flags win)


@pytest.mark.parametrize("strategy", ["deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3"])
def test_zero_strategies_stream_and_checkpoints(strategy, tmp_path):
    from src.model import RWKV
    from tools.generate import load_model
    proj = tmp_path / "run"
    common = ["--proj_dir", proj, "--data_type", "jsonl", "--data_file", os.path.join(SHARDS, "val.jsonl.zst"),
              "--n_layer", 4, "--n_embd", 256, "--ctx_len", 256, "--micro_bsz", 4, "--epoch_steps", 6,
              "--epoch_count", 2, "--epoch_save", 1, "--vocab_size", 65536, "--precision", "bf16",
              "--enable_progress_bar", "False", "--random_seed", 0]
    run("train.py", *common, "--train_stage", 1, "--accelerator", "cpu", "--strategy", strategy)
    run("train.py", *common, "--train_stage", 3, "--accelerator", "gpu", "--devices", 2, "--strategy", strategy,
        "--lr_init", "1e-3", "--lr_final", "1e-4", "--warmup_steps", 2)
    names = sorted(os.listdir(proj))
    assert {"rwkv-0.pth", "rwkv-1.pth", "rwkv-final.pth"} <= set(names), names
    # both ranks read their own share of the stream and saved where they stopped
    states = sorted(os.listdir(proj / "data_state"))
    assert any("rank0of2" in n for n in states) and any("rank1of2" in n for n in states), states
    init = torch.load(proj / "rwkv-init.pth", weights_only=True)
    for device in ("cpu", "cuda"):
        model = load_model(str(proj / "rwkv-final.pth"), device)
        assert isinstance(model, RWKV)
        final = model.state_dict()
        assert {k: v.shape for k, v in final.items()} == {k: v.shape for k, v in init.items()}
        logits = model(torch.randint(0, 65536, (1, 32), device=device))
        assert torch.isfinite(logits).all()
    assert not torch.equal(final["blocks.0.att.receptance.weight"].cpu().bfloat16(), init["blocks.0.att.receptance.weight"])
