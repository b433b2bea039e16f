"""Train RWKV-7 with the reference recipe's flags: --train_stage 1 writes the init, --train_stage 3 trains from the
newest checkpoint in --proj_dir (and resumes after a stop). README.md and demo-training-*.sh give whole recipes."""
import argparse
import os
from dataclasses import dataclass
import sys
import time

from src.config import FLAG_GROUPS, Config, ConfigError, build_config, check_flags, check_schedule, flag_fields


def parse_bool(text):
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def shown_default(value):
    """A default as it would be typed on the command line."""
    return '""' if value == "" else str(value)


def build_parser():
    """One flag per flag field of src/config.py's objects, with its name, default, group and help."""
    parser = argparse.ArgumentParser(description=__doc__)
    groups = {name: parser.add_argument_group(name) for name in FLAG_GROUPS}
    for f in flag_fields():
        help_text = f"{f.metadata['help']} (default: {shown_default(f.default)})".replace("%", "%%")
        groups[f.metadata["group"]].add_argument(
            f"--{f.name}", type=parse_bool if f.type in (bool, "bool") else type(f.default), default=f.default,
            help=help_text)
    return parser


def parse_flags(argv=None) -> dict:
    """train.py's flags, name -> value."""
    return vars(build_parser().parse_args(argv))


def resolve_precision(precision):
    """Lightning's precision value for --precision, and whether matmuls may use tf32."""
    return {"fp32": (32, False), "32": (32, False), "tf32": (32, True), "fp16": (16, True), "16": (16, True),
            "bf16": ("bf16", True)}[precision]


def build_dataset(cfg: Config):
    """Check the data and build the dataset (docs/RECIPE.md section 7)."""
    from src.config import MINI_EPOCH_SAMPLES
    from src.data.dataset import BinidxDataset, JsonlStreamDataset
    from src.train.checkpoint import STREAM_STATE_DIR
    d, o = cfg.data, cfg.optim
    if d.data_type == "binidx":
        dataset = BinidxDataset(d.data_file, d.ctx_len, d.magic_prime, d.micro_bsz, cfg.run.world_size,
                                cfg.model.vocab_size, d.epoch_steps)
        if o.epoch_count == 0 and o.my_exit_tokens <= 0:
            raise ConfigError(f"{d.data_file}: {d.magic_prime} samples (--magic_prime) are less than one mini-epoch "
                              f"of {MINI_EPOCH_SAMPLES}, so the LR schedule has no horizon; set --my_exit_tokens "
                              f"(e.g. {d.magic_prime * d.ctx_len}, one pass over the data)")
        return dataset
    return JsonlStreamDataset(d.data_file, d.ctx_len, d.micro_bsz, d.epoch_steps, max(cfg.run.random_seed, 0),
                              os.path.join(cfg.run.proj_dir, STREAM_STATE_DIR))


def write_init(cfg: Config):
    """--train_stage 1: docs/RECIPE.md section 3's init, saved in the training precision as proj_dir/rwkv-init.pth."""
    import torch
    from src.model import RWKV
    from src.train.checkpoint import move_aside, save_atomic
    move_aside(cfg.run.proj_dir)
    if cfg.run.random_seed >= 0:
        torch.manual_seed(cfg.run.random_seed)
    model = RWKV(cfg.model)
    model.init_weights()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "16": torch.float16}.get(cfg.run.precision, torch.float32)
    path = os.path.join(cfg.run.proj_dir, "rwkv-init.pth")
    save_atomic({k: v.to(dtype) for k, v in model.state_dict().items()}, path)
    print(f"wrote {path} ({sum(p.numel() for p in model.parameters()):,} parameters, {dtype}); now run stage 2 or 3")


def is_other_rank():
    """True in the processes of ranks > 0 (Lightning's launcher starts them with LOCAL_RANK; other nodes are
    started with NODE_RANK), which must not write the files that rank 0 writes."""
    return int(os.environ.get("LOCAL_RANK", 0)) > 0 or int(os.environ.get("NODE_RANK", 0)) > 0


@dataclass
class Start:
    """What a run starts from: the weights (`path`, and its tensors, or None for the init that prepare writes), the
    rwkv-<n>.pth's n for a weights-only resume (-1: rwkv-init.pth), and the full state of an exact resume."""
    path: str = None
    state_dict: dict = None
    resumed_epoch: int = None
    resume: object = None   # src.train.full_state.Resume


def start_point(flags):
    """For --train_stage 2 and up: the newest complete full state (--resume_state 1) unless a newer rwkv-<n>.pth
    exists, else the newest readable rwkv-<n>.pth (rwkv-init.pth is n = -1; path None when there is none yet, which
    prepare reports after the data checks). Else --load_model, else the init that prepare writes."""
    from src.train import full_state
    from src.train.checkpoint import load_newest, load_state_dict, numbered_checkpoints
    proj_dir = flags["proj_dir"]
    if flags["train_stage"] < 2:
        if flags["load_model"]:
            return Start(flags["load_model"], load_state_dict(flags["load_model"]))
        return Start(os.path.join(proj_dir, "rwkv-init.pth"))
    weights = numbered_checkpoints(proj_dir)
    log = print if not is_other_rank() else (lambda _: None)
    if not is_other_rank():
        full_state.remove_leftovers(proj_dir, log)
    for folder, manifest in full_state.checked_states(proj_dir, log) if flags["resume_state"] else ():
        if weights and (manifest["epoch"], manifest["step_in_epoch"]) < (weights[0][0] + 1, 0):
            print(f"the full state {folder} is older than {weights[0][1]}: resuming from that file instead")
            break
        try:
            resume = full_state.Resume(folder, manifest)
        except full_state.StateError as e:
            log(f"WARNING: skipping the full state {folder}: {e}")
            continue
        print(f"resuming from the full state {folder}: mini-epoch {manifest['epoch']}, its step "
              f"{manifest['step_in_epoch']} is next, with the optimizer's moments, the data position and the RNG "
              f"states (no warmup again)")
        return Start(folder, resume.weights["model"], resume=resume)
    if not weights:
        return Start()
    n, path, state_dict = load_newest(proj_dir)
    print(f"resuming from {path}: mini-epoch {n + 1} is next (weights only: Adam starts afresh"
          f"{', with a warmup' if n >= 0 else ''})")
    return Start(path, state_dict, resumed_epoch=n)


def build_trainer(cfg: Config, callbacks, max_steps=-1):
    import pytorch_lightning as pl
    import torch
    from src.train.callbacks import ProgressBar, TrainCallback
    train_callbacks = [c for c in callbacks if isinstance(c, TrainCallback)]
    if cfg.run.enable_progress_bar and train_callbacks:   # the bar shows its lr, loss and Kt/s
        callbacks = callbacks + [ProgressBar(train_callbacks[0])]
    precision, allow_tf32 = resolve_precision(cfg.run.precision)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow_tf32
    strategy = cfg.run.strategy
    if cfg.run.uses_deepspeed:
        from pytorch_lightning.strategies import DeepSpeedStrategy

        bucket = cfg.perf.ds_bucket_mb * 1000 * 1000
        # ZeRO-2 (offload too) reduces the gradients on the compute stream after the backward (no overlap_comm):
        # DeepSpeed 0.16.8's side stream reduces a gradient larger than a bucket in place and frees it before that
        # reduction is done (NaN at step 3 with 20 M-element buckets on 2 GPUs). On one GPU plain ZeRO-2 also skips
        # the contiguous gradient buckets: there is nothing to communicate, and copying each gradient into a bucket
        # as it arrives is only host work in a launch-bound step (63-71 vs 52 thousand tokens/s). Several ranks
        # keep them: without, they train differently from DeepSpeed's default (tests/test_zero_buckets.py).
        overlap_comm = "stage_2" not in cfg.run.strategy
        contiguous_gradients = cfg.run.strategy != "deepspeed_stage_2" or cfg.run.world_size > 1
        strategy = DeepSpeedStrategy(stage=3 if "stage_3" in cfg.run.strategy else 2,
                                     offload_optimizer="offload" in cfg.run.strategy,
                                     allgather_bucket_size=bucket, reduce_bucket_size=bucket,
                                     overlap_comm=overlap_comm,
                                     contiguous_gradients=contiguous_gradients)
        # DeepSpeed's throughput timer (on by default) waits for the GPU at the start and at the end of every step,
        # so the host could not queue the next step while the GPU runs this one; Lightning's bar shows tokens/s
        strategy.config["timers"] = {"throughput": {"enabled": False}}
        if cfg.perf.zero_patches:
            from src.engine.zero_patches import ZeroPatches
            callbacks = callbacks + [ZeroPatches()]
    return pl.Trainer(accelerator="gpu" if cfg.run.accelerator == "cuda" else cfg.run.accelerator, devices=cfg.run.devices,
                      num_nodes=cfg.run.num_nodes, precision=precision, strategy=strategy, max_epochs=-1, max_steps=max_steps,
                      gradient_clip_val=cfg.optim.grad_clip, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      num_sanity_val_steps=0, replace_sampler_ddp=False, reload_dataloaders_every_n_epochs=1,
                      enable_progress_bar=cfg.run.enable_progress_bar, enable_model_summary=False)


def check_accelerator(flags):
    """Refuse --accelerator gpu without GPUs (or fewer than --devices) here, not in a Lightning traceback."""
    import torch
    if flags["accelerator"] == "cpu":
        return
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found == 0:
        cpu_flags = "--accelerator cpu" + (" --strategy auto" if flags["strategy"].startswith("deepspeed") else "")
        raise ConfigError(f"--accelerator {flags['accelerator']}: no GPU was found (torch.cuda.is_available() is "
                          f"False); train on the CPU with {cpu_flags}, or install a CUDA build of torch")
    if flags["devices"] > found:
        raise ConfigError(f"--devices {flags['devices']}: only {found} GPUs were found; use --devices {found}")


def prepare(flags):
    """The run's configuration and every check that needs no model: flags, data, the schedule, the start
    checkpoint's readability and shapes (a full state's flags too); a new run's init is written here, after the data
    checks. Returns (cfg, dataset, val_tokens, Start)."""
    import torch
    from src.model import RWKV
    from src.train.checkpoint import check_compatible, nothing_to_resume
    from src.train.full_state import check_state_fits
    check_flags(flags)
    check_accelerator(flags)
    start = start_point(flags)
    cfg = build_config(flags, start.resumed_epoch, None if start.resume is None else start.resume.resumed_state())
    if start.resume is not None:
        check_state_fits(start.resume.folder, start.resume.manifest, cfg.values())
    os.makedirs(cfg.run.proj_dir, exist_ok=True)
    dataset = build_dataset(cfg)
    val_tokens = None
    if cfg.data.val_data:
        from src.train.evaluate import load_token_stream
        val_tokens = load_token_stream(cfg.data.val_data, max_tokens=cfg.data.val_tokens)
    if start.path is None:
        raise nothing_to_resume(cfg.run.proj_dir)
    check_schedule(cfg)
    if start.state_dict is None and not is_other_rank():
        write_init(cfg)   # rank 0 writes the init before it starts the other ranks, which read it
    if start.state_dict is not None:
        with torch.device("meta"):   # shapes only: no memory, no init work
            expected = RWKV(cfg.model).state_dict()
        check_compatible(start.state_dict, expected, start.path, cfg.run.load_partial == 1)
    return cfg, dataset, val_tokens, start


def build_model(cfg: Config, start_path, state_dict):
    """The plain model with the start weights; tensors missing from a --load_partial file keep their init."""
    import pytorch_lightning as pl
    from src.model import RWKV
    from src.train.checkpoint import load_state_dict
    if cfg.run.random_seed >= 0:
        pl.seed_everything(cfg.run.random_seed)
    model = RWKV(cfg.model)
    if state_dict is None and is_other_rank() and not os.path.exists(start_path):
        model.init_weights()   # another node without rank 0's file: DDP / DeepSpeed broadcast rank 0's weights
        return model
    full = model.state_dict()
    full.update(load_state_dict(start_path) if state_dict is None else state_dict)
    model.load_state_dict(full)
    return model


def training_module(cfg: Config, model):
    """The module Lightning trains: the plain model with the fast path applied for this process's device (which
    checks its twins against the model first: FastPathMismatch) and the recipe's optimizer."""
    import torch
    from src.engine.fast_path import apply_fast_path
    from src.train.lightning_module import TrainingModule
    device = torch.device("cpu") if cfg.run.accelerator == "cpu" else \
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return TrainingModule(apply_fast_path(model, cfg.perf, device), cfg.optim)


def fit(cfg: Config, model, dataset, callbacks, max_steps=-1):
    from torch.utils.data import DataLoader
    from src.data.dataset import STREAM_WORKERS
    # workers are started anew each mini-epoch, after the callback has set the dataset's epoch and rank
    loader = DataLoader(dataset, batch_size=cfg.data.micro_bsz, shuffle=False, drop_last=True,
                        num_workers=STREAM_WORKERS if cfg.data.data_type == "jsonl" else 1,
                        persistent_workers=False, pin_memory=cfg.run.accelerator != "cpu")
    trainer = build_trainer(cfg, callbacks, max_steps)
    trainer.fit(model, loader)
    return trainer


def main(argv=None):
    from src.engine.threads import use_cpu_threads
    flags = parse_flags(argv)
    threads = use_cpu_threads(flags["accelerator"], max(flags["threads"], 0), flags["devices"])   # before the init
    try:
        if flags["train_stage"] == 1:
            cfg = build_config(flags)
            os.makedirs(cfg.run.proj_dir, exist_ok=True)
            write_init(cfg)
            return
        cfg, dataset, val_tokens, start = prepare(flags)
    except (ConfigError, ValueError, RuntimeError, OSError) as e:
        sys.exit(f"error: {e}")
    from src.engine.fast_path import FastPathMismatch
    from src.train.callbacks import TrainCallback, TrainingDiverged
    from src.train.checkpoint import CheckpointError
    from src.train.full_state import StateError
    try:
        module = training_module(cfg, build_model(cfg, start.path, start.state_dict))
    except FastPathMismatch as e:
        sys.exit(f"error: {e}")
    start.state_dict = None
    print(f"training L{cfg.model.n_layer}-D{cfg.model.n_embd} from {start.path}: mini-epochs of "
          f"{cfg.data.epoch_steps} steps x {cfg.real_bsz} x {cfg.data.ctx_len} tokens, starting at mini-epoch "
          f"{cfg.optim.epoch_begin}" + (f" step {cfg.optim.step_begin}" if cfg.optim.step_begin else "") +
          (f", {threads} CPU thread{'s' * (threads > 1)}" if threads else ""))
    began = time.time()
    try:
        fit(cfg, module, dataset, [TrainCallback(cfg, dataset, val_tokens, start.resume)])
    except (TrainingDiverged, CheckpointError, StateError) as e:
        sys.exit(f"error: {e}")
    print(f"done in {time.time() - began:.0f} s")


if __name__ == "__main__":
    main()
