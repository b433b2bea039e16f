"""RWKV-7 ("x070") in plain PyTorch, top to bottom as docs/RECIPE.md sections 1, 2, 3 and 5 tell it.

This file is the single source of truth for the math. Faster forms of some of its functions (the CUDA wkv7 kernel,
Triton kernels, compiled chains, CUDA graphs) are installed from outside by src/engine/fast_path.py, which checks
each against the function here before the first step and refuses to train when they differ. Edit the math here;
the staticmethods are the pieces the fast path may replace, each named for what it computes.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.config import ModelConfig


# ---- section 1: token shift ------------------------------------------------------------------------------------

def token_shift(x, x_prev=None):
    """shift(x) - x, where shift(x)[t] = x[t-1] and shift(x)[0] = 0, or the previous call's last token x_prev [B,C]
    when decoding with a state."""
    if x_prev is None:
        return F.pad(x, (0, 0, 1, -1)) - x
    return torch.cat((x_prev.unsqueeze(1), x[:, :-1]), dim=1) - x


# ---- section 2: the WKV7 recurrence ----------------------------------------------------------------------------

def wkv7_recurrence(r, w, k, v, z, b, state=None):
    """Step by step, per batch and head, with an N x N state S (row: value channel, column: key channel):
    d_t = exp(-exp(w_t)); s_t = S_{t-1} z_t; S_t = S_{t-1} * d_t + s_t b_t^T + v_t k_t^T; y_t = S_t r_t.
    [B,T,H,N] in, computed in float32 (float64 for float64 inputs); returns (y, the last state [B,H,N,N])."""
    B, T, H, N = r.shape
    dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
    r, w, k, v, z, b = (t.to(dtype) for t in (r, w, k, v, z, b))
    decay = torch.exp(-torch.exp(w))
    S = torch.zeros(B, H, N, N, dtype=dtype, device=r.device) if state is None else state.to(dtype)
    ys = []
    # unbind: per-step views whose backward stacks once, instead of a full-size zero tensor per step
    for r_t, d_t, k_t, v_t, z_t, b_t in zip(*(x.unbind(1) for x in (r, decay, k, v, z, b))):
        s = S @ z_t.unsqueeze(-1)                                     # [B,H,N,1], the old state
        # S * d + s b^T + v k^T, the two outer products as one rank-2 batched product
        S = torch.baddbmm((S * d_t.unsqueeze(-2)).flatten(0, 1), torch.cat((s, v_t.unsqueeze(-1)), -1).flatten(0, 1),
                          torch.stack((b_t, k_t), -2).flatten(0, 1)).view(B, H, N, N)
        ys.append((S @ r_t.unsqueeze(-1)).squeeze(-1))
    return torch.stack(ys, dim=1), S


# ---- section 1: time mix ---------------------------------------------------------------------------------------

def orthogonal_(matrix, scale):
    """docs/RECIPE.md section 3's ortho(M, s), the constructor's init of w2/a2/v2/g2: orthogonal with gain
    s * sqrt(rows/cols) when rows > cols."""
    rows, cols = matrix.shape
    return nn.init.orthogonal_(matrix, gain=scale * (math.sqrt(rows / cols) if rows > cols else 1.0))


class TimeMix(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.first = layer_id == 0
        self.head_size = cfg.head_size
        C, H, N, L = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.n_layer
        D_w, D_a, D_v, D_g = cfg.lora_dims
        r1 = 1.0 - layer_id / L                             # 1 to almost 0
        r0 = layer_id / (L - 1) if L > 1 else 0.0           # 0 to 1
        ddd = torch.arange(C, dtype=torch.float32) / C
        n = torch.arange(C, dtype=torch.float32)

        def vector(values):
            return nn.Parameter(values.reshape(1, 1, C).clone())

        self.x_r = vector(1.0 - ddd ** (0.2 * r1))
        self.x_w = vector(1.0 - ddd ** (0.9 * r1))
        self.x_k = vector(1.0 - (ddd ** (0.9 * r1) + 0.4 * r0))
        self.x_v = vector(1.0 - (ddd ** (0.4 * r1) + 0.6 * r0))
        self.x_a = vector(1.0 - ddd ** (0.9 * r1))
        self.x_g = vector(1.0 - ddd ** (0.2 * r1))
        self.w0 = vector(-7.0 + 5.0 * (n / (C - 1)) ** (0.85 + 1.0 * r0 ** 0.5) + 0.5)
        self.w1 = nn.Parameter(torch.zeros(C, D_w))
        self.w2 = nn.Parameter(orthogonal_(torch.empty(D_w, C), 0.1))
        self.a0 = vector(torch.zeros(C))
        self.a1 = nn.Parameter(torch.zeros(C, D_a))
        self.a2 = nn.Parameter(orthogonal_(torch.empty(D_a, C), 0.1))
        self.v0 = vector(torch.ones(C))    # layer 0 owns v0/v1/v2 unused, so that every block has the same keys
        self.v1 = nn.Parameter(torch.zeros(C, D_v))
        self.v2 = nn.Parameter(orthogonal_(torch.empty(D_v, C), 0.1))
        self.g1 = nn.Parameter(torch.zeros(C, D_g))
        self.g2 = nn.Parameter(orthogonal_(torch.empty(D_g, C), 0.1))
        self.k_k = vector(torch.full((C,), 0.85))
        self.k_a = vector(torch.ones(C))
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)
        with torch.no_grad():
            self.ln_x.weight.fill_(((1 + layer_id) / L) ** 0.7)

    def forward(self, x, v_first, state=None):
        """x [B,T,C] -> (output, v_first, next state). state: None when training from a zero state, else
        (last input token [B,C], WKV state [B,H,N,N]) when decoding."""
        B, T, C = x.shape
        xr, xw, xk, xv, xa, xg = self.shift_mixes(x, None if state is None else state[0],
                                                  self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g)
        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        if self.first:
            v_first, v_lora = v, None
        else:
            v_lora = (xv @ self.v1) @ self.v2
        w, k, v, z, b = self.wkv_inputs(k, v, v_first, torch.tanh(xw @ self.w1) @ self.w2, (xa @ self.a1) @ self.a2,
                                        v_lora, self.w0, self.a0, self.v0, self.k_k, self.k_a, self.head_size)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        r = r.view(B, T, -1, self.head_size)
        if state is None:
            y, next_state = self.wkv(r, w, k, v, z, b), None
        else:
            y, wkv_state = wkv7_recurrence(r, w, k, v, z, b, state[1])
            y, next_state = y.to(x.dtype), (x[:, -1], wkv_state)
        y = self.wkv_output(y, r, k, v, g, self.r_k, self.ln_x.weight, self.ln_x.bias, self.ln_x.eps)
        return self.output(y), v_first, next_state

    @staticmethod
    def shift_mixes(x, x_prev, *mus):
        """x + (shift(x) - x) * mu for each of the six mixes: the inputs of r, w, k, v, a and g."""
        xx = token_shift(x, x_prev)
        return tuple(x + xx * mu for mu in mus)

    @staticmethod
    def wkv_inputs(k, v, v_first, w_lora, a_lora, v_lora, w0, a0, v0, k_k, k_a, head_size):
        """The WKV7 inputs besides r, as [B,T,H,N]: the decay w, the key k with the in-context learning rate a mixed
        in, the value v (with the value residual from layer 0 unless v_lora is None), z = -kk and b = kk * a."""
        B, T, _ = k.shape
        w = -F.softplus(-(w0 + w_lora)) - 0.5                     # soft clamp to (-inf, -0.5)
        if v_lora is not None:
            v = v + (v_first - v) * torch.sigmoid(v0 + v_lora)    # value residual
        a = torch.sigmoid(a0 + a_lora)                            # in-context learning rate
        kk = F.normalize((k * k_k).view(B, T, -1, head_size), dim=-1, p=2.0, eps=1e-12)
        k = k * (1 + (a - 1) * k_a)
        w, k, v, a = (t.view(B, T, -1, head_size) for t in (w, k, v, a))
        return w, k, v, -kk, kk * a

    @staticmethod
    def wkv(r, w, k, v, z, b):
        """WKV7 over whole sequences from a zero state (section 2), y in r's dtype."""
        return wkv7_recurrence(r, w, k, v, z, b)[0].to(r.dtype)

    @staticmethod
    def wkv_output(y, r, k, v, g, r_k, ln_weight, ln_bias, eps):
        """GroupNorm per head ("ln_x"), plus the bonus (r . k * r_k summed per head) times v, times the gate g."""
        B, T, H, N = r.shape
        y = F.group_norm(y.reshape(B * T, H * N), H, ln_weight, ln_bias, eps).view(B, T, H, N)
        y = y + (r * k * r_k).sum(dim=-1, keepdim=True) * v
        return y.view(B, T, H * N) * g


# ---- section 1: channel mix ------------------------------------------------------------------------------------

class ChannelMix(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        ddd = (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)
        self.x_k = nn.Parameter(1.0 - ddd ** ((1.0 - layer_id / cfg.n_layer) ** 4))
        self.key = nn.Linear(C, cfg.dim_ffn, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, C, bias=False)

    def forward(self, x, x_prev=None):
        return self.value(self.relu_square(self.key(self.shift_mix(x, x_prev, self.x_k))))

    @staticmethod
    def shift_mix(x, x_prev, x_k):
        return x + token_shift(x, x_prev) * x_k

    @staticmethod
    def relu_square(k):
        return torch.relu(k) ** 2


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.first = layer_id == 0
        if self.first:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)

    def forward(self, x, v_first, state=None):
        """state: None for training, else (att's last token, att's WKV state, ffn's last token) when decoding;
        returns (x, v_first, next state)."""
        if self.first:
            x = self.ln0(x)
        dx, v_first, att_state = self.att(self.ln1(x), v_first, None if state is None else state[:2])
        x = x + dx
        x_ffn = self.ln2(x)
        x = x + self.ffn(x_ffn, None if state is None else state[2])
        return x, v_first, None if state is None else (*att_state, x_ffn[:, -1])


# ---- section 5: the loss ---------------------------------------------------------------------------------------

L2WRAP_FACTOR = 1e-4


class L2Wrap(torch.autograd.Function):
    """Identity on the loss; in backward, adds max_logit * 1e-4 / (B*T) to each position's argmax logit."""

    @staticmethod
    def forward(ctx, loss, logits):
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (logits,) = ctx.saved_tensors
        factor = L2WRAP_FACTOR / (logits.shape[0] * logits.shape[1])
        max_logit, argmax = torch.max(logits, -1, keepdim=True)
        return grad_output, torch.zeros_like(logits).scatter_(-1, argmax, max_logit * factor)


# ---- the model -------------------------------------------------------------------------------------------------

class RWKV(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, idx):
        """Logits [B,T,V] for token ids [B,T], from a zero state."""
        return self.head(self.hidden(idx))

    def hidden(self, idx):
        """ln_out of the last block's output [B,T,C], what the head reads."""
        return self.trunk(self.emb(idx))

    def trunk(self, x):
        """The blocks and ln_out, from a zero state."""
        v_first = torch.empty_like(x)   # set by block 0
        for block in self.blocks:
            x, v_first, _ = block(x, v_first)
        return self.ln_out(x)

    def loss(self, idx, targets):
        """The training loss of token ids idx [B,T] against targets [B,T]."""
        return self.head_loss(self.hidden(idx), self.head.weight, targets)

    @staticmethod
    def head_loss(x, head_weight, targets):
        """Mean cross-entropy of head(x) [B,T,V] with the L2Wrap gradient (section 5). The softmax runs in fp32 at
        least: on bf16 logits F.cross_entropy would round the loss itself to bf16."""
        logits = F.linear(x, head_weight)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).to(torch.promote_types(logits.dtype, torch.float32)),
                               targets.reshape(-1))
        return L2Wrap.apply(loss, logits)

    def zero_state(self, batch_size):
        C, H, N = self.cfg.n_embd, self.cfg.n_head, self.cfg.head_size
        p = self.emb.weight
        return [(p.new_zeros(batch_size, C), torch.zeros(batch_size, H, N, N, device=p.device),
                 p.new_zeros(batch_size, C)) for _ in self.blocks]

    @torch.no_grad()
    def forward_with_state(self, idx, state):
        """Recurrent evaluation: logits [B,T,V] for idx [B,T] continuing from `state`, and the next state (constant
        work per token for T = 1, as sampling does)."""
        x = self.emb(idx)
        v_first = torch.empty_like(x)
        next_state = []
        for block, block_state in zip(self.blocks, state):
            x, v_first, block_state = block(x, v_first, block_state)
            next_state.append(block_state)
        return self.head(self.ln_out(x)), next_state

    @torch.no_grad()
    def init_weights(self):
        """Section 3's matrix init, applied over the modules' own (what --train_stage 1 writes)."""
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
            # [4C, C] gets K^T K = I (docs/RECIPE.md section 3.4)
            for m in (block.att.receptance, block.att.value, block.ffn.key):
                nn.init.orthogonal_(m.weight, gain=1.0)
        nn.init.ones_(self.ln_out.weight)
        nn.init.zeros_(self.ln_out.bias)
