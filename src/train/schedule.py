"""The LR schedule (docs/RECIPE.md section 6) and when a mini-epoch saves a checkpoint (section 8)."""
import math

from src.config import Config


def lr_schedule(cfg: Config, step_in_run: int):
    """(lr, progress) before step `step_in_run` of this run."""
    o = cfg.optim
    real_step = step_in_run + o.epoch_begin * cfg.data.epoch_steps
    warmup_tokens = o.warmup_steps * cfg.tokens_per_step
    progress = (real_step * cfg.tokens_per_step - warmup_tokens) / (cfg.horizon_tokens - warmup_tokens)
    progress = min(1.0, max(0.0, progress))
    f = o.lr_final / o.lr_init
    lr = o.lr_init * ((0.5 + f / 2) + (0.5 - f / 2) * math.cos(math.pi * progress))
    if step_in_run < o.warmup_steps:
        lr *= 0.01 + 0.99 * step_in_run / o.warmup_steps
    return lr, progress


def saves_checkpoint(cfg: Config, run_epoch: int):
    """docs/RECIPE.md section 8: rwkv-<epoch_begin + e>.pth after this run's mini-epoch e when e % epoch_save == 0
    or it is the recipe's last mini-epoch (also in a resumed run)."""
    return run_epoch % cfg.run.epoch_save == 0 or cfg.optim.epoch_begin + run_epoch == cfg.optim.epoch_count - 1
