"""Runs that survive: SIGKILL at random moments, interrupted and failed checkpoint writes, checkpoints of
another shape, a diverging loss, and bad input refused before any model is built."""
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train
from src.data.binidx import write_binidx
from src.train.checkpoint import CheckpointError, load_newest, save_atomic
from src.data.dataset import JsonlStreamDataset, find_magic_prime
from tests.data_helpers import gutenberg_texts, write_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--n_layer", "1", "--n_embd", "32", "--head_size", "32", "--accelerator", "cpu", "--devices", "1",
        "--strategy", "auto", "--precision", "32", "--enable_progress_bar", "False", "--random_seed", "0",
        "--lr_init", "1e-3", "--lr_final", "1e-4", "--warmup_steps", "0"]
STREAM = dict(ctx_len=16, micro_bsz=2, epoch_steps=4)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """A small Pile-format shard of real text: 60 documents of 3000 characters cut from the Gutenberg fixture."""
    text = "".join(gutenberg_texts())
    folder = tmp_path_factory.mktemp("shards")
    write_shard(str(folder / "00.jsonl"), [{"text": text[i * 3000:(i + 1) * 3000]} for i in range(60)])
    return str(folder)


def stream_cmd(proj, shard_dir, epoch_count, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--proj_dir", str(proj), "--data_type", "jsonl",
            "--data_file", shard_dir, "--epoch_count", str(epoch_count), "--epoch_save", "1",
            *[f"--{k}={v}" for k, v in STREAM.items()], *TINY, *map(str, extra)]


def newest(proj):
    names = [int(m.group(1)) for m in map(re.compile(r"^rwkv-(\d+)\.pth$").match, os.listdir(proj)) if m]
    return max(names, default=-1)


def test_sigkill_at_random_moments_then_resume(shard_dir, tmp_path):
    """The reference's weights-only resume (--resume_state 0; the full states: tests/test_resume.py): each restart
    continues at the mini-epoch after the newest rwkv-<n>.pth, the stream where that mini-epoch ended."""
    proj, epochs, rng = tmp_path / "run", 6, random.Random(1)
    subprocess.run(stream_cmd(proj, shard_dir, epochs, "--train_stage", "1"), check=True, capture_output=True)
    cmd = stream_cmd(proj, shard_dir, epochs, "--train_stage", "3", "--resume_state", "0")
    resumed_from = []
    for attempt in range(3):
        before = newest(proj)
        resumed_from.append(before)
        with open(tmp_path / f"out{attempt}.txt", "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
            deadline = time.time() + 120
            while newest(proj) == before and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0, 0.6))   # somewhere in the next mini-epoch, its save, or the log write
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        text = open(tmp_path / f"out{attempt}.txt").read()
        start = "rwkv-init.pth" if before < 0 else f"rwkv-{before}.pth"
        assert f"resuming from {os.path.join(str(proj), start)}" in text, text[-2000:]
    before = newest(proj)
    assert before >= 2   # each kill came after progress, and the progress was kept
    final = subprocess.run(cmd, capture_output=True, text=True)
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-2000:]
    assert f"resuming from {os.path.join(str(proj), f'rwkv-{before}.pth')}" in final.stdout

    for n in range(epochs):   # every mini-epoch was completed and saved whole, and nothing partial is left
        torch.load(proj / f"rwkv-{n}.pth", weights_only=True)
    torch.load(proj / "rwkv-final.pth", weights_only=True)
    assert not [n for n in os.listdir(proj) if ".tmp" in n]

    # the data order continued where each checkpoint left it: the saved stream positions equal those of
    # one uninterrupted pass over the same mini-epochs
    reference = JsonlStreamDataset(shard_dir, seed=0, state_dir=str(tmp_path / "reference"), **STREAM)
    for e in range(epochs):
        reference.real_epoch = e
        for worker in range(2):
            for _ in reference.samples(worker, 2):
                pass
    for name in os.listdir(tmp_path / "reference"):
        assert json.load(open(tmp_path / "reference" / name)) == json.load(open(proj / "data_state" / name)), name


def test_kill_while_writing_a_checkpoint_keeps_the_old_one(tmp_path):
    path = tmp_path / "rwkv-3.pth"
    save_atomic({"w": torch.ones(4)}, str(path))
    (tmp_path / "rwkv-init.pth").write_bytes((tmp_path / "rwkv-3.pth").read_bytes())
    child = subprocess.Popen([sys.executable, "-c",
                              "import sys, torch; sys.path.insert(0, sys.argv[1]); from src.train.checkpoint import save_atomic; "
                              "save_atomic({'w': torch.randn(60_000_000)}, sys.argv[2])", ROOT, str(path)])
    deadline = time.time() + 60
    while not any(".tmp" in n and os.path.getsize(tmp_path / n) > 1_000_000 for n in os.listdir(tmp_path)):
        assert child.poll() is None and time.time() < deadline, "the writer finished before it could be killed"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(4))   # the real name is intact
    messages = []
    n, found, state_dict = load_newest(str(tmp_path), log=messages.append)
    assert (n, state_dict["w"].tolist()) == (3, [1.0] * 4)
    assert any("interrupted" in m for m in messages) and not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_disk_full_while_saving(tmp_path, monkeypatch):
    path = str(tmp_path / "rwkv-5.pth")
    save_atomic({"w": torch.ones(3)}, path)

    def full_disk(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*untouched"):
        save_atomic({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["rwkv-5.pth"]


def test_non_finite_weights_are_never_saved(tmp_path):
    with pytest.raises(CheckpointError, match="NaN or inf in b"):
        save_atomic({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])}, str(tmp_path / "rwkv-0.pth"))
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def binidx_data(tmp_path_factory):
    """Random byte tokens (vocab 256), a little over one mini-epoch of ctx 16."""
    prefix = str(tmp_path_factory.mktemp("bin") / "tokens")
    tokens = np.random.default_rng(0).integers(1, 256, size=700_000).astype(np.uint16)
    write_binidx(prefix, [tokens])
    return prefix, find_magic_prime(len(tokens), 16)


def run_main(argv, monkeypatch):
    """train.main in this process; returns the error text. Fails the test if a real model was built."""
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the bad input was reported")
    monkeypatch.setattr(train, "build_model", no_model)
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    return str(exit_info.value.code)


def binidx_argv(proj, data, *extra):
    prefix, magic_prime = data
    return ["--proj_dir", str(proj), "--data_type", "binidx", "--data_file", prefix, "--vocab_size", "256",
            "--ctx_len", "16", "--micro_bsz", "5040", "--magic_prime", str(magic_prime), "--train_stage", "3",
            *TINY, *map(str, extra)]


def test_bad_inputs_are_refused_before_any_model(binidx_data, tmp_path, monkeypatch, shard_dir):
    proj = tmp_path / "run"
    prefix, magic_prime = binidx_data
    cases = [
        (["--ctx_len", "100"], r"--ctx_len 100 must be a positive multiple of 16.*--ctx_len 96"),
        (["--magic_prime", str(magic_prime - 6)], rf"magic_prime.*{magic_prime}"),
        (["--magic_prime", "43747"], rf"43747.*{magic_prime}"),
        (["--data_file", prefix + "_missing"], r"tokens_missing\.(idx|bin)"),
        (["--vocab_size", "200"], r"vocab"),
        (["--micro_bsz", "11"], r"40320"),
        (["--n_embd", "48"], r"--n_embd 48"),
        (["--my_testing", "x060"], r"x070"),
        (["--data_type", "text"], r"--data_type"),
        (["--strategy", "deepspeed_stage_1"], r"deepspeed_stage_1.*deepspeed_stage_2"),
        (["--strategy", "deepspeed_stage_3", "--compile_blocks", "1"], r"--compile_blocks 0"),
    ]
    for extra, pattern in cases:
        message = run_main(binidx_argv(proj, binidx_data, *extra), monkeypatch)
        assert message.startswith("error:") and re.search(pattern, message, re.S), (extra, message)
    empty = tmp_path / "empty"
    empty.mkdir()
    message = run_main(["--proj_dir", str(proj), "--data_type", "jsonl", "--data_file", str(empty),
                        "--epoch_steps", "4", "--ctx_len", "16", "--train_stage", "3", *TINY], monkeypatch)
    assert str(empty) in message and "no .jsonl" in message, message
    # no init yet for stage 3
    message = run_main(["--proj_dir", str(proj), "--data_type", "jsonl", "--data_file", shard_dir,
                        "--epoch_steps", "4", "--ctx_len", "16", "--micro_bsz", "2", "--train_stage", "3", *TINY],
                       monkeypatch)
    assert "no rwkv-init.pth" in message and "--train_stage 1" in message, message


def test_checkpoint_of_another_shape(binidx_data, tmp_path, monkeypatch):
    wide = tmp_path / "wide"
    train.main(binidx_argv(wide, binidx_data, "--train_stage", "1", "--n_embd", "64"))
    message = run_main(binidx_argv(tmp_path / "run", binidx_data, "--train_stage", "0",
                                   "--load_model", wide / "rwkv-init.pth"), monkeypatch)
    assert "emb.weight: file (256, 64) vs model (256, 32)" in message and "more" in message
    assert "--n_layer 1 --n_embd 64 --vocab_size 256 --head_size 32" in message

    train.main(binidx_argv(tmp_path / "narrow", binidx_data, "--train_stage", "1"))
    partial = torch.load(tmp_path / "narrow" / "rwkv-init.pth", weights_only=True)
    del partial["head.weight"], partial["blocks.0.att.r_k"]
    torch.save(partial, tmp_path / "partial.pth")
    message = run_main(binidx_argv(tmp_path / "run", binidx_data, "--train_stage", "0",
                                   "--load_model", tmp_path / "partial.pth"), monkeypatch)
    assert "missing in file: head.weight" in message and "--load_partial 1" in message
    monkeypatch.undo()
    built = []
    monkeypatch.setattr(train, "fit", lambda cfg, model, *a, **k: built.append(model))
    train.main(binidx_argv(tmp_path / "run", binidx_data, "--train_stage", "0", "--load_partial", "1",
                           "--load_model", tmp_path / "partial.pth"))
    state = built[0].model.state_dict()
    assert torch.equal(state["blocks.0.att.key.weight"], partial["blocks.0.att.key.weight"])
    assert torch.all(state["blocks.0.att.r_k"] == 0)   # taken from the init


@pytest.mark.parametrize("devices", [1, 2])
def test_nan_loss_stops_the_run_and_saves_nothing(binidx_data, tmp_path, devices):
    """Every rank stops at the same step with the error (no rank is left waiting in a collective)."""
    proj = tmp_path / "run"
    train.main(binidx_argv(proj, binidx_data, "--train_stage", "1"))
    state = torch.load(proj / "rwkv-init.pth", weights_only=True)
    state["head.weight"][3, 5] = float("nan")
    torch.save(state, proj / "rwkv-init.pth")   # a poisoned start, so the very first loss is NaN
    ranks = ["--devices", devices, "--strategy", "ddp" if devices > 1 else "auto"]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *binidx_argv(proj, binidx_data, *ranks)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert re.search(r"loss became nan at step 0 \(mini-epoch 0\).*rwkv-init\.pth", result.stderr, re.S), result.stderr[-2000:]
    assert result.stderr.count("loss became nan at step 0") == devices   # each rank's own error
    assert sorted(n for n in os.listdir(proj) if n.endswith(".pth")) == ["rwkv-init.pth"]


def test_data_under_one_mini_epoch_needs_an_exit_token_count(tmp_path, monkeypatch):
    prefix = str(tmp_path / "small")
    write_binidx(prefix, [np.random.default_rng(1).integers(1, 256, size=100_000).astype(np.uint16)])
    small = (prefix, find_magic_prime(100_000, 16))
    message = run_main(binidx_argv(tmp_path / "run", small, "--micro_bsz", "8"), monkeypatch)
    assert message.startswith("error:") and "less than one mini-epoch" in message and "--my_exit_tokens" in message, message


def test_a_run_that_would_train_nothing_stops_before_training(binidx_data, shard_dir, tmp_path, monkeypatch):
    """Fewer steps than the warmup (the schedule would reach its horizon at step 0) or a resume at the schedule's
    end: the run stops before any model is built, naming the flags and the fix, and writes no log or checkpoint."""
    proj = tmp_path / "run"
    train.main(stream_cmd(proj, shard_dir, 1, "--train_stage", "1")[2:])
    message = run_main(stream_cmd(proj, shard_dir, 1, "--train_stage", "3", "--warmup_steps", "10")[2:], monkeypatch)
    assert message == ("error: --warmup_steps 10 is not shorter than this run's 4 steps (the schedule ends at step 4: "
                       "--epoch_count 1 x --epoch_steps 4); the warmup must end before the run does: use "
                       "--warmup_steps 0 or a larger --epoch_count or --epoch_steps"), message
    message = run_main(stream_cmd(proj, shard_dir, 1, "--train_stage", "3", "--warmup_steps", "4")[2:], monkeypatch)
    assert message.startswith("error: --warmup_steps 4 is not shorter than this run's 4 steps"), message
    train.main(binidx_argv(tmp_path / "binidx", binidx_data, "--train_stage", "1"))
    message = run_main(binidx_argv(tmp_path / "binidx", binidx_data, "--my_exit_tokens", 100_000, "--warmup_steps", 2),
                       monkeypatch)
    assert message.startswith("error: --warmup_steps 2 is not shorter than this run's 2 steps (the schedule ends at "
                              "step 2: --my_exit_tokens 100000 / 80640 tokens a step)"), message

    shutil.copy(proj / "rwkv-init.pth", proj / "rwkv-0.pth")   # as if mini-epoch 0, the last, were done
    message = run_main(stream_cmd(proj, shard_dir, 1, "--train_stage", "3")[2:], monkeypatch)
    assert message == ("error: nothing to train: this run starts at mini-epoch 1 (step 4), at or past the schedule's "
                       "end at step 4 (--epoch_count 1 x --epoch_steps 4); to train on, give a larger --epoch_count or "
                       "--epoch_steps; to start over, run --train_stage 1"), message
    assert sorted(os.listdir(proj)) == ["rwkv-0.pth", "rwkv-init.pth"]
