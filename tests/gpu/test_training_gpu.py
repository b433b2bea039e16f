"""One GPU: the optimized path keeps the recipe's numbers (issue 5's loss-parity rule)."""
import pytest
import torch

from tests.gpu.conftest import compare_losses, minipile_flags, run_steps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def test_fused_path_matches_plain_pytorch_path(corpus_binidx, minipile_init, tmp_path):
    """Same init, same data, 300 steps: fused (chunked kernel, chunked head loss) against the
    plain path (sequential kernel, full-logit loss): per-step losses within 0.01, no drift."""
    fused = run_steps(tmp_path, "fused", 300, minipile_flags(corpus_binidx, minipile_init, tmp_path / "a", fused=1))
    plain = run_steps(tmp_path, "plain", 300, minipile_flags(corpus_binidx, minipile_init, tmp_path / "b", fused=0))
    mean, tail = compare_losses(fused, plain, "fused vs plain")
    print(f"peak memory: fused {fused['peak_mem_gb']:.2f} GB, plain {plain['peak_mem_gb']:.2f} GB")
    assert mean < 0.01 and tail < 0.01
    assert plain["losses"][-1] < plain["losses"][0] - 2   # it trained
