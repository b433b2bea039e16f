"""The LR schedule (docs/RECIPE.md section 6) and when a mini-epoch saves a checkpoint (section 8)."""
import math

from src.config import Config


def lr_schedule(cfg: Config, step_in_run: int):
    """(lr, progress) before step `step_in_run` of this run."""
    o = cfg.optim
    real_step = cfg.first_step + step_in_run
    warmup_step = real_step - cfg.warmup_start   # a full-state resume continues the interrupted run's warmup
    warmup_tokens = o.warmup_steps * cfg.tokens_per_step
    progress = (real_step * cfg.tokens_per_step - warmup_tokens) / (cfg.horizon_tokens - warmup_tokens)
    progress = min(1.0, max(0.0, progress))
    f = o.lr_final / o.lr_init
    lr = o.lr_init * ((0.5 + f / 2) + (0.5 - f / 2) * math.cos(math.pi * progress))
    if warmup_step < o.warmup_steps:
        lr *= 0.01 + 0.99 * warmup_step / o.warmup_steps
    return lr, progress


def saves_checkpoint(cfg: Config, epoch: int):
    """docs/RECIPE.md section 8: rwkv-<epoch>.pth after mini-epoch `epoch` when it is a multiple of epoch_save from
    the run's first mini-epoch (the interrupted run's after a full-state resume), or the recipe's last one."""
    return (epoch - cfg.optim.run_epoch_begin) % cfg.run.epoch_save == 0 or epoch == cfg.optim.epoch_count - 1
