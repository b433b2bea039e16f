"""Full-state checkpoints (docs/RECIPE.md section 8): what a run needs to continue at its exact next step.

proj_dir/states/step-<S>/ (S: steps trained since the schedule's start) holds
  manifest.json   written last: the format, the position, the run's configuration, every file's size
  weights.pt      rank 0: the model's weights, and the optimizer's and the precision plugin's state dicts; under
                  DeepSpeed the weights only, and deepspeed/: DeepSpeed's own checkpoint (each rank its optimizer shard)
  rank<r>.pt      each rank's own part: its stream positions, its mini-epoch loss sum, its RNG states
A state is written into states/.partial-step-<S>/ and renamed when complete, so a kill mid-write never leaves a folder
that looks complete; states beyond --keep_states are renamed .removing-step-<S> before they are deleted.
rwkv-<n>.pth stays the distributable weights file; a state is only for resuming.
"""
import json
import os
import random
import re
import shutil
import zipfile

import numpy as np
import torch

from src.config import Config, ResumedState
from src.train.checkpoint import STATES_DIR, write_synced

FORMAT = "rwkv7-full-state-1"
MANIFEST = "manifest.json"
WEIGHTS = "weights.pt"
DEEPSPEED_TAG = "deepspeed"
STATE_NAME = re.compile(r"^step-(\d+)$")
LEFTOVER = re.compile(r"^\.(partial|removing)-step-\d+$")
# flags that must equal the interrupted run's for its state to continue it: they decide what the next step computes;
# the schedule's may change (a run extended to a later horizon), with a note; the others (performance, logging,
# checkpoint cadence) freely
SAME_FLAGS = ("n_layer", "n_embd", "vocab_size", "head_size", "dim_att", "dim_ffn", "data_file", "data_type", "ctx_len",
              "micro_bsz", "epoch_steps", "magic_prime", "beta1", "beta2", "adam_eps", "weight_decay", "grad_clip",
              "layerwise_lr", "random_seed", "precision", "devices", "num_nodes", "strategy")
SCHEDULE_FLAGS = ("lr_init", "lr_final", "epoch_count", "my_exit_tokens")


class StateError(RuntimeError):
    pass


def states_dir(proj_dir):
    return os.path.join(proj_dir, STATES_DIR)


def rank_file(rank):
    return f"rank{rank}.pt"


# ---------------------------------------------------------------------------------------------
# Finding the newest complete state


def complete_states(proj_dir):
    """[(S, folder)] of the states that were renamed complete, newest first."""
    root = states_dir(proj_dir)
    found = [(int(m.group(1)), os.path.join(root, name))
             for name in (os.listdir(root) if os.path.isdir(root) else []) if (m := STATE_NAME.match(name))]
    return sorted(found, reverse=True)


def remove_leftovers(proj_dir, log=print):
    """Delete what a killed run left: a state it was writing, or one it was removing."""
    root = states_dir(proj_dir)
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if LEFTOVER.match(name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            log(f"removed {os.path.join(root, name)}, left by a run killed while it wrote or removed a full state")


def read_manifest(folder):
    """The manifest of a complete state; StateError naming the file if it, or a file it lists, is missing, cut short
    or not what a state holds."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise StateError(f"{path} is missing or not JSON ({type(e).__name__})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StateError(f"{path} is not a full-state manifest of this recipe (format {FORMAT})")
    for name, size in manifest["files"].items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise StateError(f"{file} is missing")
        if os.path.getsize(file) != size:
            raise StateError(f"{file} has {os.path.getsize(file)} bytes, its manifest says {size}: cut short or "
                             "replaced")
        if file.endswith(".pt") and not zipfile.is_zipfile(file):
            raise StateError(f"{file} is not a torch.save archive")
    return manifest


def checked_states(proj_dir, log=print):
    """Yield (folder, manifest) of the complete states whose manifests and files check out, newest first; a state
    that does not is named in the log and skipped."""
    for _, folder in complete_states(proj_dir):
        try:
            yield folder, read_manifest(folder)
        except StateError as e:
            log(f"WARNING: skipping the full state {folder}: {e}")


def load_part(folder, name):
    """A state's torch file (tensors and plain values only); StateError naming it if it cannot be read."""
    path = os.path.join(folder, name)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torch raises several types for damaged archives
        raise StateError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:200]})") from e


def check_state_fits(folder, manifest, values, log=print):
    """StateError unless this run's configuration (`values`) is the interrupted run's where it decides what the next
    step computes; a changed schedule is allowed, and logged."""
    saved = manifest["config"]
    changed = [f"--{k} {saved[k]} (now {values[k]})" for k in SAME_FLAGS if saved[k] != values[k]]
    if changed:
        raise StateError(f"the full state {folder} was saved by a run with " + ", ".join(changed) + "; run with "
                         "its flags to continue it exactly, or pass --resume_state 0 to resume from the newest "
                         "rwkv-<n>.pth instead (weights only: Adam restarts and the warmup runs again)")
    rescheduled = [f"--{k} {values[k]} (was {saved[k]})" for k in SCHEDULE_FLAGS if saved[k] != values[k]]
    if rescheduled:
        log(f"continuing the full state {folder} on another LR schedule: " + ", ".join(rescheduled))


# ---------------------------------------------------------------------------------------------
# The RNG states (each rank's own)


def rng_states():
    numpy_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
            "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def restore_rng_states(states):
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------------------------------------
# Writing


def _fsync_tree(folder):
    for root, _, names in os.walk(folder):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def partial_folder(proj_dir, step):
    return os.path.join(states_dir(proj_dir), f".partial-step-{step}")


def start_writing(proj_dir, step):
    """Rank 0, before every rank writes its part: an empty folder for the state."""
    folder = partial_folder(proj_dir, step)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)


def write_weights(folder, state_dict, optimizer, precision_state):
    """Rank 0: the model's weights (as rwkv-<n>.pth holds them) and, without DeepSpeed (optimizer None), the
    optimizer's state dict and the precision plugin's."""
    write_synced({"model": state_dict, "optimizer": None if optimizer is None else optimizer.state_dict(),
            "precision": precision_state}, os.path.join(folder, WEIGHTS))


def write_deepspeed(folder, engine):
    """Every rank: DeepSpeed's checkpoint (its module on rank 0, every rank its own optimizer shard)."""
    engine.save_checkpoint(folder, tag=DEEPSPEED_TAG, save_latest=False)


def write_rank_part(folder, rank, part):
    write_synced(part, os.path.join(folder, rank_file(rank)))


def manifest(cfg: Config, step):
    """What a state after `step` steps records besides its files: where it is in the schedule (the mini-epoch, the
    step inside it, the run's first mini-epoch and warmup), how it was saved, and the run's configuration."""
    epoch, step_in_epoch = divmod(step, cfg.data.epoch_steps)
    return {"step": step, "epoch": epoch, "step_in_epoch": step_in_epoch,
            "run_epoch_begin": cfg.optim.run_epoch_begin, "warmup_steps": cfg.optim.warmup_steps,
            "world_size": cfg.run.world_size, "deepspeed": cfg.run.uses_deepspeed, "config": cfg.values()}


def finish_writing(proj_dir, step, manifest, keep, log=print):
    """Rank 0, after every rank has written its part: the manifest with each file's size, everything synced to disk,
    then the rename that makes the state complete; then the oldest states beyond `keep` are removed."""
    folder = partial_folder(proj_dir, step)
    files = {os.path.relpath(os.path.join(root, name), folder): os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(folder) for name in names}
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump({"format": FORMAT, **manifest, "files": files}, f)
    _fsync_tree(folder)
    final = os.path.join(states_dir(proj_dir), f"step-{step}")
    if os.path.isdir(final):   # a state of this step from before a crash: the new one replaces it
        shutil.rmtree(final)
    os.replace(folder, final)
    fd = os.open(states_dir(proj_dir), os.O_RDONLY)
    try:
        os.fsync(fd)   # the rename itself reaches the disk
    finally:
        os.close(fd)
    for old_step, old in complete_states(proj_dir)[keep:]:
        removing = os.path.join(states_dir(proj_dir), f".removing-step-{old_step}")
        os.replace(old, removing)
        shutil.rmtree(removing)
    return final


# ---------------------------------------------------------------------------------------------
# Restoring the optimizer


def restore_optimizer(trainer, folder, weights):
    """Adam's moments and step counts (and the precision plugin's scaler) from the state's weights file, into the
    run's optimizer; under DeepSpeed its engine reads its own checkpoint, weights and optimizer shards."""
    if weights["optimizer"] is None:
        engine = trainer.strategy.deepspeed_engine
        path, _ = engine.load_checkpoint(folder, tag=DEEPSPEED_TAG, load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise StateError(f"DeepSpeed could not load its checkpoint from {os.path.join(folder, DEEPSPEED_TAG)}")
        return
    trainer.optimizers[0].load_state_dict(weights["optimizer"])
    if weights["precision"]:
        trainer.precision_plugin.load_state_dict(weights["precision"])


class Resume:
    """A full state this run continues from: its folder, its manifest, its weights file's and its rank files'
    contents (every rank reads them all, so that all make the same choice)."""

    def __init__(self, folder, manifest):
        self.folder, self.manifest = folder, manifest
        self.weights = load_part(folder, WEIGHTS)
        self.rank_parts = [load_part(folder, rank_file(r)) for r in range(manifest["world_size"])]

    def resumed_state(self) -> ResumedState:
        m = self.manifest
        return ResumedState(m["epoch"], m["step_in_epoch"], m["run_epoch_begin"], m["warmup_steps"])
