"""The configuration of a run: five frozen objects (model, data, optimizer and schedule, performance, run) that
build_config makes once from train.py's flags, with every derived value; nothing changes them afterwards.

Each flag is declared once, as a field of the object it configures (`flag`: its default, its group in --help and
one line on what it does); the fields declared with `derived` are no flags: build_config computes them."""
import math
from dataclasses import dataclass, field, fields
from types import SimpleNamespace

DEEPSPEED_STRATEGIES = ("deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3")
FLAG_GROUPS = ("model", "data", "optimizer and schedule", "checkpoints and logs", "hardware", "performance")
MINI_EPOCH_SAMPLES = 40320   # docs/RECIPE.md section 7: samples per mini-epoch on all ranks together (8!: many divisors)


class ConfigError(ValueError):
    """A flag (or combination of flags) that cannot work; the message says what would."""


def flag(default, group, help):
    """A field that is a train.py flag: its default, its group in --help and one line on what it does."""
    assert group in FLAG_GROUPS, group
    return field(default=default, metadata={"group": group, "help": help})


def derived(default, why):
    """A field that build_config computes from the flags (not a flag)."""
    return field(default=default, metadata={"derived": why})


def lora_dim(C: int, factor: float, power: float) -> int:
    # docs/RECIPE.md section 1: Python round (half to even), multiple of 32, at least 32
    return max(32, round(factor * C**power / 32) * 32)


@dataclass(frozen=True)
class ModelConfig:
    """The model's shape (src/model/rwkv7.py)."""
    n_layer: int = flag(6, "model", "blocks")
    n_embd: int = flag(512, "model", "width, a multiple of 32 and of --head_size")
    vocab_size: int = flag(65536, "model", "rows of the embedding and the head; the RWKV vocab needs 65536")
    head_size: int = flag(64, "model", "channels per head (n_embd / head_size heads)")
    dim_att: int = flag(0, "model", "time-mix width; RWKV-7 needs n_embd (0 means n_embd)")
    dim_ffn: int = flag(0, "model", "channel-mix inner width, a multiple of 32 (0 means 4 x n_embd)")
    my_testing: str = flag("x070", "model", "model version; this recipe trains x070 (RWKV-7) only")

    def __post_init__(self):
        if self.dim_att <= 0:
            object.__setattr__(self, "dim_att", self.n_embd)
        if self.dim_ffn <= 0:
            object.__setattr__(self, "dim_ffn", 4 * self.n_embd)

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @property
    def lora_dims(self):
        """(D_w, D_a, D_v, D_g) of docs/RECIPE.md section 1."""
        C = self.n_embd
        d_decay = lora_dim(C, 1.8, 0.5)
        return d_decay, d_decay, lora_dim(C, 1.3, 0.5), lora_dim(C, 0.6, 0.8)

    def validate(self):
        C, N = self.n_embd, self.head_size
        if self.my_testing != "x070":
            raise ConfigError(f"--my_testing {self.my_testing!r}: this recipe trains RWKV-7 only; use --my_testing x070")
        if self.n_layer < 1:
            raise ConfigError(f"--n_layer {self.n_layer}: need at least 1 layer")
        if N < 1 or C % N != 0:
            raise ConfigError(f"--n_embd {C} is not a multiple of --head_size {N}; "
                              f"try --n_embd {max(N, C // N * N)} or a head size dividing {C}")
        if C % 32 != 0:
            raise ConfigError(f"--n_embd {C} must be a multiple of 32; try --n_embd {max(32, round(C / 32) * 32)}")
        if self.dim_att != C:
            raise ConfigError(f"--dim_att {self.dim_att}: RWKV-7 uses dim_att == n_embd; pass --dim_att 0 or {C}")
        if self.dim_ffn % 32 != 0:
            raise ConfigError(f"--dim_ffn {self.dim_ffn} must be a multiple of 32; try --dim_ffn {4 * C}")
        if self.vocab_size < 2:
            raise ConfigError(f"--vocab_size {self.vocab_size}: the RWKV vocab needs 65536")


@dataclass(frozen=True)
class DataConfig:
    """What the run reads (src/data)."""
    data_file: str = flag("", "data", "binidx PREFIX of PREFIX.bin + PREFIX.idx, or for --data_type jsonl a "
                          "folder, file or glob of .jsonl / .jsonl.zst shards")
    data_type: str = flag("binidx", "data", "binidx (the magic-prime sample order) or jsonl (shards tokenized "
                          "and packed on the fly)")
    ctx_len: int = flag(1024, "data", "tokens per sample, a multiple of 16")
    micro_bsz: int = flag(12, "data", "samples per step per GPU; the real batch, micro_bsz x devices x "
                          "num_nodes, must divide 40320 for binidx")
    epoch_steps: int = flag(1000, "data", "steps per mini-epoch for jsonl; binidx sets 40320 // real batch")
    magic_prime: int = flag(0, "data", "binidx: the prime that orders the samples (tools/magic_prime.py PREFIX "
                            "--ctx_len N prints it)")
    val_data: str = flag("", "data", "held-out binidx PREFIX or jsonl(.zst): validation loss after every "
                         "mini-epoch; empty: none")
    val_tokens: int = flag(1_000_000, "data", "how many tokens of --val_data to score")


@dataclass(frozen=True)
class OptimConfig:
    """Adam, its parameter groups and the LR schedule (docs/RECIPE.md sections 4 and 6)."""
    lr_init: float = flag(6e-4, "optimizer and schedule", "learning rate after warmup, where the cosine decay "
                          "starts")
    lr_final: float = flag(1e-5, "optimizer and schedule", "learning rate at the end of the cosine decay")
    warmup_steps: int = flag(-1, "optimizer and schedule", "steps of this run that warm the lr up linearly from "
                             "1%; -1: 10 when resuming from rwkv-<n>.pth, else 0")
    beta1: float = flag(0.9, "optimizer and schedule", "Adam beta1")
    beta2: float = flag(0.99, "optimizer and schedule", "Adam beta2")
    adam_eps: float = flag(1e-18, "optimizer and schedule", "Adam epsilon")
    weight_decay: float = flag(0.0, "optimizer and schedule", "decoupled weight decay of the matrix weights; 0: "
                               "plain Adam")
    grad_clip: float = flag(1.0, "optimizer and schedule", "largest gradient norm; larger ones are scaled down")
    layerwise_lr: int = flag(1, "optimizer and schedule", "1: att.w0 at 2x the lr, as the reference; 0: every "
                             "parameter at 1x")
    epoch_count: int = flag(500, "optimizer and schedule", "mini-epochs of the schedule when --my_exit_tokens is "
                            "0; binidx sets magic_prime // 40320")
    epoch_begin: int = flag(0, "optimizer and schedule", "this run's first mini-epoch (its place in the schedule, "
                            "logs and checkpoint names); --train_stage 2 and up set it from the newest checkpoint")
    my_exit_tokens: int = flag(0, "optimizer and schedule", "tokens at which the cosine decay ends and the run "
                               "writes rwkv-final.pth (tools/magic_prime.py prints it); 0: after --epoch_count "
                               "mini-epochs")
    step_begin: int = derived(0, "steps of mini-epoch epoch_begin trained before this run: a full-state resume "
                              "continues inside a mini-epoch")
    run_epoch_begin: int = derived(0, "the mini-epoch where the warmup and the epoch_save count began: epoch_begin, "
                                   "or the interrupted run's for a full-state resume")
    optimizer: str = derived("torch", "DeepSpeed's FusedAdam under DeepSpeed ('fused'), DeepSpeedCPUAdam with "
                             "optimizer offload ('cpu_adam'), else torch's Adam / AdamW ('torch')")


@dataclass(frozen=True)
class PerfConfig:
    """How the engine runs the plain model (src/engine); none of it changes the math."""
    grad_cp: int = flag(0, "performance", "activation checkpointing: 0 keeps every activation, 1 recomputes each "
                        "block in backward, 2 only its elementwise math and LoRA up-projections, 3 those and wkv7 "
                        "(2 and 3 give the numbers of 1)")
    ds_bucket_mb: int = flag(200, "performance", "DeepSpeed's allgather and reduce bucket size in MB (2 for "
                             "consumer GPUs, 200 for A100 / H100)")
    fused: int = flag(1, "performance", "1: the fast path's kernels, chunked loss and compiled chains, each checked "
                      "against the model first; 0: the model's plain functions (on GPU with the sequential wkv7 kernel)")
    compile_blocks: int = flag(0, "performance", "1: on the fused path, compile whole blocks, not only the "
                               "elementwise chains (faster; not with ZeRO-3; README)")
    cuda_graph: int = flag(1, "performance", "1: on the fused GPU path, replay the blocks as CUDA graphs (not with "
                           "ZeRO-3; README); 0: eager blocks")
    zero_patches: int = flag(1, "performance", "1: DeepSpeed ZeRO-1/2 with src/engine/zero_patches.py's gradient "
                             "norm, one-rank average and one-kernel step; 0: DeepSpeed's own code")
    deepspeed_checkpointing: bool = derived(False, "DeepSpeed's (reentrant) activation checkpointing for grad_cp 1: "
                                            "GPU + DeepSpeed with eager blocks")

    def validate(self):
        if self.grad_cp not in (0, 1, 2, 3):
            raise ConfigError(f"--grad_cp {self.grad_cp}: use 0 (keep every activation), 1 (recompute each block in "
                              f"backward), 2 (recompute only its elementwise math and LoRA up-projections) or 3 (those "
                              f"and the wkv7 forward)")
        if self.grad_cp in (2, 3) and self.compile_blocks:
            raise ConfigError(f"--grad_cp {self.grad_cp} picks the operations to keep inside eager blocks, not inside "
                              f"blocks compiled whole; use --compile_blocks 0 or --grad_cp 1")


@dataclass(frozen=True)
class RunConfig:
    """Where the run writes, what it starts from, and the hardware it runs on."""
    load_model: str = flag("", "checkpoints and logs", "start weights (.pth) for --train_stage 0; empty: a new init "
                           "written to --proj_dir/rwkv-init.pth")
    wandb: str = flag("", "checkpoints and logs", "Weights & Biases project to log each step to; empty: off")
    proj_dir: str = flag("out", "checkpoints and logs", "run folder: rwkv-<n>.pth checkpoints, full states "
                         "(states/), train_log.txt and the jsonl stream's saved positions")
    random_seed: int = flag(-1, "model", "seed of the init, the training and the jsonl shard order; -1: unseeded "
                            "(shard order of seed 0)")
    epoch_save: int = flag(5, "checkpoints and logs", "write rwkv-<n>.pth every this many mini-epochs of a run "
                           "(and after the schedule's last one)")
    save_every_steps: int = flag(0, "checkpoints and logs", "also write a full state (weights, optimizer, data "
                                 "position, RNG: proj_dir/states/) every this many steps; 0: by time only")
    save_every_minutes: float = flag(30.0, "checkpoints and logs", "write a full state when this many minutes have "
                                     "passed since the last one (or the run's start); 0: by steps only")
    keep_states: int = flag(2, "checkpoints and logs", "full states kept in proj_dir/states (older ones are removed)")
    resume_state: int = flag(1, "checkpoints and logs", "1: --train_stage 2 and up continue from the newest full "
                             "state at its exact step when it is newer than the newest rwkv-<n>.pth; 0: from "
                             "rwkv-<n>.pth only, as the reference (Adam restarts, warmup again)")
    train_stage: int = flag(0, "checkpoints and logs", "0: train from --load_model or a new init; 1: write "
                            "--proj_dir/rwkv-init.pth and exit; 2 and up: resume from the newest full state or "
                            "checkpoint there")
    load_partial: int = flag(0, "checkpoints and logs", "1: a --load_model file may lack tensors, which keep "
                             "their init")
    enable_progress_bar: bool = flag(True, "checkpoints and logs", "show the progress bar: True or False")
    accelerator: str = flag("gpu", "hardware", "gpu (or cuda) or cpu")
    devices: int = flag(1, "hardware", "GPUs (or CPU processes) per node")
    num_nodes: int = flag(1, "hardware", "machines, each running the same command (README: several nodes)")
    precision: str = flag("bf16", "hardware", "fp32, tf32, fp16 or bf16 (32 and 16 are accepted)")
    strategy: str = flag("auto", "hardware", "auto (Lightning's choice, DDP on several devices), "
                         "deepspeed_stage_2, deepspeed_stage_2_offload or deepspeed_stage_3")
    threads: int = flag(0, "hardware", "torch's threads per process on CPU; 0: automatic (src/engine/threads.py: "
                        "OMP_NUM_THREADS if set, else the process's share of the cores less one, at least 1)")

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.devices

    @property
    def uses_deepspeed(self) -> bool:
        return self.strategy.startswith("deepspeed")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "perf": PerfConfig, "run": RunConfig}


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    perf: PerfConfig
    run: RunConfig

    @property
    def real_bsz(self) -> int:
        return self.run.world_size * self.data.micro_bsz

    @property
    def tokens_per_step(self) -> int:
        return self.data.ctx_len * self.real_bsz

    @property
    def horizon_tokens(self) -> int:
        """The tokens at which the LR schedule's progress reaches 1 and the run ends."""
        o = self.optim
        return o.my_exit_tokens if o.my_exit_tokens > 0 else o.epoch_count * self.data.epoch_steps * self.tokens_per_step

    @property
    def first_step(self) -> int:
        """The step (counted from the schedule's start) that this run trains first."""
        return self.optim.epoch_begin * self.data.epoch_steps + self.optim.step_begin

    @property
    def warmup_start(self) -> int:
        """The step where this run's warmup began (earlier than first_step after a full-state resume)."""
        return self.optim.run_epoch_begin * self.data.epoch_steps

    def values(self) -> dict:
        """Every field by name, the derived ones as derived: the run's arguments in train_log.txt."""
        return {f.name: getattr(section, f.name) for section in (getattr(self, s) for s in SECTIONS)
                for f in fields(section)}


def flag_fields():
    """Every train.py flag as a dataclass field, in --help order."""
    return [f for section in SECTIONS.values() for f in fields(section) if "help" in f.metadata]


def flag_defaults():
    return {f.name: f.default for f in flag_fields()}


def check_flags(values: dict):
    """Flag checks that need no data and no model; raises ConfigError naming the flag and the fix."""
    v = SimpleNamespace(**values, uses_deepspeed=values["strategy"].startswith("deepspeed"))
    if v.data_type not in ("binidx", "jsonl"):
        raise ConfigError(f"--data_type {v.data_type!r}: use binidx (a .bin/.idx pair) or jsonl (.jsonl/.jsonl.zst shards)")
    if v.ctx_len < 16 or v.ctx_len % 16 != 0:
        fix = max(16, round(v.ctx_len / 16) * 16)
        raise ConfigError(f"--ctx_len {v.ctx_len} must be a positive multiple of 16 (the kernel's chunk); try --ctx_len {fix}")
    for flag in ("micro_bsz", "devices", "num_nodes", "epoch_save", "head_size", "keep_states"):
        if getattr(v, flag) < 1:
            raise ConfigError(f"--{flag} {getattr(v, flag)} must be at least 1")
    if v.save_every_steps < 0 or v.save_every_minutes < 0:
        raise ConfigError(f"--save_every_steps {v.save_every_steps} and --save_every_minutes {v.save_every_minutes} "
                          "must be >= 0 (0 turns that trigger off)")
    if v.threads < 0:
        raise ConfigError(f"--threads {v.threads} must be >= 0 (0: automatic, src/engine/threads.py)")
    if v.epoch_begin < 0:
        raise ConfigError(f"--epoch_begin {v.epoch_begin} must be >= 0")
    if v.precision not in ("fp32", "tf32", "fp16", "bf16", "32", "16"):
        raise ConfigError(f"--precision {v.precision!r}: use fp32, tf32, fp16 or bf16")
    if v.accelerator not in ("gpu", "cuda", "cpu"):
        raise ConfigError(f"--accelerator {v.accelerator!r}: use gpu or cpu")
    if v.lr_init <= 0 or v.lr_final <= 0:
        raise ConfigError(f"--lr_init {v.lr_init} and --lr_final {v.lr_final} must be > 0")
    if v.uses_deepspeed and v.strategy not in DEEPSPEED_STRATEGIES:
        raise ConfigError(f"--strategy {v.strategy}: this recipe builds {', '.join(DEEPSPEED_STRATEGIES)}")
    if v.compile_blocks and v.strategy == "deepspeed_stage_3":
        raise ConfigError("--compile_blocks 1 is not built for --strategy deepspeed_stage_3 (ZeRO-3 gathers the "
                          "parameters in module hooks); use --compile_blocks 0 or deepspeed_stage_2")
    if v.train_stage >= 2 and v.uses_deepspeed and v.accelerator == "cpu":
        raise ConfigError(f"--strategy {v.strategy} needs GPUs; on CPU train with --strategy auto")
    if v.data_type == "jsonl" and v.epoch_steps < 1:
        raise ConfigError(f"--epoch_steps {v.epoch_steps}: the jsonl stream needs --epoch_steps >= 1")


@dataclass(frozen=True)
class ResumedState:
    """Where a full state (src/train/full_state.py) was saved: this run continues there exactly."""
    epoch: int             # the mini-epoch it was saved in
    step: int              # steps of that mini-epoch already trained
    run_epoch_begin: int   # the interrupted run's first mini-epoch (its warmup and epoch_save count start there)
    warmup_steps: int      # the interrupted run's warmup


def build_config(flags=None, resumed_epoch=None, resumed_state: ResumedState = None) -> Config:
    """The run's configuration from train.py's flags (name -> value; missing ones take their defaults), checked, with
    every derived value:
    - binidx data: epoch_steps = 40320 // real batch and epoch_count = magic_prime // 40320 (docs/RECIPE.md 7);
    - resumed_epoch, the n of the rwkv-<n>.pth a --train_stage >= 2 run starts from (-1: rwkv-init.pth; None for a
      run that resumes nothing): epoch_begin = n + 1, and --warmup_steps -1 becomes 10 when n >= 0, else 0;
    - resumed_state, a full state's position: epoch_begin, step_begin, run_epoch_begin and warmup_steps continue
      the interrupted run's;
    - the optimizer (DeepSpeed's FusedAdam / DeepSpeedCPUAdam, or torch's), CUDA graphs off under ZeRO-3 (it gathers
      each parameter into new memory at every use: nothing for a recorded graph to read), DeepSpeed's checkpointing
      where the blocks run eagerly under DeepSpeed; CUDA graphs and compiled blocks only on the fused path;
    - dim_att 0 -> n_embd, dim_ffn 0 -> 4 x n_embd."""
    values = flag_defaults()
    unknown = set(flags or {}) - set(values)
    if unknown:
        raise ConfigError(f"unknown flags {sorted(unknown)}; python train.py --help lists them")
    values.update(flags or {})
    check_flags(values)
    v = SimpleNamespace(**values)
    deepspeed = v.strategy.startswith("deepspeed")
    real_bsz = v.num_nodes * v.devices * v.micro_bsz
    if v.data_type == "binidx":
        values["epoch_steps"] = MINI_EPOCH_SAMPLES // real_bsz
        values["epoch_count"] = v.magic_prime // MINI_EPOCH_SAMPLES
    if resumed_epoch is not None:
        values["epoch_begin"] = resumed_epoch + 1
        if resumed_epoch >= 0 and v.warmup_steps < 0:
            values["warmup_steps"] = 10
    values["warmup_steps"] = max(values["warmup_steps"], 0)
    values["step_begin"], values["run_epoch_begin"] = 0, values["epoch_begin"]
    if resumed_state is not None:
        values.update(epoch_begin=resumed_state.epoch, step_begin=resumed_state.step,
                      run_epoch_begin=resumed_state.run_epoch_begin, warmup_steps=resumed_state.warmup_steps)
    if v.strategy == "deepspeed_stage_3":
        values["cuda_graph"] = 0
    derived_values = {
        "optimizer": ("cpu_adam" if "offload" in v.strategy else "fused") if deepspeed else "torch",
        "deepspeed_checkpointing": deepspeed and v.accelerator != "cpu" and not values["cuda_graph"],
        "step_begin": values["step_begin"], "run_epoch_begin": values["run_epoch_begin"],
    }
    if not v.fused:   # the plain path runs the model's functions as they are: no graphs, no blocks compiled whole
        values["cuda_graph"] = values["compile_blocks"] = 0
    sections = {}
    for name, cls in SECTIONS.items():
        sections[name] = cls(**{f.name: derived_values[f.name] if "derived" in f.metadata else values[f.name]
                                for f in fields(cls)})
    cfg = Config(**sections)
    cfg.model.validate()
    cfg.perf.validate()
    return cfg


def check_schedule(cfg: Config):
    """ConfigError unless the run has steps left after its warmup. A new run whose warmup is as long as its schedule
    would end at step 0 having trained nothing (the LR progress's denominator, the horizon less the warmup, is
    <= 0); a resumed run past its horizon, likewise."""
    o, d = cfg.optim, cfg.data
    horizon_step = math.ceil(cfg.horizon_tokens / cfg.tokens_per_step)   # the first step at progress 1
    if o.my_exit_tokens > 0:
        horizon = f"--my_exit_tokens {o.my_exit_tokens} / {cfg.tokens_per_step} tokens a step"
        more = "a larger --my_exit_tokens"
    elif d.data_type == "binidx":
        horizon = f"--magic_prime {d.magic_prime}: {o.epoch_count} mini-epochs x {d.epoch_steps} steps"
        more = "--my_exit_tokens"
    else:
        horizon = f"--epoch_count {o.epoch_count} x --epoch_steps {d.epoch_steps}"
        more = "a larger --epoch_count or --epoch_steps"
    steps = horizon_step - cfg.first_step
    if steps <= 0:
        raise ConfigError(f"nothing to train: this run starts at mini-epoch {o.epoch_begin} (step "
                          f"{cfg.first_step}), at or past the schedule's end at step {horizon_step} "
                          f"({horizon}); to train on, give {more}; to start over, run --train_stage 1")
    if steps <= o.warmup_steps - (cfg.first_step - cfg.warmup_start):
        raise ConfigError(f"--warmup_steps {o.warmup_steps} is not shorter than this run's {steps} steps (the "
                          f"schedule ends at step {horizon_step}: {horizon}); the warmup must end before the run "
                          f"does: use --warmup_steps {steps // 10} or {more}")
