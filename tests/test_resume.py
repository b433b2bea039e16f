"""Full states (src/train/full_state.py): a run killed anywhere, even while it writes a state, and resumed ends with
the weights and the losses of a run never interrupted (CPU, fp32: bit for bit)."""
import os
import random
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch

from src.train import full_state
from tests.conftest import run
from tests.test_faults import binidx_argv, binidx_data, shard_dir, stream_cmd  # noqa: F401 (fixtures)

EPOCHS, EVERY = 4, 3   # mini-epochs of 4 steps (tests/test_faults.py's STREAM): a full state every 3 steps
LOG_LINE = re.compile(r"^(\d+) (\S+) ")


def epoch_losses(proj):
    """{mini-epoch: its logged loss}, the last line of each (a killed run may have logged one it then retrained)."""
    return dict(m.groups() for m in map(LOG_LINE.match, open(os.path.join(proj, "train_log.txt"))) if m)


def weight_files(proj):
    return sorted(n for n in os.listdir(proj) if re.match(r"^rwkv-.*\.pth$", n))


def assert_same_run(proj, reference, epochs=EPOCHS):
    """The same rwkv-*.pth files, bit for bit, and the same mini-epoch losses in train_log.txt."""
    assert weight_files(proj) == weight_files(reference)
    for name in weight_files(reference):
        ours, theirs = (torch.load(os.path.join(p, name), weights_only=True) for p in (proj, reference))
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    assert epoch_losses(proj) == epoch_losses(reference) and len(epoch_losses(reference)) == epochs


def start_run(proj, reference):
    """A new run folder holding the reference's init (the same seed writes the same one)."""
    os.makedirs(proj)
    shutil.copy(os.path.join(reference, "rwkv-init.pth"), proj)


def newest_step(proj):
    return max((s for s, _ in full_state.complete_states(str(proj))), default=0)


def partial_writes(proj):
    root = os.path.join(proj, "states")
    return [n for n in os.listdir(root) if n.startswith(".partial")] if os.path.isdir(root) else []


@pytest.fixture(scope="module")
def reference(shard_dir, tmp_path_factory):   # noqa: F811
    """The uninterrupted run: init, then every mini-epoch in one process."""
    proj = tmp_path_factory.mktemp("reference") / "run"
    for stage in (1, 3):
        subprocess.run(stream_cmd(proj, shard_dir, EPOCHS, "--train_stage", stage, "--save_every_steps", EVERY),
                       check=True, capture_output=True)
    return str(proj)


def test_sigkill_anywhere_then_resume_is_bit_identical(shard_dir, reference, tmp_path):   # noqa: F811
    """Three or more SIGKILLs of the whole process group: at random moments after a state was written, and once while
    a state is being written (its .partial folder is there after the kill, and the next run removes it)."""
    proj = str(tmp_path / "killed")
    start_run(proj, reference)
    cmd = stream_cmd(proj, shard_dir, EPOCHS, "--train_stage", 3, "--save_every_steps", EVERY)
    rng, plan, killed_in_write, outputs = random.Random(0), ["random", "write", "random"], False, []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}   # what a run printed before its kill reaches its output file
    while plan:
        kind, before = plan.pop(0), newest_step(proj)
        stale = set(partial_writes(proj))   # a write the last kill cut short: the new run deletes it first
        out_path = tmp_path / f"out{len(outputs)}.txt"
        with open(out_path, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None:
                writing = set(partial_writes(proj))
                stale &= writing
                if (writing and not stale) if kind == "write" else newest_step(proj) > before:
                    break
                time.sleep(0.001 if kind == "write" else 0.02)
            if kind == "random":
                time.sleep(rng.uniform(0, 0.5))   # anywhere in the next steps, a state write, or a mini-epoch's end
            assert proc.poll() is None, f"the run ended before its {kind} kill:\n" + open(out_path).read()[-3000:]
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        outputs.append(open(out_path).read())
        if kind == "write":
            if partial_writes(proj):
                killed_in_write = True
            else:   # the rename won the race: that kill landed just after the write; kill in a later write
                assert len(outputs) < 8, "no kill landed inside a state write"
                plan.insert(0, "write")
    assert killed_in_write and len(outputs) >= 3
    assert newest_step(proj) > EVERY   # every run after the first resumed from a state and went on

    final = subprocess.run(cmd, capture_output=True, text=True)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    logs = outputs[1:] + [final.stdout]
    assert all("resuming from the full state" in text for text in logs), [t[:300] for t in logs]
    assert any("left by a run killed while it wrote" in text for text in logs)
    assert_same_run(proj, reference)
    assert len(full_state.complete_states(proj)) == 2 and not partial_writes(proj)   # --keep_states 2


def stop_and_resume(proj, reference, argv, steps, tmp_path):
    """A run stopped after `steps` steps (tests/run_steps.py, saving a full state there), then resumed by train.py
    to the end; train.py's output."""
    start_run(proj, reference)
    run("tests/run_steps.py", "--steps", steps, "--out", tmp_path / "stopped.json", "--", *argv, timeout=600)
    assert newest_step(proj) == steps
    return run("train.py", *argv, timeout=600).stdout


def test_binidx_resume_inside_a_mini_epoch(binidx_data, tmp_path):   # noqa: F811
    """The magic-prime order continues at the exact sample: a run stopped after step 5 of an 8-step mini-epoch and
    resumed (into the next mini-epoch) ends with the weights of one that ran straight through."""
    flags = ["--epoch_save", 1, "--save_every_steps", 5, "--my_exit_tokens", 12 * 5040 * 16, "--threads", 1]
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    for stage in (1, 3):
        run("train.py", *binidx_argv(straight, binidx_data, *flags, "--train_stage", stage), timeout=600)
    output = stop_and_resume(stopped, straight, binidx_argv(stopped, binidx_data, *flags), 5, tmp_path)
    assert "resuming from the full state" in output and "mini-epoch 0, its step 5 is next" in output
    assert_same_run(stopped, straight, epochs=1)


def test_two_ranks_resume_their_own_stream_positions(shard_dir, tmp_path):   # noqa: F811
    """DDP on two gloo processes: each rank saves and restores its own readers' positions, loss sum and RNG; stopped
    inside mini-epoch 1 and resumed, the run ends as one that ran straight through."""
    def flags(proj, *extra):
        return stream_cmd(proj, shard_dir, 3, "--devices", 2, "--strategy", "ddp", "--save_every_steps", 6, *extra)[2:]
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    for stage in (1, 3):
        run("train.py", *flags(straight, "--train_stage", stage), timeout=600)
    output = stop_and_resume(stopped, straight, flags(stopped, "--train_stage", 3), 6, tmp_path)
    assert "mini-epoch 1, its step 2 is next" in output
    newest = full_state.complete_states(stopped)[0][1]
    assert sorted(n for n in os.listdir(newest) if n.startswith("rank")) == ["rank0.pt", "rank1.pt"]
    assert_same_run(stopped, straight, epochs=3)


def test_a_cut_short_or_foreign_state_is_skipped_for_the_one_before(shard_dir, reference, tmp_path, capsys):  # noqa: F811
    """A state whose weights file was cut short, a folder that only looks like a state, and a rank file replaced by
    other bytes of its size are each named and skipped; the resume takes the newest one that checks out, and with
    none left the newest rwkv-<n>.pth."""
    import train
    proj = str(tmp_path / "run")
    shutil.copytree(reference, proj)
    for name in ("rwkv-3.pth", "rwkv-final.pth"):   # as if killed in the last mini-epoch: the states are newest
        os.remove(os.path.join(proj, name))
    flags = train.parse_flags(stream_cmd(proj, shard_dir, EPOCHS, "--train_stage", 3)[2:])
    (newest, newest_folder), (previous, previous_folder) = full_state.complete_states(proj)
    weights = os.path.join(newest_folder, "weights.pt")
    os.truncate(weights, os.path.getsize(weights) // 2)
    foreign = os.path.join(proj, "states", "step-999")
    os.makedirs(foreign)
    shutil.copy(os.path.join(proj, "rwkv-2.pth"), os.path.join(foreign, "weights.pt"))
    start = train.start_point(flags)
    out = capsys.readouterr().out
    assert f"skipping the full state {foreign}: {foreign}/manifest.json is missing" in out
    assert f"skipping the full state {newest_folder}: {weights} has" in out and "cut short" in out
    assert start.resume.folder == previous_folder and start.resume.manifest["step"] == previous

    rank_part = os.path.join(previous_folder, "rank0.pt")
    with open(rank_part, "r+b") as f:
        f.write(os.urandom(os.path.getsize(rank_part)))
    start = train.start_point(flags)
    assert f"skipping the full state {previous_folder}: {rank_part} is not a torch.save archive" in capsys.readouterr().out
    assert start.resume is None and (start.path, start.resumed_epoch) == (os.path.join(proj, "rwkv-2.pth"), 2)


def test_a_state_of_other_flags_or_another_gpu_count_is_refused(shard_dir, reference, tmp_path, monkeypatch,  # noqa: F811
                                                                 capsys):
    """Resuming a state needs the flags that decide the next step; the refusal names them and --resume_state 0. A
    later horizon continues the state, and the run says that the schedule changed."""
    from tests.test_faults import run_main
    proj = str(tmp_path / "run")
    shutil.copytree(reference, proj)
    error = run_main(stream_cmd(proj, shard_dir, EPOCHS, "--train_stage", 3, "--devices", 2, "--strategy",
                                "ddp", "--micro_bsz", 1)[2:], monkeypatch)
    assert f"the full state {full_state.complete_states(proj)[0][1]} was saved by a run with" in error
    assert "--micro_bsz 2 (now 1), --devices 1 (now 2), --strategy auto (now ddp)" in error
    assert "--resume_state 0" in error
    with pytest.raises(AssertionError, match="a model was built"):   # run_main's stand-in: past every check
        run_main(stream_cmd(proj, shard_dir, EPOCHS + 2, "--train_stage", 3)[2:], monkeypatch)
    assert f"continuing the full state {full_state.complete_states(proj)[0][1]} on another LR schedule: " \
        f"--epoch_count {EPOCHS + 2} (was {EPOCHS})" in capsys.readouterr().out


def test_rng_states_come_back_from_a_rank_file(tmp_path):
    """torch's, numpy's and Python's generators continue from a rank file (read with weights_only, as a resume reads
    it) as they would have without the save."""
    import numpy as np
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    full_state.write_rank_part(str(tmp_path), 0, {"rng": full_state.rng_states()})
    expected = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(7), np.random.seed(8), random.seed(9)
    full_state.restore_rng_states(full_state.load_part(str(tmp_path), full_state.rank_file(0))["rng"])
    got = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
