"""The training loop around the model: the LR schedule set before each step (src/train/schedule.py), the logs and the
checkpoints (docs/RECIPE.md section 8)."""
import datetime
import json
import math
import os
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar

from src.config import Config
from src.train import full_state
from src.train.checkpoint import TRAIN_LOG, numbered_checkpoints, save_atomic
from src.train.schedule import lr_schedule, saves_checkpoint


class TrainingDiverged(RuntimeError):
    pass


def checkpoint_state_dict(trainer, pl_module):
    """The model's weights as a plain state dict (gathered from every rank under ZeRO-3)."""
    model = pl_module.model
    if getattr(trainer.strategy, "zero_stage_3", False):
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def copy_to_host(values):
    """Start copying a small CUDA tensor to pinned host memory; returns (host tensor, event to wait on)."""
    if not values.is_cuda:
        return values, None
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


class ProgressBar(TQDMProgressBar):
    """Lightning's bar showing TrainCallback's host-side values: self.log would copy each value to the GPU and wait
    for it there, so that every step would end with the host waiting for the GPU to finish it."""

    def __init__(self, train_callback):
        super().__init__()
        self.train_callback = train_callback

    def get_metrics(self, trainer, pl_module):
        return {**super().get_metrics(trainer, pl_module), **self.train_callback.shown}


class TrainCallback(pl.Callback):
    """Sets lr and weight decay before every step, keeps the mini-epoch loss, writes train_log.txt, wandb, the
    checkpoints and the full states (src/train/full_state.py), continues from one (`resume`), and stops the run when
    the schedule's progress reaches 1."""

    def __init__(self, cfg: Config, dataset, val_tokens=None, resume: full_state.Resume = None):
        self.cfg, self.dataset, self.val_tokens, self.resume = cfg, dataset, val_tokens, resume
        self.finished = False
        self.log_file = None
        self.wandb = None
        # (losses and the save clock's vote on the host, their copy's CUDA event or None, steps done, mini-epoch)
        self.pending = []
        self.shown = {}     # what the progress bar shows: lr, the mini-epoch's running mean loss, Kt/s
        self.positions = {}   # the stream's reader positions after the last batch each reader served
        self.state_due, self.saved_at = False, cfg.first_step   # a full state is due; the step of the last one
        self.rank_part = None   # this rank's part of the resumed state, until its first step has started

    def setup(self, trainer, pl_module, stage):
        # before the loader measures the first mini-epoch: it starts at the resumed step
        if self.resume is not None:
            self.rank_part = self.resume.rank_parts[trainer.global_rank]
            self.positions = self.rank_part["stream_positions"]
            self.dataset.resume_at(self.cfg.optim.step_begin, dict(self.positions))

    def on_train_start(self, trainer, pl_module):
        if self.resume is not None:
            full_state.restore_optimizer(trainer, self.resume.folder, self.resume.weights)
            self.resume.weights = self.resume.rank_parts = None   # the model, optimizer and callback hold copies
        self.last_save_time = time.time()
        if trainer.is_global_zero:
            self.log_file = open(os.path.join(self.cfg.run.proj_dir, TRAIN_LOG), "a")
            self.log_file.write(f"NEW RUN {datetime.datetime.now().strftime('%Y-%m-%d-%H-%M-%S')}\n{self.cfg.values()}\n")
            self.log_file.flush()
            if self.cfg.run.wandb:
                import wandb
                wandb.init(project=self.cfg.run.wandb, config=self.cfg.values(), save_code=False,
                           name=f"{os.path.basename(os.path.abspath(self.cfg.run.proj_dir))} {datetime.datetime.now():%Y-%m-%d %H:%M}")
                self.wandb = wandb

    def on_train_epoch_start(self, trainer, pl_module):
        # the sampler's position: which mini-epoch, and which share of it this rank reads
        self.dataset.real_epoch = self.cfg.optim.epoch_begin + trainer.current_epoch
        self.dataset.global_rank = trainer.global_rank
        self.dataset.world_size = trainer.world_size
        self.loss_sum = torch.zeros((), device=pl_module.device, dtype=torch.float64)
        self.loss_count = 0
        if self.rank_part is not None:   # the resumed mini-epoch's loss so far
            self.loss_sum += self.rank_part["loss_sum"]
            self.loss_count = self.rank_part["loss_count"]
        self.epoch_start_time = self.step_time = time.time()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.rank_part is not None:   # after the loader has drawn its seed, as the interrupted run's had
            full_state.restore_rng_states(self.rank_part["rng"])
            self.rank_part = None
        lr, progress = lr_schedule(self.cfg, trainer.global_step)
        if progress >= 1:
            self.finish(trainer, pl_module)
            return
        for group in trainer.optimizers[0].param_groups:
            group["lr"] = lr * group["my_lr_scale"]
            if group["weight_decay"] > 0:
                group["weight_decay"] = self.cfg.optim.weight_decay
        self.lr = lr

    def finish(self, trainer, pl_module):
        """Progress reached 1: write rwkv-final.pth and stop before this step."""
        self.report_losses()
        state_dict = checkpoint_state_dict(trainer, pl_module)
        if trainer.is_global_zero:
            save_atomic(state_dict, os.path.join(self.cfg.run.proj_dir, "rwkv-final.pth"))
            print(f"\nEnd of training: the schedule reached its horizon at step "
                  f"{self.cfg.first_step + trainer.global_step}; wrote rwkv-final.pth")
        self.finished = True
        trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"].detach()
        self.loss_sum += loss
        self.loss_count += 1
        if len(batch) > 2:   # the stream's reader positions (src/data/dataset.py): the last is after this batch
            position = json.loads(batch[2][-1])
            self.positions[position.pop("reader")] = position
        minutes = self.cfg.run.save_every_minutes
        clock_due = minutes > 0 and time.time() - self.last_save_time >= 60 * minutes
        # the clock's vote travels with the losses: every rank reads the same sum at the same step
        values = torch.stack((loss.float(), (self.loss_sum / self.loss_count).float(), loss.new_full((), clock_due)))
        if trainer.world_size > 1:
            # the logged losses are the means over ranks; queued on the GPU, the host does not wait for it
            # (Lightning's strategy.reduce would add a barrier that does)
            torch.distributed.all_reduce(values)
            values /= trainer.world_size
        self.pending.append((*copy_to_host(values), trainer.global_step, self.cfg.optim.epoch_begin + trainer.current_epoch))
        # on CUDA the host reads each loss one step late, so it never waits for the step it has just queued
        self.report_losses(keep=1 if loss.is_cuda else 0)
        step = self.cfg.first_step + trainer.global_step
        every = self.cfg.run.save_every_steps
        self.state_due |= every > 0 and step % every == 0
        step_in_epoch = step - (self.cfg.optim.epoch_begin + trainer.current_epoch) * self.cfg.data.epoch_steps
        if self.state_due and step_in_epoch < self.cfg.data.epoch_steps:   # at a mini-epoch's end: after its log
            self.save_state(trainer, pl_module, step)

    def save_state(self, trainer, pl_module, step):
        """A full state after `step` steps (all ranks); at a mini-epoch's end it holds no stream position and no
        loss sum: the next mini-epoch starts from the stream's saved ends."""
        self.report_losses()   # no state from weights after a NaN loss
        start = time.time()
        cfg, proj_dir = self.cfg, self.cfg.run.proj_dir
        if trainer.is_global_zero:
            full_state.start_writing(proj_dir, step)
        trainer.strategy.barrier()
        folder = full_state.partial_folder(proj_dir, step)
        state_dict = checkpoint_state_dict(trainer, pl_module)
        if cfg.run.uses_deepspeed:
            full_state.write_deepspeed(folder, trainer.strategy.deepspeed_engine)
        if trainer.is_global_zero:
            full_state.write_weights(folder, state_dict, None if cfg.run.uses_deepspeed else trainer.optimizers[0],
                                     trainer.precision_plugin.state_dict())
        del state_dict
        inside = step % cfg.data.epoch_steps > 0
        full_state.write_rank_part(folder, trainer.global_rank, {
            "loss_sum": self.loss_sum.item() if inside else 0.0, "loss_count": self.loss_count if inside else 0,
            "stream_positions": self.positions if inside else {}, "rng": full_state.rng_states()})
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            final = full_state.finish_writing(proj_dir, step, full_state.manifest(cfg, step), cfg.run.keep_states)
            print(f"\nwrote the full state {final} in {time.time() - start:.1f} s", flush=True)
        self.state_due, self.saved_at, self.last_save_time = False, step, time.time()

    def report_losses(self, keep=0):
        """Check the queued step losses but the last `keep`: stop on NaN; the progress bar's values and wandb; a full
        state is due when the clock voted for it after the last one."""
        while len(self.pending) > keep:
            values, ready, steps_done, epoch = self.pending.pop(0)
            if ready is not None:
                ready.synchronize()
            loss_value, mean_loss, clock_due = values.tolist()
            self.state_due |= clock_due > 0 and self.cfg.first_step + steps_done > self.saved_at
            if not math.isfinite(loss_value):
                saved = numbered_checkpoints(self.cfg.run.proj_dir)
                raise TrainingDiverged(
                    f"loss became {loss_value} at step {steps_done - 1} (mini-epoch {epoch}); no checkpoint was "
                    f"written from these weights. The last good checkpoint is {saved[0][1] if saved else 'none'}. "
                    f"Lower --lr_init or check the data, then resume.")
            now = time.time()
            kt_s = self.cfg.tokens_per_step / max(now - self.step_time, 1e-9) / 1000
            self.step_time = now
            self.shown = {"lr": self.lr, "loss": mean_loss, "Kt/s": kt_s}
            if self.wandb is not None:
                real_step = self.cfg.first_step + steps_done
                self.wandb.log({"loss": loss_value, "lr": self.lr, "wd": self.cfg.optim.weight_decay, "kt/s": kt_s,
                                "Gtokens": real_step * self.cfg.tokens_per_step / 1e9}, step=real_step)

    def on_train_epoch_end(self, trainer, pl_module):
        e = trainer.current_epoch
        epoch = self.cfg.optim.epoch_begin + e
        if self.finished or self.cfg.first_step + trainer.global_step < (epoch + 1) * self.cfg.data.epoch_steps:
            return   # the run ended inside the mini-epoch (its horizon, or a step limit): no mini-epoch to log
        self.report_losses()   # no checkpoint from weights after a NaN loss
        mean_loss = trainer.strategy.reduce(self.loss_sum / self.loss_count, reduce_op="mean").item()
        if saves_checkpoint(self.cfg, epoch):
            state_dict = checkpoint_state_dict(trainer, pl_module)
            if trainer.is_global_zero:
                save_atomic(state_dict, os.path.join(self.cfg.run.proj_dir, f"rwkv-{epoch}.pth"))
            # a full state with it, so that the newest state is never older than the newest weights file
            self.state_due |= self.cfg.run.save_every_steps > 0 or self.cfg.run.save_every_minutes > 0
        val = self.validate(trainer, pl_module) if self.val_tokens is not None else None
        if trainer.is_global_zero:
            self.log_file.write(f"{epoch} {mean_loss:.6f} {math.exp(mean_loss):.4f} {self.lr:.8f} "
                                f"{datetime.datetime.now()} {e}\n")
            if val is not None:
                self.log_file.write(f"val {epoch} {val:.6f} {math.exp(val):.4f}\n")
                print(f"\nmini-epoch {epoch}: validation loss {val:.4f}")
            self.log_file.flush()
            if self.wandb is not None:
                self.wandb.log({"epoch_loss": mean_loss, "epoch": epoch, **({"val_loss": val} if val is not None else {})})
        if self.resume is not None and e == 0:   # the next mini-epoch starts at its beginning (the stream: from its
            self.dataset.resume_at(0, {})          # saved ends)
        self.positions = {}
        if self.state_due:
            self.save_state(trainer, pl_module, (epoch + 1) * self.cfg.data.epoch_steps)

    def validate(self, trainer, pl_module):
        """Validation loss on --val_data: each rank scores its share of the windows, then the shares add up."""
        from src.train.evaluate import val_loss
        part = val_loss(pl_module.model, self.val_tokens, self.cfg.data.ctx_len, batch_size=self.cfg.data.micro_bsz,
                        rank=trainer.global_rank, world_size=trainer.world_size)
        sums = torch.tensor([part["loss_sum"], part["tokens"]], dtype=torch.float64, device=pl_module.device)
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
        return (sums[0] / sums[1]).item()

    def on_train_end(self, trainer, pl_module):
        self.report_losses()
        if self.log_file is not None:
            self.log_file.close()
        if self.wandb is not None:
            self.wandb.finish()
