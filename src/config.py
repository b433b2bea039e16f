"""Configuration objects passed explicitly from train.py to the model, the data and the trainer."""
from dataclasses import dataclass


class ConfigError(ValueError):
    """A flag (or combination of flags) that cannot work; the message says what would."""


def lora_dim(C: int, factor: float, power: float) -> int:
    # RECIPE.md section 1: Python round (half to even), multiple of 32, at least 32
    return max(32, round(factor * C**power / 32) * 32)


@dataclass
class ModelConfig:
    n_layer: int
    n_embd: int
    vocab_size: int = 65536
    head_size: int = 64
    dim_att: int = 0          # 0 means n_embd
    dim_ffn: int = 0          # 0 means 4 * n_embd
    grad_cp: int = 0          # 1: recompute each block in backward
    deepspeed_checkpointing: bool = False  # use DeepSpeed's activation checkpointing (GPU + DeepSpeed only)

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
        """(D_w, D_a, D_v, D_g) of RECIPE.md section 1."""
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
class OptimConfig:
    lr_init: float = 6e-4
    lr_final: float = 1e-5
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-18
    weight_decay: float = 0.0
    layerwise_lr: int = 1     # 0: every parameter at lr x1 (no x2 for att.w0)
    optimizer: str = "torch"  # "fused" (DeepSpeed FusedAdam), "cpu_adam" (DeepSpeedCPUAdam), "torch"
