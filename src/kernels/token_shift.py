"""The token-shift mixes x + (shift(x) - x) * mu_i for several learned mu_i, as two Triton kernels, for the fused path.

The backward is where compiled code lost most (Pile size, one H200: 1.23 ms for the six mixes of a block, about four
times what its memory traffic needs): each mu_i's gradient is a sum over every row of g_i * (shift(x) - x), while
x's gradient, sum_i g_i[t] (1 - mu_i) + g_i[t+1] mu_i, reads the same g_i. Here one pass reads each g_i once (0.64
ms): a program takes a fixed range of rows of a block of columns, writes their x gradient and keeps its share of every
mu_i's gradient in registers, summed over the programs by src/kernels/partial_sums.py. `token_shift_mixes` replaces
`TimeMix.shift_mixes` and `ChannelMix.shift_mix` of src/model/rwkv7.py on the fast path.
"""
import functools

import torch

from src.kernels.partial_sums import cdiv, multiprocessors, row_ranges, sum_partials

# rows and columns per tile and warps per program of the forward and of the backward (which holds a tile per mix), and
# the backward's programs per multiprocessor: the fastest of a sweep on an H200 at the Pile size. Its fewest tiles per
# program: what made the MiniPile size (8,192 rows) gain too, where the programs' fixed costs weigh more.
FORWARD_ROWS, FORWARD_COLUMNS, FORWARD_WARPS = 32, 128, 4
BACKWARD_ROWS, BACKWARD_COLUMNS, BACKWARD_WARPS, PROGRAMS_PER_SM, MIN_TILES = 4, 256, 4, 8, 16


def backward_programs(rows, column_blocks, device):
    """How many row ranges the backward splits the rows into at most: with the column blocks, enough programs to fill
    the GPU several times over, few enough that their partial sums are small next to the rows themselves (and that
    each program's fixed costs spread over MIN_TILES tiles at least)."""
    return min(cdiv(PROGRAMS_PER_SM * multiprocessors(device), column_blocks), cdiv(rows, MIN_TILES * BACKWARD_ROWS))


class TokenShiftMixes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, *mus):
        B, T, C = x.shape
        x2 = x.contiguous().view(B * T, C)
        mus = tuple(m.contiguous() for m in mus)
        out_dtype = torch.promote_types(x.dtype, mus[0].dtype)
        outs = tuple(torch.empty(B, T, C, dtype=out_dtype, device=x.device) for _ in mus)
        grid = (cdiv(B * T, FORWARD_ROWS), cdiv(C, FORWARD_COLUMNS))
        _kernels().forward[grid](x2, mus, outs, B * T, T, C, MIXES=len(mus), ROWS=FORWARD_ROWS,
                                 BLOCK_C=FORWARD_COLUMNS, num_warps=FORWARD_WARPS)
        ctx.save_for_backward(x2, *mus)
        ctx.x_shape = x.shape
        return outs

    @staticmethod
    def backward(ctx, *grads):
        x2, *mus = ctx.saved_tensors
        M, C = x2.shape
        column_blocks = cdiv(C, BACKWARD_COLUMNS)
        programs, rows_per_program = row_ranges(M, BACKWARD_ROWS, backward_programs(M, column_blocks, x2.device))
        grad_x = torch.empty_like(x2)
        partial = torch.empty(programs, len(mus), C, dtype=torch.float32, device=x2.device)   # each mu's shares
        _kernels().backward[(programs, column_blocks)](
            x2, tuple(mus), tuple(g.contiguous() for g in grads), grad_x, partial, M, ctx.x_shape[1], C,
            rows_per_program, MIXES=len(mus), ROWS=BACKWARD_ROWS, BLOCK_C=BACKWARD_COLUMNS, num_warps=BACKWARD_WARPS)
        grad_mus = tuple(torch.empty_like(m) for m in mus)
        sum_partials(partial, grad_mus)
        return (grad_x.view(ctx.x_shape), *grad_mus)


def token_shift_mixes(x, x_prev, *mus):
    """x + (shift(x) - x) * mu for each mu ([1,1,C]) of x [B,T,C] on CUDA, from a zero state (x_prev None): computed
    in fp32, each returned in x's and mu's promoted dtype."""
    if x_prev is not None:
        raise ValueError("token_shift_mixes runs from a zero state only; decoding with a state runs the plain form")
    return TokenShiftMixes.apply(x, *mus)


def token_shift_mix(x, x_prev, mu):
    return token_shift_mixes(x, x_prev, mu)[0]


@functools.cache
def _kernels():
    """The Triton kernels, defined on first use (Triton comes with CUDA builds of torch only)."""
    import types

    import triton
    import triton.language as tl

    @triton.jit
    def forward(x, mus, outs, M, T, C, MIXES: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        mask = (rows < M)[:, None] & col_ok[None, :]
        at = rows[:, None] * C + cols[None, :]
        xs = tl.load(x + at, mask=mask, other=0.0).to(tl.float32)
        has_prev = mask & (rows % T != 0)[:, None]           # shift(x) is zero at each sequence's first token
        xx = tl.load(x + at - C, mask=has_prev, other=0.0).to(tl.float32) - xs
        for i in tl.static_range(MIXES):
            m = tl.load(mus[i] + cols, mask=col_ok, other=0.0).to(tl.float32)
            out = xs + xx * m[None, :]
            tl.store(outs[i] + at, out.to(outs[i].dtype.element_ty), mask=mask)

    @triton.jit
    def backward(x, mus, grads, grad_x, partial_mu, M, T, C, rows_per_program, MIXES: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_C: tl.constexpr):
        program = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        acc_mu = (tl.zeros([ROWS, BLOCK_C], dtype=tl.float32),) * MIXES   # this program's share of each mu's gradient
        first = program.to(tl.int64) * rows_per_program
        end = tl.minimum(first + rows_per_program, M)
        for start in range(first, end, ROWS):
            rows = start + tl.arange(0, ROWS)
            mask = (rows < end)[:, None] & col_ok[None, :]
            at = rows[:, None] * C + cols[None, :]
            xs = tl.load(x + at, mask=mask, other=0.0).to(tl.float32)
            xx = tl.load(x + at - C, mask=mask & (rows % T != 0)[:, None], other=0.0).to(tl.float32) - xs
            has_next = mask & ((rows + 1) % T != 0)[:, None]  # x[t] is shift(x)[t+1] within the sequence only
            dx = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
            next_acc_mu = ()
            for i in tl.static_range(MIXES):
                m = tl.load(mus[i] + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                g = tl.load(grads[i] + at, mask=mask, other=0.0).to(tl.float32)
                g_next = tl.load(grads[i] + at + C, mask=has_next, other=0.0).to(tl.float32)
                dx += g * (1.0 - m) + g_next * m
                next_acc_mu = next_acc_mu + (acc_mu[i] + g * xx,)
            acc_mu = next_acc_mu
            tl.store(grad_x + at, dx.to(grad_x.dtype.element_ty), mask=mask)
        for i in tl.static_range(MIXES):
            tl.store(partial_mu + (program * MIXES + i) * C + cols, tl.sum(acc_mu[i], axis=0), mask=col_ok)

    return types.SimpleNamespace(forward=forward, backward=backward)
