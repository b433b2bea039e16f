"""LayerNorm over the last dimension as two Triton kernels (forward, backward) plus a small sum, for the fused path.

The backward is where the time goes: the weight and bias gradients are sums over every row. Each program of the
backward kernel takes a fixed range of rows, writes their input gradient, and keeps its share of the weight and bias
gradients in registers, summed over the programs by src/kernels/partial_sums.py. `layer_norm_triton` replaces
`nn.LayerNorm.forward` (F.layer_norm) on the fast path.
"""
import functools

import torch

from src.kernels.partial_sums import cdiv, multiprocessors, row_ranges, sum_partials

# rows per tile and warps per program, and the backward's programs per multiprocessor: the fastest of a sweep on an
# H200 at both recipe sizes (C 768 and 1024)
FORWARD_ROWS, FORWARD_WARPS = 2, 2
BACKWARD_ROWS, BACKWARD_WARPS, PROGRAMS_PER_SM = 2, 4, 4


def backward_programs(device):
    """How many programs share the backward's rows at most: enough to fill the GPU several times over, few enough that
    their partial sums are small next to the rows themselves."""
    return PROGRAMS_PER_SM * multiprocessors(device)


class LayerNorm(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)   # as F.layer_norm under autocast: fp32
    def forward(ctx, x, weight, bias, eps):
        C = x.shape[-1]
        x2 = x.reshape(-1, C)
        M = x2.shape[0]
        y = torch.empty_like(x2)
        mean = torch.empty(M, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        kernels = _kernels()
        kernels.forward[(cdiv(M, FORWARD_ROWS),)](x2, weight, bias, y, mean, rstd, M, C, eps, ROWS=FORWARD_ROWS,
                                                  BLOCK_C=kernels.next_power_of_2(C), num_warps=FORWARD_WARPS)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.x_shape, ctx.bias_dtype = x.shape, bias.dtype
        return y.view(x.shape)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_y):
        x2, weight, mean, rstd = ctx.saved_tensors
        M, C = x2.shape
        grad_y = grad_y.reshape(M, C).contiguous()
        grad_x = torch.empty_like(x2)
        programs, rows_per_program = row_ranges(M, BACKWARD_ROWS, backward_programs(x2.device))
        partial = torch.empty(programs, 2, C, dtype=torch.float32, device=x2.device)   # weight's, bias's shares
        kernels = _kernels()
        kernels.backward[(programs,)](x2, weight, grad_y, mean, rstd, grad_x, partial, M, C, rows_per_program,
                                      ROWS=BACKWARD_ROWS, BLOCK_C=kernels.next_power_of_2(C), num_warps=BACKWARD_WARPS)
        grad_w = torch.empty_like(weight)
        grad_b = torch.empty(C, dtype=ctx.bias_dtype, device=weight.device)
        sum_partials(partial, (grad_w, grad_b))
        return grad_x.view(ctx.x_shape), grad_w, grad_b, None


def layer_norm_triton(x, weight, bias, eps):
    """F.layer_norm(x, x.shape[-1:], weight, bias, eps) for CUDA x, computed in fp32, returned in x's dtype (in fp32
    under autocast, as F.layer_norm)."""
    return LayerNorm.apply(x.contiguous(), weight, bias, eps)


@functools.cache
def _kernels():
    """The Triton kernels, defined on first use (Triton comes with CUDA builds of torch only)."""
    import types

    import triton
    import triton.language as tl

    @triton.jit
    def forward(x, weight, bias, y, mean_out, rstd_out, M, C, eps, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_C)
        row_ok = rows < M
        mask = row_ok[:, None] & (cols < C)[None, :]
        at = rows[:, None] * C + cols[None, :]
        xs = tl.load(x + at, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(xs, axis=1) / C
        centered = tl.where(mask, xs - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / C + eps)
        w = tl.load(weight + cols, mask=cols < C, other=0.0).to(tl.float32)
        b = tl.load(bias + cols, mask=cols < C, other=0.0).to(tl.float32)
        out = centered * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(y + at, out.to(y.dtype.element_ty), mask=mask)
        tl.store(mean_out + rows, mean, mask=row_ok)
        tl.store(rstd_out + rows, rstd, mask=row_ok)

    @triton.jit
    def backward(x, weight, grad_y, mean_in, rstd_in, grad_x, partial, M, C, rows_per_program,
                 ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        program = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < C
        w = tl.load(weight + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc_w = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
        acc_b = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
        first = program.to(tl.int64) * rows_per_program
        end = tl.minimum(first + rows_per_program, M)
        for start in range(first, end, ROWS):
            rows = start + tl.arange(0, ROWS)
            row_ok = rows < end
            mask = row_ok[:, None] & col_ok[None, :]
            at = rows[:, None] * C + cols[None, :]
            xs = tl.load(x + at, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(grad_y + at, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_in + rows, mask=row_ok, other=0.0)
            rstd = tl.load(rstd_in + rows, mask=row_ok, other=0.0)
            x_hat = tl.where(mask, (xs - mean[:, None]) * rstd[:, None], 0.0)
            w_dy = w[None, :] * dy
            # d/dx of (x - mean) * rstd, applied to w * dy: its mean and its projection on x_hat removed
            c1 = tl.sum(x_hat * w_dy, axis=1) / C
            c2 = tl.sum(w_dy, axis=1) / C
            dx = (w_dy - (x_hat * c1[:, None] + c2[:, None])) * rstd[:, None]
            tl.store(grad_x + at, dx.to(grad_x.dtype.element_ty), mask=mask)
            acc_w += dy * x_hat
            acc_b += dy
        tl.store(partial + 2 * program * C + cols, tl.sum(acc_w, axis=0), mask=col_ok)
        tl.store(partial + (2 * program + 1) * C + cols, tl.sum(acc_b, axis=0), mask=col_ok)

    return types.SimpleNamespace(forward=forward, backward=backward, next_power_of_2=triton.next_power_of_2)
