"""train.py end to end on CPU (docs/RECIPE.md sections 6 and 8) and the LR schedule against the spec's formula."""
import itertools
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from src.config import ConfigError, build_config, check_schedule
from src.train.evaluate import load_token_stream, val_loss
from src.train.callbacks import lr_schedule, saves_checkpoint
from tools.generate import load_model
from tests.conftest import CTX, VOCAB
from tests.test_init import check_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_LINE = re.compile(r"^(\d+) (\d+\.\d{6}) (\d+\.\d{4}) (\d+\.\d{8}) \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ (\d+)$")


def spec_lr(step, epoch_begin, epoch_steps, ctx_len, real_bsz, warmup, exit_tokens, epoch_count, lr_init, lr_final):
    """docs/RECIPE.md section 6, transcribed line by line."""
    real_step = step + epoch_begin * epoch_steps
    tokens = lambda s: s * ctx_len * real_bsz
    horizon = exit_tokens if exit_tokens > 0 else epoch_count * epoch_steps * real_bsz * ctx_len
    progress = min(1, max(0, (tokens(real_step) - tokens(warmup)) / (horizon - tokens(warmup))))
    f = lr_final / lr_init
    lr = lr_init * ((0.5 + f / 2) + (0.5 - f / 2) * math.cos(math.pi * progress))
    if step < warmup:
        lr *= 0.01 + 0.99 * step / warmup
    return lr, progress


@pytest.mark.parametrize("exit_tokens,epoch_begin", [(1498226207, 0), (1498226207, 7), (0, 0), (0, 3)])
def test_lr_schedule_matches_spec(exit_tokens, epoch_begin):
    # MiniPile's magic prime on one GPU: 40320 // 16 = 2520 steps per mini-epoch, 2926181 // 40320 = 72 mini-epochs
    cfg = build_config(dict(ctx_len=512, micro_bsz=16, data_type="binidx", magic_prime=2926181, warmup_steps=10,
                            my_exit_tokens=exit_tokens, lr_init=6e-4, lr_final=6e-5),
                       resumed_epoch=epoch_begin - 1 if epoch_begin else None)
    assert (cfg.data.epoch_steps, cfg.optim.epoch_count, cfg.optim.epoch_begin) == (2520, 72, epoch_begin)
    for step in (0, 1, 5, 9, 10, 11, 1000, 90000, 181439, 182888, 182889, 200000):
        want = spec_lr(step, epoch_begin, 2520, 512, 16, 10, exit_tokens, 72, 6e-4, 6e-5)
        got = lr_schedule(cfg, step)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15), step
    if epoch_begin == 0:
        assert lr_schedule(cfg, 0)[0] == pytest.approx(6e-4 * 0.01)   # warmup starts at 1% of lr_init
    if exit_tokens and epoch_begin == 0:
        # the MiniPile horizon: progress reaches 1 at 1498226207 / (512 * 16) = 182888.9 steps
        assert lr_schedule(cfg, 182888)[1] < 1 <= lr_schedule(cfg, 182889)[1]
    assert lr_schedule(cfg, 10**7)[0] == pytest.approx(6e-5)


def test_schedule_check_refuses_exactly_the_runs_that_would_not_train_past_their_warmup():
    """check_schedule against what lr_schedule does: TrainCallback stops before the first step at progress 1. A
    warmup as long as the run divides by zero; a longer one ends the run at step 0; a resume past the horizon with a
    long warmup never ends."""
    def trained_steps(cfg, limit=100):
        step = 0
        while lr_schedule(cfg, step)[1] < 1:
            step += 1
            if step > limit:
                return None
        return step

    refused = 0
    for warmup, epoch_begin, exit_tokens in itertools.product(range(12), range(4), (0, 5 * 32, 5 * 32 + 1, 9 * 32)):
        cfg = build_config(dict(data_type="jsonl", ctx_len=16, micro_bsz=2, epoch_steps=4, epoch_count=2,
                                warmup_steps=warmup, epoch_begin=epoch_begin, my_exit_tokens=exit_tokens))
        try:
            steps = trained_steps(cfg)
            trains_past_warmup = steps is not None and steps > warmup
        except ZeroDivisionError:
            trains_past_warmup = False
        try:
            check_schedule(cfg)
        except ConfigError:
            refused += 1
            assert not trains_past_warmup, (warmup, epoch_begin, exit_tokens)
        else:
            assert trains_past_warmup, (warmup, epoch_begin, exit_tokens)
    assert 0 < refused < 12 * 4 * 4


BSZ = 5040   # 40320 / 5040 = 8 steps per mini-epoch


def train(proj_dir, data, *extra, check=True):
    prefix, magic_prime = data
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--proj_dir", str(proj_dir), "--data_file", prefix,
           "--data_type", "binidx", "--vocab_size", str(VOCAB), "--ctx_len", str(CTX), "--n_layer", "1",
           "--n_embd", "32", "--head_size", "8", "--micro_bsz", str(BSZ), "--magic_prime", str(magic_prime),
           "--lr_init", "1e-2", "--lr_final", "3e-3", "--warmup_steps", "2", "--epoch_save", "1",
           "--accelerator", "cpu", "--devices", "1", "--strategy", "auto", "--enable_progress_bar", "False",
           *map(str, extra)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def log_lines(proj_dir):
    lines = open(os.path.join(proj_dir, "train_log.txt")).read().splitlines()
    return [LOG_LINE.match(line).groups() for line in lines if LOG_LINE.match(line)]


EPOCH_TOKENS = 40320 * CTX


def test_checkpoint_rule_saves_the_last_mini_epoch_after_a_resume():
    flags = dict(data_type="jsonl", epoch_count=3, epoch_save=5)
    cfg = build_config(flags)
    assert [saves_checkpoint(cfg, e) for e in range(3)] == [True, False, True]
    cfg = build_config(flags, resumed_epoch=0)   # after rwkv-0: mini-epochs 1 (the run's first) and 2 (the last)
    assert [saves_checkpoint(cfg, e) for e in (1, 2)] == [True, True]
    assert all(saves_checkpoint(build_config({**flags, "epoch_save": 1}, resumed_epoch=0), e) for e in (1, 2))


def test_config_is_built_once_with_its_derived_values_and_frozen():
    """build_config derives what the reference derives from the flags (docs/RECIPE.md sections 6-8), and nothing
    changes the result afterwards; bad flags are refused there, naming the flag."""
    import dataclasses
    flags = dict(data_type="binidx", magic_prime=2926181, micro_bsz=8, devices=2, strategy="deepspeed_stage_3",
                 warmup_steps=-1, n_embd=768, dim_ffn=0)
    new, resumed = build_config(flags), build_config(flags, resumed_epoch=4)
    assert new.real_bsz == 16 and new.data.epoch_steps == 2520 and new.optim.epoch_count == 72
    assert (new.optim.epoch_begin, new.optim.warmup_steps) == (0, 0)
    assert (resumed.optim.epoch_begin, resumed.optim.warmup_steps) == (5, 10)
    assert build_config(flags, resumed_epoch=-1).optim.warmup_steps == 0   # from rwkv-init.pth: no warmup added
    assert new.model.dim_ffn == 3072 and new.optim.optimizer == "fused" and new.perf.cuda_graph == 0
    assert build_config({**flags, "strategy": "deepspeed_stage_2_offload"}).optim.optimizer == "cpu_adam"
    assert build_config({**flags, "data_type": "jsonl", "epoch_steps": 7}).data.epoch_steps == 7
    for section in (new.model, new.data, new.optim, new.perf, new.run):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(section, dataclasses.fields(section)[0].name, 0)
    with pytest.raises(ConfigError, match="--ctx_len 100 must be a positive multiple of 16"):
        build_config({**flags, "ctx_len": 100})
    with pytest.raises(ConfigError, match="unknown flags"):
        build_config({"ctx_lenn": 512})


def test_train_stage1_then_resume_and_fallback(byte_data, tmp_path):
    proj = tmp_path / "run"
    # stage 1 with the reference prepare flags (deepspeed strategy on CPU, bf16): writes the init, no Trainer
    result = train(proj, byte_data, "--train_stage", "1", "--strategy", "deepspeed_stage_2", "--precision", "bf16")
    assert "rwkv-init.pth" in result.stdout
    init = torch.load(proj / "rwkv-init.pth", weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in init.values())
    check_state_dict(init, 1, 32, VOCAB)

    # one full mini-epoch, then the schedule ends at the first step of the next; the progress bar shows the
    # running loss, the lr and the throughput
    result = train(proj, byte_data, "--train_stage", "3", "--precision", "32", "--my_exit_tokens", EPOCH_TOKENS,
                   "--enable_progress_bar", "True")
    bar = result.stdout + result.stderr
    for value in (r"loss=\d\.\d+", r"lr=0\.0\d+", r"Kt/s=\d"):
        assert re.search(r"8/8 \[[^\n]*" + value, bar), bar[-2000:]
    # rwkv-0.pth came with a full state (tests/test_resume.py); the resumes below take the weights-only path
    assert sorted(os.listdir(proj)) == ["rwkv-0.pth", "rwkv-final.pth", "rwkv-init.pth", "states", "train_log.txt"]
    (epoch, loss0, ppl, lr, run_epoch), = log_lines(proj)
    assert (epoch, run_epoch) == ("0", "0")
    assert float(ppl) == pytest.approx(math.exp(float(loss0)), rel=1e-4)
    assert float(loss0) < math.log(VOCAB) - 0.5   # it learned something from the bytes
    rwkv0 = torch.load(proj / "rwkv-0.pth", weights_only=True)
    assert rwkv0.keys() == init.keys() and not torch.equal(rwkv0["head.weight"].bfloat16(), init["head.weight"])

    # the same command with a later horizon resumes from rwkv-0.pth and trains mini-epoch 1, validating after it
    result = train(proj, byte_data, "--train_stage", "3", "--precision", "32", "--my_exit_tokens", 2 * EPOCH_TOKENS,
                   "--val_data", byte_data[0], "--val_tokens", 4000, "--resume_state", 0)
    assert "resuming from" in result.stdout and "rwkv-0.pth" in result.stdout
    lines = log_lines(proj)
    assert [(e, r) for e, _, _, _, r in lines] == [("0", "0"), ("1", "0")]
    assert float(lines[1][1]) < float(loss0)
    val_line = [line.split() for line in open(proj / "train_log.txt") if line.startswith("val ")]
    assert [v[:2] for v in val_line] == [["val", "1"]]
    model = load_model(str(proj / "rwkv-1.pth"), "cpu")
    direct = val_loss(model, load_token_stream(byte_data[0], max_tokens=4000), CTX)
    assert float(val_line[0][2]) == pytest.approx(direct["loss"], abs=2e-6)

    # a truncated newest checkpoint: the run says so, falls back to rwkv-0.pth and trains mini-epoch 1 again
    with open(proj / "rwkv-1.pth", "r+b") as f:
        f.truncate(os.path.getsize(proj / "rwkv-1.pth") // 2)
    result = train(proj, byte_data, "--train_stage", "3", "--precision", "32", "--my_exit_tokens", 2 * EPOCH_TOKENS,
                   "--resume_state", 0)
    assert "rwkv-1.pth is cut short" in result.stdout + result.stderr
    assert "falling back" in result.stdout + result.stderr
    assert f"resuming from {proj / 'rwkv-0.pth'}: mini-epoch 1 is next" in result.stdout
    assert [(e, r) for e, _, _, _, r in log_lines(proj)][-1] == ("1", "0")
    torch.load(proj / "rwkv-1.pth", weights_only=True)   # rewritten whole


def test_wandb_logs_offline(tmp_path):
    """--wandb <project> logs loss, lr, wd, Gtokens and kt/s per step (offline here: no network)."""
    shard = tmp_path / "data.jsonl"
    shard.write_text("".join('{"text": "%s"}\n' % (f"document {i} " * 40) for i in range(40)))
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    common = ["--proj_dir", str(tmp_path / "run"), "--data_type", "jsonl", "--data_file", str(shard),
              "--ctx_len", "16", "--micro_bsz", "2", "--epoch_steps", "3", "--epoch_count", "1", "--n_layer", "1",
              "--n_embd", "32", "--head_size", "8", "--accelerator", "cpu", "--strategy", "auto",
              "--precision", "32", "--enable_progress_bar", "False"]
    for stage in ("1", "3"):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *common, "--train_stage", stage,
                                 "--wandb", "rwkv-test"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()
    for key in (b"loss", b"lr", b"wd", b"Gtokens", b"kt/s", b"epoch_loss"):
        assert key in data, key


def test_deepspeed_never_waits_for_the_gpu_to_time_a_step(monkeypatch):
    """train.py turns DeepSpeed's throughput timer off: by default it synchronizes the device at every step's start
    and end, which keeps the host from queuing the next step while the GPU runs this one."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils.config import get_timers_config
    from deepspeed.utils.timer import ThroughputTimer

    import train as train_py
    syncs = []
    monkeypatch.setattr(get_accelerator(), "synchronize", lambda *args: syncs.append(1))

    def syncs_in_steps(ds_config, steps=5):
        syncs.clear()
        timer = ThroughputTimer(get_timers_config(ds_config), batch_size=16)
        for _ in range(steps):
            timer.start()
            timer.stop(global_step=True)
        return len(syncs)

    cfg = build_config(dict(proj_dir="unused", accelerator="cpu", strategy="deepspeed_stage_2", precision="bf16"))
    assert syncs_in_steps({}) > 0   # DeepSpeed's default
    assert syncs_in_steps(train_py.build_trainer(cfg, []).strategy.config) == 0
