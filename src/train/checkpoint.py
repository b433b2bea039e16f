"""Checkpoints (docs/RECIPE.md section 8): plain state dicts, written atomically, resumed from the newest readable one."""
import os
import re
import time
import zipfile

import torch

CHECKPOINT_NAME = re.compile(r"^rwkv-(init|final|\d+)\.pth$")
PARTIAL_WRITE = re.compile(r"^rwkv-(init|final|\d+)\.pth\.tmp\d+$")   # save_atomic's temporary files
ZIP_MAGIC = b"PK\x03\x04"   # torch.save writes a zip archive
PICKLE_MAGIC = b"\x80"        # the older torch.save format (_use_new_zipfile_serialization=False) is a pickle
STREAM_STATE_DIR = "data_state"   # proj_dir/data_state: where the jsonl stream saves its position per mini-epoch
TRAIN_LOG = "train_log.txt"
STATES_DIR = "states"   # proj_dir/states: the full states (src/train/full_state.py)
MOVED_ASIDE = "previous-"   # move_aside's folders: proj_dir/previous-<time>/


class CheckpointError(RuntimeError):
    pass


def write_synced(obj, path):
    """torch.save `obj` to `path` and fsync it: its bytes are on the disk when this returns."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_atomic(state_dict, path):
    """torch.save to a temporary file beside `path`, fsync, then rename: a crash or a full disk never leaves a
    truncated file under the real name, and the file already there stays intact. Refuses non-finite weights."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"not writing {path}: NaN or inf in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write_synced(state_dict, tmp)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CheckpointError(f"could not write checkpoint {path}: {e}. "
                              f"Any earlier checkpoint in {os.path.dirname(path) or '.'} is untouched; "
                              f"free disk space and restart with the same command to resume.") from e


def numbered_checkpoints(proj_dir):
    """[(n, path)] for rwkv-<n>.pth and rwkv-init.pth (n = -1), newest first; rwkv-final.pth is not resumed from."""
    found = []
    for name in os.listdir(proj_dir) if os.path.isdir(proj_dir) else []:
        m = CHECKPOINT_NAME.match(name)
        if m and m.group(1) != "final":
            found.append((-1 if m.group(1) == "init" else int(m.group(1)), os.path.join(proj_dir, name)))
    return sorted(found, reverse=True)


def unreadable_reason(path, error):
    """Why torch.load failed on an existing file, and what to do: one line, without torch's long advice."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head == ZIP_MAGIC and not zipfile.is_zipfile(path):   # torch.save's archive with its end missing
        return ("is cut short (an interrupted save, copy or download); copy it again, or resume from an earlier "
                "rwkv-<n>.pth")
    if head != ZIP_MAGIC and not head.startswith(PICKLE_MAGIC):
        return f"is not a PyTorch checkpoint (it starts with {head!r}); pass a .pth that train.py wrote"
    return (f"holds objects other than tensors or is damaged ({type(error).__name__}); pass a state dict "
            "saved as torch.save(model.state_dict(), path), such as a .pth that train.py wrote")


def load_state_dict(path):
    """Load a checkpoint file; CheckpointError (naming the file) if it is missing, truncated or not a state dict."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a .pth that train.py wrote, "
                              "e.g. out/<run>/rwkv-final.pth")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torch raises several types for truncated or corrupt files
        raise CheckpointError(f"checkpoint {path} {unreadable_reason(path, e)}") from e
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"checkpoint {path} is not a plain state dict of tensors; pass a .pth that train.py "
                              "wrote")
    return state_dict


def remove_partial_writes(proj_dir, log=print):
    """Delete rwkv-*.pth.tmp<pid> files left by a process killed while saving; they are never loaded."""
    for name in os.listdir(proj_dir) if os.path.isdir(proj_dir) else []:
        if PARTIAL_WRITE.match(name):
            try:
                os.remove(os.path.join(proj_dir, name))
                log(f"removed {name}, a checkpoint write interrupted by a crash")
            except FileNotFoundError:   # another rank of this run removed it first
                pass


def nothing_to_resume(proj_dir):
    return CheckpointError(f"no rwkv-init.pth or rwkv-<n>.pth in {proj_dir}: write the init first "
                           f"(--train_stage 1, e.g. demo-training-prepare.sh)")


def load_newest(proj_dir, log=print):
    """(n, path, state_dict) of the newest readable numbered checkpoint, falling back past unreadable ones."""
    remove_partial_writes(proj_dir, log)
    candidates = numbered_checkpoints(proj_dir)
    if not candidates:
        raise nothing_to_resume(proj_dir)
    for n, path in candidates:
        try:
            return n, path, load_state_dict(path)
        except CheckpointError as e:
            log(f"WARNING: {e}; falling back to the previous checkpoint")
    raise CheckpointError(f"every checkpoint in {proj_dir} is unreadable: {[p for _, p in candidates]}")


def model_shape(state_dict, path):
    """The flags a state dict was trained with, read off its tensors; CheckpointError if it is no RWKV-7 model."""
    try:
        vocab_size, n_embd = state_dict["emb.weight"].shape
        n_head, head_size = state_dict["blocks.0.att.r_k"].shape
        dim_ffn = state_dict["blocks.0.ffn.key.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"checkpoint {path} is not an RWKV-7 model (its emb.weight, blocks.0.att.r_k or "
                              f"blocks.0.ffn.key.weight is missing or misshapen: {type(e).__name__} {e}); pass a .pth "
                              "that train.py wrote") from e
    n_layer = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    return dict(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, head_size=head_size, dim_ffn=dim_ffn)


def check_compatible(state_dict, model_state, path, load_partial=False):
    """Refuse a checkpoint of another shape with the mismatched tensors and the flags it needs; with
    load_partial, tensors missing from the file are allowed (they keep the model's init)."""
    wrong = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
             for k, v in model_state.items() if k in state_dict and state_dict[k].shape != v.shape]
    missing = [k for k in model_state if k not in state_dict]
    unexpected = [k for k in state_dict if k not in model_state]
    if wrong or unexpected or (missing and not load_partial):
        try:
            flags = " ".join(f"--{k} {v}" for k, v in model_shape(state_dict, path).items())
            hint = f"the file was trained with {flags}"
        except CheckpointError:
            hint = "the file lacks the keys to tell its shape"
        problems = wrong + [f"missing in file: {k}" for k in missing] + [f"not in model: {k}" for k in unexpected]
        if len(problems) > 12:
            problems = problems[:12] + [f"... and {len(problems) - 12} more"]
        partial = " (or --load_partial 1 to fill tensors missing from the file with the init)" if missing and not wrong else ""
        raise CheckpointError(f"checkpoint {path} does not fit the model: {len(wrong)} tensors of another shape, "
                              f"{len(missing)} missing, {len(unexpected)} unexpected:\n  " + "\n  ".join(problems) +
                              f"\n{hint}; change the flags to match{partial}")


def move_aside(proj_dir, log=print):
    """Before a new init: move the earlier run's rwkv-*.pth, with what belongs to them (the data stream's saved
    positions, the full states and train_log.txt, which the new run starts afresh), into proj_dir/previous-<time>/ instead of
    deleting them."""
    old = [name for name in sorted(os.listdir(proj_dir))
           if CHECKPOINT_NAME.match(name) or name in (STREAM_STATE_DIR, TRAIN_LOG, STATES_DIR)]
    if not old:
        return None
    dest = os.path.join(proj_dir, time.strftime(f"{MOVED_ASIDE}%Y%m%d-%H%M%S"))
    os.makedirs(dest)
    for name in old:
        os.replace(os.path.join(proj_dir, name), os.path.join(dest, name))
    log(f"moved the earlier run's {', '.join(old[:4])}{'...' if len(old) > 4 else ''} to {dest}")
    return dest
