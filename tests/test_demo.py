"""The offline demo, with a smaller model on CPU: stdlib sources -> init -> streamed training -> a sample; and
reruns that start their own log and keep only the run before them."""
import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from src.train.checkpoint import MOVED_ASIDE, TRAIN_LOG
from src.data.dataset import STREAM_WORKERS, DataProblems, JsonlStreamDataset
from tools import demo as demo_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_LINE = re.compile(r"^\d+ (\d+\.\d{6}) ", re.M)


def demo(proj, *flags):
    result = subprocess.run([sys.executable, "tools/demo.py", "--proj_dir", str(proj), "--threads", "1", *flags],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo with an L1-D64 model and 10-step mini-epochs (a minute on one thread): (proj_dir, its output,
    its train_log.txt)."""
    proj = tmp_path_factory.mktemp("demo") / "demo"
    result = demo(proj, "--n_layer", "1", "--n_embd", "64", "--epoch_steps", "10", "--length", "30")
    return proj, result, (proj / TRAIN_LOG).read_text()


def test_every_mini_epoch_of_the_demo_reads_a_mix_of_files(tmp_path):
    """What each loader worker reads in each of the demo's four 35-step mini-epochs (CPU: 8 x 64 tokens). Sorted by
    path, one worker read _pydecimal.py alone in mini-epochs 1 and 2 and _sysconfigdata_*.py (the build's compiler flags, at a loss of 7.9
    where code was at 5) in most of mini-epoch 3, whose loss rose above mini-epoch 2's."""
    data = tmp_path / "data"
    demo_tool.write_stdlib_shard(str(data / "stdlib.jsonl"), 8e6)
    files = [json.loads(line)["meta"]["file"] for line in open(data / "stdlib.jsonl")]
    dataset = JsonlStreamDataset(str(data), 64, 8, 35, 0, str(tmp_path / "state"))
    windows_per_epoch = 35 // STREAM_WORKERS * 8
    for worker in range(STREAM_WORKERS):
        windows = dataset._windows(worker, STREAM_WORKERS, None, DataProblems())
        for epoch in range(4):
            read = Counter(files[next(windows)[1]["line"]] for _ in range(windows_per_epoch))
            # several files, none most of it (a file may be up to 32 kB, about as much as a worker's mini-epoch)
            assert len(read) >= 3 and max(read.values()) < 0.6 * windows_per_epoch, (worker, epoch, read.most_common(3))


def test_offline_demo_loss_falls_every_mini_epoch_and_it_samples(demo_run):
    proj, result, log = demo_run
    losses = [float(loss) for loss in LOSS_LINE.findall(log)]
    assert len(losses) == 4 and all(b < a for a, b in zip(losses, losses[1:])), log
    assert (proj / "rwkv-final.pth").exists()
    sample = result.stdout.split("--prompt def ")[-1]
    assert "# 30 tokens in" in result.stderr and sample.strip(), result.stdout[-1000:]


def test_rerun_starts_its_own_log_and_keeps_only_the_run_before(demo_run):
    proj, _, first_log = demo_run
    tiny = ["--n_layer", "1", "--n_embd", "64", "--ctx_len", "16", "--micro_bsz", "2", "--epoch_steps", "2",
            "--epoch_count", "1", "--warmup_steps", "0", "--data_mb", "0.1", "--length", "2"]
    for run in range(2):
        demo(proj, *tiny)
        log = (proj / TRAIN_LOG).read_text()
        assert log.count("NEW RUN") == 1 and len(LOSS_LINE.findall(log)) == 1, log
        aside = [name for name in os.listdir(proj) if name.startswith(MOVED_ASIDE)]
        assert len(aside) == 1, aside
        previous = proj / aside[0]
        assert {"rwkv-init.pth", "rwkv-final.pth", TRAIN_LOG} <= set(os.listdir(previous))
        assert (previous / TRAIN_LOG).read_text() == first_log
        first_log = log
