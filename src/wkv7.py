"""The WKV7 recurrence (RECIPE.md section 2): the pure-PyTorch version and the CUDA kernel binding.

Per batch and head, with an N x N state S (row = value channel, column = key channel):
    d_t = exp(-exp(w_t));  s_t = S_{t-1} z_t;  S_t = S_{t-1} * d_t + s_t b_t^T + v_t k_t^T;  y_t = S_t r_t
All tensors are [B, T, H, N]. The PyTorch loop below is both the CPU implementation and the oracle
that every faster implementation is tested against (run it in float64 for that).
"""
import torch

CHUNK_LEN = 16  # the CUDA kernel works on T in multiples of this; callers pad at the end


def wkv7_torch(r, w, k, v, z, b, state=None):
    """Step-by-step WKV7 in float32 (or float64 if the inputs are). Returns (y, final state [B,H,N,N])."""
    B, T, H, N = r.shape
    dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
    r, w, k, v, z, b = (t.to(dtype) for t in (r, w, k, v, z, b))
    decay = torch.exp(-torch.exp(w))
    S = torch.zeros(B, H, N, N, dtype=dtype, device=r.device) if state is None else state.to(dtype)
    ys = []
    for t in range(T):
        s = S @ z[:, t, :, :, None]                                   # [B,H,N,1], the old state
        S = S * decay[:, t, :, None, :] + s @ b[:, t, :, None, :] + v[:, t, :, :, None] @ k[:, t, :, None, :]
        ys.append((S @ r[:, t, :, :, None]).squeeze(-1))
    return torch.stack(ys, dim=1), S


def wkv7(r, w, k, v, z, b):
    """WKV7 over a whole sequence from a zero state; [B,T,H,N] in, y [B,T,H,N] out in r's dtype."""
    y, _ = wkv7_torch(r, w, k, v, z, b)
    return y.to(r.dtype)
