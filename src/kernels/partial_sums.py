"""The row split and the last step shared by the Triton backward kernels whose programs each own a fixed range of rows
and keep their share of some per-column gradients (src/kernels/layer_norm.py, src/kernels/token_shift.py): each program writes its
shares as one row of a [programs, K, C] fp32 buffer, and one small kernel sums its rows. The ranges are fixed, so the
sums are the same on every run."""
import functools

import torch

SUM_COLUMNS = 16   # columns per program of the sum: the fastest of a sweep on an H200 at both recipe sizes


def cdiv(a, b):
    return -(-a // b)


def multiprocessors(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def row_ranges(rows, tile_rows, programs):
    """`rows` split into at most `programs` ranges of whole tiles: (how many ranges, rows per range)."""
    programs = max(1, min(cdiv(rows, tile_rows), programs))
    rows_per_program = cdiv(cdiv(rows, programs), tile_rows) * tile_rows
    return cdiv(rows, rows_per_program), rows_per_program


def sum_partials(partial, outs):
    """outs[k][c] = sum over p of partial[p, k, c], for partial [P, K, C] fp32 and K contiguous C-element outs, each
    written in its own dtype."""
    P, K, C = partial.shape
    _kernel()[(cdiv(C, SUM_COLUMNS), K)](partial, tuple(outs), P, C, K=K, BLOCK_P=4096 // SUM_COLUMNS,
                                         BLOCK_C=SUM_COLUMNS, num_warps=4)


@functools.cache
def _kernel():
    """The Triton kernel, defined on first use (Triton comes with CUDA builds of torch only)."""
    import triton
    import triton.language as tl

    @triton.jit
    def sum_partials_kernel(partial, outs, P, C, K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        k = tl.program_id(1)
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for start in range(0, P, BLOCK_P):
            rows = start + tl.arange(0, BLOCK_P)
            mask = (rows < P)[:, None] & col_ok[None, :]
            acc += tl.load(partial + (rows[:, None] * K + k) * C + cols[None, :], mask=mask, other=0.0)
        total = tl.sum(acc, axis=0)
        for out_k in tl.static_range(K):   # a tuple takes only constant indices
            if k == out_k:
                tl.store(outs[out_k] + cols, total.to(outs[out_k].dtype.element_ty), mask=col_ok)

    return sum_partials_kernel
