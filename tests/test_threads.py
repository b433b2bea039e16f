"""CPU threads (src/threads.py): the rule, and that train.py trains with the count it chose."""
import os
import subprocess
import sys

import torch
from torch.utils.data import DataLoader, Dataset

from src.engine.threads import cpu_threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rule(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert cpu_threads() == 7 and cpu_threads(processes=2) == 3 and cpu_threads(processes=8) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert cpu_threads() == 1 and cpu_threads(requested=2) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")   # the user's setting, for the tools without a --threads flag
    assert cpu_threads() == 2 and cpu_threads(requested=1) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "0")
    assert cpu_threads() == 1


class WorkerThreads(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.get_num_threads()


def test_loader_workers_compute_with_one_thread():
    """train.py's loader workers are forked from the training process after it set its threads; torch sets one
    thread in each worker, which the rule counts on (the workers tokenize, they do not share the model's work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert [int(n) for n in DataLoader(WorkerThreads(), num_workers=2)] == [1, 1]
    finally:
        torch.set_num_threads(threads)


def test_train_py_trains_with_the_chosen_threads(tmp_path):
    shard = tmp_path / "data.jsonl"
    shard.write_text("".join('{"text": "%s"}\n' % (f"document {i} " * 40) for i in range(40)))
    common = [sys.executable, os.path.join(ROOT, "train.py"), "--proj_dir", str(tmp_path / "run"),
              "--data_type", "jsonl", "--data_file", str(shard), "--ctx_len", "16", "--micro_bsz", "2",
              "--epoch_steps", "2", "--n_layer", "1", "--n_embd", "64", "--accelerator", "cpu", "--strategy", "auto",
              "--precision", "32", "--warmup_steps", "0", "--enable_progress_bar", "False"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}   # torch's default: one per core

    def train(*flags):
        result = subprocess.run([*common, *flags], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return result.stdout

    train("--train_stage", "1", "--epoch_count", "1")
    automatic = max(1, len(os.sched_getaffinity(0)) - 1)   # 1 on 2 cores, where torch would take 2
    assert f"starting at mini-epoch 0, {automatic} CPU thread" in train("--train_stage", "3", "--epoch_count", "1")
    assert "starting at mini-epoch 1, 2 CPU threads\n" in train("--train_stage", "3", "--epoch_count", "2",
                                                                 "--threads", "2")
