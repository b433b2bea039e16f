"""The RWKV-7 ("x070") language model as a Lightning module; reads like docs/RECIPE.md sections 1, 3, 4 and 5."""
import functools
import math

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from src.chain import Chain, chain_with_kernel, compile_input
from src.config import ModelConfig, OptimConfig
from src.cuda_graph import GraphedFunction
from src.head_loss import head_loss_chunked, head_loss_reference
from src.layer_norm import layer_norm_triton
from src.token_shift import token_shift_mix, token_shift_mixes
from src.wkv7 import wkv7, wkv7_torch


def token_shift(x, x_prev=None):
    """shift(x)[t] = x[t-1]; at t = 0 zero, or the previous call's last token when decoding with a state.
    Returns shift(x) - x."""
    if x_prev is None:
        return F.pad(x, (0, 0, 1, -1)) - x
    return torch.cat((x_prev.unsqueeze(1), x[:, :-1]), dim=1) - x


def layer_norm(x, weight, bias, eps, fused=False):
    """LayerNorm over channels. On the fused CUDA path, src/layer_norm.py's Triton kernels (inside a compiled block,
    inductor's own): 28 us per MiniPile-size LayerNorm on an H200, where compiled code takes 49 us, summing the
    weight and bias gradients in separate eager kernels."""
    if fused and x.is_cuda and not torch.compiler.is_compiling():
        return layer_norm_triton(x, weight, bias, eps)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def norm(ln: nn.LayerNorm, x, fused):
    return layer_norm(x, ln.weight, ln.bias, ln.eps, fused=fused)


@chain_with_kernel(token_shift_mixes)
def time_mix_inputs(x, x_prev, x_r, x_w, x_k, x_v, x_a, x_g):
    """The token shift and six learned mixes x + (shift(x) - x) * mu, the inputs of r, w, k, v, a and g."""
    xx = token_shift(x, x_prev)
    return tuple(x + xx * mu for mu in (x_r, x_w, x_k, x_v, x_a, x_g))


@Chain
def wkv7_inputs(k, v, v_first, w_lora, a_lora, v_lora, w0, a0, v0, k_k, k_a, head_size):
    """The kernel's inputs besides r, as [B,T,H,N]: the decay w, the key with the in-context learning rate a
    mixed in, the value (with the value residual from layer 0's v unless v_lora is None), and z = -kk,
    b = kk * a for the normalized key kk."""
    B, T, _ = k.shape
    w = -F.softplus(-(w0 + w_lora)) - 0.5                     # soft clamp to (-inf, -0.5)
    if v_lora is not None:
        v = v + (v_first - v) * torch.sigmoid(v0 + v_lora)    # value residual
    a = torch.sigmoid(a0 + a_lora)                            # in-context learning rate
    kk = F.normalize((k * k_k).view(B, T, -1, head_size), dim=-1, p=2.0, eps=1e-12)
    k = k * (1 + (a - 1) * k_a)
    w, k, v, a = (t.view(B, T, -1, head_size) for t in (w, k, v, a))
    return w, k, v, -kk, kk * a


@Chain
def wkv7_output(y, r, k, v, g, r_k, ln_weight, ln_bias, eps):
    """GroupNorm per head of the WKV output, plus the r_k bonus (r . k per head, weighted by r_k, times v),
    times the gate g; [B,T,C]."""
    B, T, H, N = r.shape
    y = F.group_norm(y.reshape(B * T, H * N), H, ln_weight, ln_bias, eps).view(B, T, H, N)
    y = y + (r * k * r_k).sum(dim=-1, keepdim=True) * v
    return y.view(B, T, H * N) * g


@chain_with_kernel(token_shift_mix)
def channel_mix_input(x, x_prev, x_k):
    return x + token_shift(x, x_prev) * x_k


@Chain
def relu_square(k):
    return torch.relu(k) ** 2


def ortho_(matrix, scale):
    """docs/RECIPE.md section 3 ortho(M, s), the module constructor's init of w2/a2/v2/g2: orthogonal with gain
    s * sqrt(rows/cols) when rows > cols."""
    rows, cols = matrix.shape
    gain = math.sqrt(rows / cols) if rows > cols else 1.0
    return nn.init.orthogonal_(matrix, gain=scale * gain)


class TimeMix(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.first = layer_id == 0
        self.n_head, self.head_size = cfg.n_head, cfg.head_size
        self.fused = cfg.fused
        self.kernel = "chunked" if cfg.fused else "sequential"   # the plain path runs the reference's design
        C, H, N, L = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.n_layer
        D_w, D_a, D_v, D_g = cfg.lora_dims

        r1 = 1.0 - layer_id / L                             # 1 to almost 0
        r0 = layer_id / (L - 1) if L > 1 else 0.0           # 0 to 1
        ddd = (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)
        n = torch.arange(C, dtype=torch.float32)

        def vec(values):
            return nn.Parameter(values.reshape(1, 1, C).clone())

        self.x_r = vec(1.0 - ddd ** (0.2 * r1))
        self.x_w = vec(1.0 - ddd ** (0.9 * r1))
        self.x_k = vec(1.0 - (ddd ** (0.9 * r1) + 0.4 * r0))
        self.x_v = vec(1.0 - (ddd ** (0.4 * r1) + 0.6 * r0))
        self.x_a = vec(1.0 - ddd ** (0.9 * r1))
        self.x_g = vec(1.0 - ddd ** (0.2 * r1))

        self.w0 = vec(-7.0 + 5.0 * (n / (C - 1)) ** (0.85 + 1.0 * r0 ** 0.5) + 0.5)
        self.w1 = nn.Parameter(torch.zeros(C, D_w))
        self.w2 = nn.Parameter(ortho_(torch.empty(D_w, C), 0.1))
        self.a0 = vec(torch.zeros(C))
        self.a1 = nn.Parameter(torch.zeros(C, D_a))
        self.a2 = nn.Parameter(ortho_(torch.empty(D_a, C), 0.1))
        self.v0 = vec(torch.ones(C))    # layer 0 owns v0/v1/v2 unused, so every block has the same keys
        self.v1 = nn.Parameter(torch.zeros(C, D_v))
        self.v2 = nn.Parameter(ortho_(torch.empty(D_v, C), 0.1))
        self.g1 = nn.Parameter(torch.zeros(C, D_g))
        self.g2 = nn.Parameter(ortho_(torch.empty(D_g, C), 0.1))
        self.k_k = vec(torch.full((C,), 0.85))
        self.k_a = vec(torch.ones(C))
        self.r_k = nn.Parameter(torch.zeros(H, N))

        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)
        with torch.no_grad():
            self.ln_x.weight.fill_(((1 + layer_id) / L) ** 0.7)

    def forward(self, x, v_first, state=None):
        """state: None when training from a zero state, else (last input token [B,C], WKV state [B,H,N,N])."""
        B, T, _ = x.shape
        H, N = self.n_head, self.head_size
        fused = self.fused and state is None
        xr, xw, xk, xv, xa, xg = time_mix_inputs(x, None if state is None else state[0], self.x_r, self.x_w,
                                                 self.x_k, self.x_v, self.x_a, self.x_g, fused=fused)
        r = self.receptance(xr).view(B, T, H, N)
        k = self.key(xk)
        v = self.value(xv)
        if self.first:
            v_first, v_lora = v, None
        else:
            v_lora = (xv @ self.v1) @ self.v2
        w, k, v, z, b = wkv7_inputs(k, v, v_first, torch.tanh(xw @ self.w1) @ self.w2, (xa @ self.a1) @ self.a2,
                                    v_lora, self.w0, self.a0, self.v0, self.k_k, self.k_a, N, fused=fused)
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        if state is None:
            y, new_state = wkv7(r, w, k, v, z, b, kernel=self.kernel), None
        else:   # decoding: carry the fp32 state across calls
            y, wkv_state = wkv7_torch(r, w, k, v, z, b, state[1])
            y, new_state = y.to(x.dtype), (x[:, -1], wkv_state)
        y = wkv7_output(y, r, k, v, g, self.r_k, self.ln_x.weight, self.ln_x.bias, self.ln_x.eps, fused=fused)
        return self.output(y), v_first, new_state


class ChannelMix(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        self.fused = cfg.fused
        ddd = (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)
        self.x_k = nn.Parameter(1.0 - ddd ** ((1.0 - layer_id / cfg.n_layer) ** 4))
        self.key = nn.Linear(C, cfg.dim_ffn, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, C, bias=False)

    def forward(self, x, x_prev=None):
        fused = self.fused and x_prev is None
        k = self.key(channel_mix_input(x, x_prev, self.x_k, fused=fused))
        return self.value(relu_square(k, fused=fused))


def keep_products(n_embd, keep_wkv7):
    """grad_cp 2 and 3's checkpoint contexts: the recomputation of a checkpointed block reuses the outputs of the
    forward's matrix products that read an n_embd-wide activation (receptance, key, value, output, the FFN's key and
    the LoRA down-projections) and, with keep_wkv7, its wkv7 kernel outputs (most of a block's forward time); it runs
    the rest again. A LoRA up-projection (inner size 32 to 160) costs little to run again next to what its [B,T,C]
    output costs to hold, and the backward never needs the FFN value product's output. The memory kept grows with
    the tokens; the wkv7 outputs include its fp32 state after every 16 steps (alone they took the Pile size from 17
    to 55 GB), which is why grad_cp 3 leaves them out."""
    products = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
    kept_ops = (torch.ops.rwkv7.wkv7_forward.default,) if keep_wkv7 else ()

    def policy(ctx, op, *args, **kwargs):
        if op in products:
            keep = args[-2].shape[-1] == n_embd   # mm(a, b), addmm(bias, a, b): a's inner size
        else:
            keep = op in kept_ops
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE
    return create_selective_checkpoint_contexts(policy)


def train_block(block, x, v_first):
    """One block's training forward from a zero state: (x, v_first)."""
    return block(x, v_first)[:2]


class CompiledBlock:
    """train_block compiled whole by torch.compile: one graph for block 0 and one shared by the others (the guards
    see only `first`), the wkv7 kernels inside as custom ops, the chains traced into the block's graph. The
    [1,1,C] parameters go in through functional_call as compile_input views."""

    def __init__(self, backend="inductor"):
        self.compiled = torch.compile(self._train_block, fullgraph=True, dynamic=False, backend=backend)

    @staticmethod
    def _train_block(block, vectors, x, v_first):
        return torch.func.functional_call(block, vectors, (x, v_first))[:2]

    def __call__(self, block, x, v_first):
        vectors = {name: compile_input(p) for name, p in block.named_parameters() if p.dim() == 3}
        return self.compiled(block, vectors, x, v_first)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.first = layer_id == 0   # a bool, so that a compiled block's guards tell only block 0 from the others
        self.fused = cfg.fused
        C = cfg.n_embd
        if self.first:
            self.ln0 = nn.LayerNorm(C)
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)

    def forward(self, x, v_first, state=None):
        """state: None for training, else (att x_prev, att WKV state, ffn x_prev); returns the next state too."""
        fused = self.fused and state is None
        if self.first:
            x = norm(self.ln0, x, fused)
        x_att = norm(self.ln1, x, fused)
        dx, v_first, att_state = self.att(x_att, v_first, None if state is None else state[:2])
        x = x + dx
        x_ffn = norm(self.ln2, x, fused)
        x = x + self.ffn(x_ffn, None if state is None else state[2])
        new_state = None if state is None else (*att_state, x_ffn[:, -1])
        return x, v_first, new_state


class RWKV(pl.LightningModule):
    def __init__(self, cfg: ModelConfig, optim: OptimConfig = None):
        super().__init__()
        cfg.validate()
        self.cfg, self.optim = cfg, optim or OptimConfig()
        C, V = cfg.n_embd, cfg.vocab_size
        self.emb = nn.Embedding(V, C)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_out = nn.LayerNorm(C)
        self.head = nn.Linear(C, V, bias=False)
        self._compiled_block = None
        self._graphed = None

    def forward(self, idx):
        """Logits [B,T,V] for token ids [B,T], from a zero state (evaluation)."""
        return self.head(self.hidden(idx))

    def hidden(self, idx):
        """ln_out of the last block's output, [B,T,C]: what the head reads."""
        x = self.emb(idx)
        if self._replays_cuda_graphs(x):
            return self._graphed_blocks(x)
        return self.blocks_and_ln_out(x)

    def blocks_and_ln_out(self, x):
        v_first = torch.empty_like(x)   # set by block 0
        run_block = self._block_runner(x)
        for block in self.blocks:
            if self.cfg.grad_cp and self.training:
                x, v_first = self._checkpointed(run_block, block, x, v_first)
            else:
                x, v_first = run_block(block, x, v_first)
        return norm(self.ln_out, x, self.cfg.fused)

    def _block_runner(self, x):
        """train_block, compiled whole on the fused CUDA training path (CompiledBlock)."""
        if not (self.training and self.cfg.fused and self.cfg.compile_blocks and x.is_cuda):
            return train_block
        if self._compiled_block is None:
            self._compiled_block = CompiledBlock()
        return self._compiled_block

    def _replays_cuda_graphs(self, x):
        """The fused CUDA training path replays the blocks as CUDA graphs (src/cuda_graph.py). Not under autocast
        (Lightning's bf16 without DeepSpeed): its cache of cast weights would be freed inside a recording."""
        return (self.training and self.cfg.fused and self.cfg.cuda_graph and x.is_cuda and torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cuda"))

    def _graphed_blocks(self, x):
        if self._graphed is None or not self._graphed.fits(x):
            self._graphed = None   # frees the old recording's memory first
            names = [n for n, _ in self.named_parameters() if n.startswith(("blocks.", "ln_out."))]
            try:
                self._graphed = GraphedFunction(self.blocks_and_ln_out, self, names, x)
            except RuntimeError as e:   # CUDA errors included
                raise RuntimeError(f"recording the blocks as CUDA graphs failed: {e}\nTrain with --cuda_graph 0 to "
                                   f"run them eagerly (slower where the host bounds the step)") from e
        return self._graphed(x)

    def zero_state(self, batch_size):
        C, H, N = self.cfg.n_embd, self.cfg.n_head, self.cfg.head_size
        p = self.emb.weight
        return [(p.new_zeros(batch_size, C), torch.zeros(batch_size, H, N, N, device=p.device), p.new_zeros(batch_size, C))
                for _ in self.blocks]

    @torch.no_grad()
    def forward_with_state(self, idx, state):
        """Recurrent evaluation: logits [B,T,V] for idx [B,T] continuing from `state`, and the next state.
        Constant work per token for T = 1 (sampling)."""
        x = self.emb(idx)
        v_first = torch.empty_like(x)
        next_state = []
        for block, block_state in zip(self.blocks, state):
            x, v_first, block_state = block(x, v_first, block_state)
            next_state.append(block_state)
        return self.head(self.ln_out(x)), next_state

    def _checkpointed(self, run_block, block, x, v_first):
        def run(x, v_first):
            return run_block(block, x, v_first)
        if self.cfg.deepspeed_checkpointing and self.cfg.grad_cp == 1:
            import deepspeed
            return deepspeed.checkpointing.checkpoint(run, x, v_first)
        if self.cfg.grad_cp == 1:
            keep = torch.utils.checkpoint.noop_context_fn
        else:
            keep = functools.partial(keep_products, self.cfg.n_embd, keep_wkv7=self.cfg.grad_cp == 2)
        # the model draws no random numbers: nothing to restore for the recomputation (nor to read while recording)
        return torch.utils.checkpoint.checkpoint(run, x, v_first, use_reentrant=False, preserve_rng_state=False,
                                                 context_fn=keep)

    def on_train_batch_start(self, batch, batch_idx):
        # the LR schedule ends the run before a step once its progress reaches 1 (docs/RECIPE.md section 6)
        return -1 if self.trainer.should_stop else None

    def training_step(self, batch, batch_idx):
        """Mean cross-entropy with L2Wrap (docs/RECIPE.md section 5); the fused form never holds all logits."""
        idx, targets = batch
        head_loss = head_loss_chunked if self.cfg.fused else head_loss_reference
        return head_loss(self.hidden(idx), self.head.weight, targets)

    @torch.no_grad()
    def init_weights(self):
        """The matrix init of docs/RECIPE.md section 3, applied over the modules' own init (train_stage 1)."""
        nn.init.uniform_(self.emb.weight, a=-1e-4, b=1e-4)
        V, C = self.head.weight.shape
        nn.init.orthogonal_(self.head.weight, gain=0.5 * math.sqrt(V / C) if V > C else 0.5)
        for block in self.blocks:
            for ln in [block.ln1, block.ln2] + ([block.ln0] if block.first else []):
                nn.init.ones_(ln.weight)
                nn.init.zeros_(ln.bias)
            nn.init.zeros_(block.att.output.weight)
            nn.init.zeros_(block.ffn.value.weight)
            nn.init.orthogonal_(block.att.key.weight, gain=0.1)
            # plain orthogonal, singular values 1: the init stage applies no sqrt(rows/cols) factor, so ffn.key
            # [4C, C] gets K^T K = I (docs/RECIPE.md section 3)
            for m in (block.att.receptance, block.att.value, block.ffn.key):
                nn.init.orthogonal_(m.weight, gain=1.0)
        nn.init.ones_(self.ln_out.weight)
        nn.init.zeros_(self.ln_out.bias)

    def param_groups(self):
        """docs/RECIPE.md section 4: names for lr x1, lr x2 (att.w0) and weight decay."""
        wd, layerwise = self.optim.weight_decay, self.optim.layerwise_lr > 0
        lr_1x, lr_2x, decay = [], [], []
        for name, p in self.named_parameters():
            if "att.w0" in name and layerwise:
                lr_2x.append(name)
            elif wd > 0 and ".weight" in name and p.squeeze().dim() >= 2:
                decay.append(name)
            else:
                lr_1x.append(name)
        return lr_1x, lr_2x, decay

    def configure_optimizers(self):
        o = self.optim
        params = dict(self.named_parameters())
        lr_1x, lr_2x, decay = self.param_groups()
        groups = [
            {"params": [params[n] for n in lr_1x], "weight_decay": 0.0, "my_lr_scale": 1.0},
            {"params": [params[n] for n in lr_2x], "weight_decay": 0.0, "my_lr_scale": 2.0},
        ]
        if o.weight_decay > 0:
            groups.append({"params": [params[n] for n in decay], "weight_decay": o.weight_decay, "my_lr_scale": 1.0})
        groups = [g for g in groups if g["params"]]
        betas, decoupled = (o.beta1, o.beta2), o.weight_decay > 0
        if o.optimizer == "fused":
            from deepspeed.ops.adam import FusedAdam
            return FusedAdam(groups, lr=o.lr_init, betas=betas, eps=o.adam_eps, bias_correction=True,
                             adam_w_mode=decoupled, amsgrad=False)
        if o.optimizer == "cpu_adam":
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            return DeepSpeedCPUAdam(groups, lr=o.lr_init, betas=betas, eps=o.adam_eps, bias_correction=True,
                                    adamw_mode=decoupled, amsgrad=False)
        optimizer_class = torch.optim.AdamW if decoupled else torch.optim.Adam
        return optimizer_class(groups, lr=o.lr_init, betas=betas, eps=o.adam_eps)
