"""Several processes on one host (DDP over gloo on CPU): the same path DeepSpeed takes on several GPUs."""
import pytest

from src.data.dataset import MINI_EPOCH_SAMPLES
from tests.conftest import CTX, VOCAB, run_steps
from tests.data_helpers import check_two_ranks_stream


def losses(tmp_path, name, data, devices, micro_bsz, steps=4):
    prefix, magic_prime = data
    # byte_data holds less than a mini-epoch, so the LR schedule's horizon is given: one mini-epoch
    return run_steps(tmp_path, name, steps, [
        "--proj_dir", tmp_path / name, "--data_file", prefix, "--data_type", "binidx", "--vocab_size", VOCAB,
        "--ctx_len", CTX, "--magic_prime", magic_prime, "--my_exit_tokens", MINI_EPOCH_SAMPLES * CTX,
        "--micro_bsz", micro_bsz, "--n_layer", 1, "--n_embd", 32, "--head_size", 8, "--lr_init", "1e-2",
        "--lr_final", "1e-3", "--warmup_steps", 0, "--accelerator", "cpu", "--devices", devices, "--precision", 32, "--strategy", "ddp" if devices > 1 else "auto",
        "--enable_progress_bar", "False", "--random_seed", 0, "--train_stage", 0], timeout=600)


def test_two_processes_match_one(byte_data, tmp_path):
    """2 ranks x micro_bsz 8 read exactly the samples of 1 rank x 16 (the sampler interleaves ranks), and the
    logged loss is the mean over ranks: the per-step losses agree."""
    one = losses(tmp_path, "one", byte_data, 1, 16)
    two = losses(tmp_path, "two", byte_data, 2, 8)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-4)
    # what the run itself logs is the mean over ranks too (the progress bar's running mean; wandb's per-step loss)
    assert one["logged_loss"] == pytest.approx(sum(one["losses"]) / len(one["losses"]), abs=1e-5)
    assert two["logged_loss"] == pytest.approx(one["logged_loss"], abs=1e-4)
    assert one["losses"][-1] < one["losses"][0]


def test_two_processes_stream_every_document_once(tmp_path):
    """The streamed loader on 2 real ranks: over three mini-epochs (fresh loader workers resuming from the saved
    positions) no document is served twice within a pass and none is skipped."""
    check_two_ranks_stream(tmp_path, "--accelerator", "cpu", "--precision", "32", "--strategy", "ddp")
