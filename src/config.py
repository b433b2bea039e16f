"""Configuration objects passed explicitly from train.py to the model, the data and the trainer."""
from dataclasses import dataclass, field


DEEPSPEED_STRATEGIES = ("deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3")


class ConfigError(ValueError):
    """A flag (or combination of flags) that cannot work; the message says what would."""


def lora_dim(C: int, factor: float, power: float) -> int:
    # docs/RECIPE.md section 1: Python round (half to even), multiple of 32, at least 32
    return max(32, round(factor * C**power / 32) * 32)


@dataclass
class ModelConfig:
    n_layer: int
    n_embd: int
    vocab_size: int = 65536
    head_size: int = 64
    dim_att: int = 0          # 0 means n_embd
    dim_ffn: int = 0          # 0 means 4 * n_embd

    def __post_init__(self):
        if self.dim_att <= 0:
            self.dim_att = self.n_embd
        if self.dim_ffn <= 0:
            self.dim_ffn = 4 * self.n_embd

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


@dataclass
class PerfConfig:
    """How the engine runs the plain model (src/engine/fast_path.py); none of it changes the math."""
    grad_cp: int = 0          # 1: recompute each block in backward; 2: only its elementwise math (and LoRA ups); 3: and wkv7
    deepspeed_checkpointing: bool = False  # DeepSpeed's (reentrant) activation checkpointing; GPU + DeepSpeed, eager
    fused: bool = True        # the twins (kernels, chunked loss) and compiled chains; False: the model's plain functions
    compile_blocks: bool = False  # fused CUDA training: each block's forward and backward compiled whole
    cuda_graph: bool = False  # fused CUDA training: the blocks' forward and backward replayed as CUDA graphs
    zero_patches: bool = True  # DeepSpeed ZeRO-1/2: src/engine/zero_patches.py's grad norm, one-rank average and step

    def validate(self):
        if self.grad_cp not in (0, 1, 2, 3):
            raise ConfigError(f"--grad_cp {self.grad_cp}: use 0 (keep every activation), 1 (recompute each block in "
                              f"backward), 2 (recompute only its elementwise math and LoRA up-projections) or 3 (those "
                              f"and the wkv7 forward)")
        if self.grad_cp in (2, 3) and self.compile_blocks:
            raise ConfigError(f"--grad_cp {self.grad_cp} picks the operations to keep inside eager blocks, not inside "
                              f"blocks compiled whole; use --compile_blocks 0 or --grad_cp 1")


@dataclass
class OptimConfig:
    lr_init: float = 6e-4
    lr_final: float = 1e-5
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-18
    weight_decay: float = 0.0
    layerwise_lr: int = 1     # 0: every parameter at lr x1 (no x2 for att.w0)
    optimizer: str = "torch"  # "fused" (DeepSpeed FusedAdam), "cpu_adam" (DeepSpeedCPUAdam), "torch"


FLAG_GROUPS = ("model", "data", "optimizer and schedule", "checkpoints and logs", "hardware", "performance")


def flag(default, group, help):
    """A TrainConfig field and so a train.py flag: its default, its group in --help and one line on what it does."""
    assert group in FLAG_GROUPS, group
    return field(default=default, metadata={"group": group, "help": help})


@dataclass
class TrainConfig:
    """Every flag of train.py (the reference recipe's names, meanings and defaults)."""
    load_model: str = flag("", "checkpoints and logs", "start weights (.pth) for --train_stage 0; empty: a new init "
                           "written to --proj_dir/rwkv-init.pth")
    wandb: str = flag("", "checkpoints and logs", "Weights & Biases project to log each step to; empty: off")
    proj_dir: str = flag("out", "checkpoints and logs", "run folder: rwkv-<n>.pth checkpoints, train_log.txt and "
                         "the jsonl stream's saved positions")
    random_seed: int = flag(-1, "model", "seed of the init, the training and the jsonl shard order; -1: unseeded "
                            "(shard order of seed 0)")
    data_file: str = flag("", "data", "binidx PREFIX of PREFIX.bin + PREFIX.idx, or for --data_type jsonl a "
                          "folder, file or glob of .jsonl / .jsonl.zst shards")
    data_type: str = flag("binidx", "data", "binidx (the magic-prime sample order) or jsonl (shards tokenized "
                          "and packed on the fly)")
    vocab_size: int = flag(65536, "model", "rows of the embedding and the head; the RWKV vocab needs 65536")
    ctx_len: int = flag(1024, "data", "tokens per sample, a multiple of 16")
    epoch_steps: int = flag(1000, "data", "steps per mini-epoch for jsonl; binidx sets 40320 // real batch")
    epoch_count: int = flag(500, "optimizer and schedule", "mini-epochs of the schedule when --my_exit_tokens is "
                            "0; binidx sets magic_prime // 40320")
    epoch_begin: int = flag(0, "optimizer and schedule", "this run's first mini-epoch (its place in the schedule, "
                            "logs and checkpoint names); --train_stage 2 and up set it from the newest checkpoint")
    epoch_save: int = flag(5, "checkpoints and logs", "write rwkv-<n>.pth every this many mini-epochs of a run "
                           "(and after the schedule's last one)")
    micro_bsz: int = flag(12, "data", "samples per step per GPU; the real batch, micro_bsz x devices x "
                          "num_nodes, must divide 40320 for binidx")
    n_layer: int = flag(6, "model", "blocks")
    n_embd: int = flag(512, "model", "width, a multiple of 32 and of --head_size")
    dim_att: int = flag(0, "model", "time-mix width; RWKV-7 needs n_embd (0 means n_embd)")
    dim_ffn: int = flag(0, "model", "channel-mix inner width, a multiple of 32 (0 means 4 x n_embd)")
    lr_init: float = flag(6e-4, "optimizer and schedule", "learning rate after warmup, where the cosine decay "
                          "starts")
    lr_final: float = flag(1e-5, "optimizer and schedule", "learning rate at the end of the cosine decay")
    warmup_steps: int = flag(-1, "optimizer and schedule", "steps of this run that warm the lr up linearly from "
                             "1%; -1: 10 when resuming from rwkv-<n>.pth, else 0")
    beta1: float = flag(0.9, "optimizer and schedule", "Adam beta1")
    beta2: float = flag(0.99, "optimizer and schedule", "Adam beta2")
    adam_eps: float = flag(1e-18, "optimizer and schedule", "Adam epsilon")
    grad_cp: int = flag(0, "performance", "activation checkpointing: 0 keeps every activation, 1 recomputes each "
                        "block in backward, 2 only its elementwise math and LoRA up-projections, 3 those and wkv7 "
                        "(2 and 3 give the numbers of 1)")
    weight_decay: float = flag(0.0, "optimizer and schedule", "decoupled weight decay of the matrix weights; 0: "
                               "plain Adam")
    grad_clip: float = flag(1.0, "optimizer and schedule", "largest gradient norm; larger ones are scaled down")
    train_stage: int = flag(0, "checkpoints and logs", "0: train from --load_model or a new init; 1: write "
                            "--proj_dir/rwkv-init.pth and exit; 2 and up: resume from the newest checkpoint there")
    ds_bucket_mb: int = flag(200, "performance", "DeepSpeed's allgather and reduce bucket size in MB (2 for "
                             "consumer GPUs, 200 for A100 / H100)")
    head_size: int = flag(64, "model", "channels per head (n_embd / head_size heads)")
    load_partial: int = flag(0, "checkpoints and logs", "1: a --load_model file may lack tensors, which keep "
                             "their init")
    magic_prime: int = flag(0, "data", "binidx: the prime that orders the samples (tools/magic_prime.py PREFIX "
                            "--ctx_len N prints it)")
    my_testing: str = flag("x070", "model", "model version; this recipe trains x070 (RWKV-7) only")
    my_exit_tokens: int = flag(0, "optimizer and schedule", "tokens at which the cosine decay ends and the run "
                               "writes rwkv-final.pth (tools/magic_prime.py prints it); 0: after --epoch_count "
                               "mini-epochs")
    layerwise_lr: int = flag(1, "optimizer and schedule", "1: att.w0 at 2x the lr, as the reference; 0: every "
                             "parameter at 1x")
    accelerator: str = flag("gpu", "hardware", "gpu (or cuda) or cpu")
    devices: int = flag(1, "hardware", "GPUs (or CPU processes) per node")
    num_nodes: int = flag(1, "hardware", "machines, each running the same command (README: several nodes)")
    precision: str = flag("bf16", "hardware", "fp32, tf32, fp16 or bf16 (32 and 16 are accepted)")
    strategy: str = flag("auto", "hardware", "auto (Lightning's choice, DDP on several devices), "
                         "deepspeed_stage_2, deepspeed_stage_2_offload or deepspeed_stage_3")
    enable_progress_bar: bool = flag(True, "checkpoints and logs", "show the progress bar: True or False")
    fused: int = flag(1, "performance", "1: the fast path's kernels, chunked loss and compiled chains, each checked "
                      "against the model first; 0: the model's plain functions (on GPU with the sequential wkv7 kernel)")
    compile_blocks: int = flag(0, "performance", "1: on the fused path, compile whole blocks, not only the "
                               "elementwise chains (faster; not with ZeRO-3; README)")
    cuda_graph: int = flag(1, "performance", "1: on the fused GPU path, replay the blocks as CUDA graphs (not with "
                           "ZeRO-3; README); 0: eager blocks")
    zero_patches: int = flag(1, "performance", "1: DeepSpeed ZeRO-1/2 with src/engine/zero_patches.py's gradient "
                             "norm, one-rank average and one-kernel step; 0: DeepSpeed's own code")
    val_data: str = flag("", "data", "held-out binidx PREFIX or jsonl(.zst): validation loss after every "
                         "mini-epoch; empty: none")
    val_tokens: int = flag(1_000_000, "data", "how many tokens of --val_data to score")

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.devices

    @property
    def real_bsz(self) -> int:
        return self.world_size * self.micro_bsz

    @property
    def uses_deepspeed(self) -> bool:
        return self.strategy.startswith("deepspeed")

    def model_config(self) -> ModelConfig:
        return ModelConfig(n_layer=self.n_layer, n_embd=self.n_embd, vocab_size=self.vocab_size,
                           head_size=self.head_size, dim_att=self.dim_att, dim_ffn=self.dim_ffn)

    def perf_config(self) -> PerfConfig:
        # ZeRO-3 gathers each parameter into new memory at every use: nothing for a recorded graph to read
        cuda_graph = self.cuda_graph == 1 and self.strategy != "deepspeed_stage_3"
        return PerfConfig(grad_cp=self.grad_cp, fused=self.fused == 1, compile_blocks=self.compile_blocks == 1,
                          cuda_graph=cuda_graph, zero_patches=self.zero_patches == 1,
                          deepspeed_checkpointing=self.uses_deepspeed and self.accelerator == "gpu" and not cuda_graph)

    def optim_config(self) -> OptimConfig:
        optimizer = "torch"
        if self.uses_deepspeed:
            optimizer = "cpu_adam" if "offload" in self.strategy else "fused"
        return OptimConfig(lr_init=self.lr_init, lr_final=self.lr_final, beta1=self.beta1, beta2=self.beta2,
                           adam_eps=self.adam_eps, weight_decay=self.weight_decay, layerwise_lr=self.layerwise_lr,
                           optimizer=optimizer)

    def validate(self):
        """Flag checks that need no data and no model; raises ConfigError naming the flag and the fix."""
        if self.my_testing != "x070":
            raise ConfigError(f"--my_testing {self.my_testing!r}: this recipe trains RWKV-7 only; use --my_testing x070")
        if self.data_type not in ("binidx", "jsonl"):
            raise ConfigError(f"--data_type {self.data_type!r}: use binidx (a .bin/.idx pair) or jsonl (.jsonl/.jsonl.zst shards)")
        if self.ctx_len < 16 or self.ctx_len % 16 != 0:
            fix = max(16, round(self.ctx_len / 16) * 16)
            raise ConfigError(f"--ctx_len {self.ctx_len} must be a positive multiple of 16 (the kernel's chunk); try --ctx_len {fix}")
        for flag in ("micro_bsz", "devices", "num_nodes", "epoch_save", "head_size"):
            if getattr(self, flag) < 1:
                raise ConfigError(f"--{flag} {getattr(self, flag)} must be at least 1")
        if self.epoch_begin < 0:
            raise ConfigError(f"--epoch_begin {self.epoch_begin} must be >= 0")
        if self.precision not in ("fp32", "tf32", "fp16", "bf16", "32", "16"):
            raise ConfigError(f"--precision {self.precision!r}: use fp32, tf32, fp16 or bf16")
        if self.accelerator not in ("gpu", "cuda", "cpu"):
            raise ConfigError(f"--accelerator {self.accelerator!r}: use gpu or cpu")
        if self.lr_init <= 0 or self.lr_final <= 0:
            raise ConfigError(f"--lr_init {self.lr_init} and --lr_final {self.lr_final} must be > 0")
        if self.uses_deepspeed and self.strategy not in DEEPSPEED_STRATEGIES:
            raise ConfigError(f"--strategy {self.strategy}: this recipe builds {', '.join(DEEPSPEED_STRATEGIES)}")
        if self.compile_blocks and self.strategy == "deepspeed_stage_3":
            raise ConfigError("--compile_blocks 1 is not built for --strategy deepspeed_stage_3 (ZeRO-3 gathers the "
                              "parameters in module hooks); use --compile_blocks 0 or deepspeed_stage_2")
        if self.train_stage >= 2 and self.uses_deepspeed and self.accelerator == "cpu":
            raise ConfigError(f"--strategy {self.strategy} needs GPUs; on CPU train with --strategy auto")
        if self.data_type == "jsonl" and self.epoch_steps < 1:
            raise ConfigError(f"--epoch_steps {self.epoch_steps}: the jsonl stream needs --epoch_steps >= 1")
        self.model_config().validate()
        self.perf_config().validate()
