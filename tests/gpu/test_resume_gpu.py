"""Full states on the GPU (bf16, DeepSpeed ZeRO-2 with CUDA graphs, and ZeRO-3): a run stopped at a state and
resumed stays within the run-to-run noise of runs that went straight through."""
import numpy as np
import pytest
import torch

from tests.conftest import run_steps
from tests.gpu.conftest import minipile_flags

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
STEPS, STOP = 80, 40


@pytest.mark.parametrize("strategy", ["deepspeed_stage_2", "deepspeed_stage_3"])
def test_resumed_run_is_within_run_to_run_noise(corpus_binidx, minipile_init, tmp_path, strategy):
    def flags(proj, **overrides):
        return minipile_flags(corpus_binidx, minipile_init, tmp_path / proj, strategy=strategy,
                              save_every_steps=STOP, **overrides)
    first = run_steps(tmp_path, "first", STEPS, flags("first"))
    second = run_steps(tmp_path, "second", STEPS, flags("second"))
    stopped = run_steps(tmp_path, "stopped", STOP, flags("resumed"))
    resumed = run_steps(tmp_path, "resumed", STEPS - STOP, flags("resumed", train_stage=3))
    assert first["cuda_graph"] == (strategy == "deepspeed_stage_2") == resumed["cuda_graph"]
    a, b = np.array(first["losses"]), np.array(second["losses"])
    c = np.array(stopped["losses"] + resumed["losses"])
    noise, after = np.abs(a - b)[STOP:], np.abs(c - a)[STOP:]
    print(f"\n{strategy}: steps {STOP}..{STEPS - 1} after the resume: mean |resumed - first| {after.mean():.6f} "
          f"(max {after.max():.5f}); run-to-run mean |second - first| {noise.mean():.6f} (max {noise.max():.5f}); "
          f"before the stop: mean |stopped - first| {np.abs(c - a)[:STOP].mean():.6f}; first loss after the resume "
          f"{c[STOP]:.5f} vs {a[STOP]:.5f}")
    assert after.mean() <= 2 * noise.mean() + 2e-3
    assert resumed["losses"][0] < first["losses"][0] - 1   # it continued the trained weights, not the init
