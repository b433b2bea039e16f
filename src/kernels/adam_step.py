"""The Adam update of DeepSpeed's FusedAdam over one ZeRO partition, in one pass over memory.

DeepSpeed's ZeRO step makes the flat fp32 gradient of a partition in three passes (concatenate the bf16
gradients, convert to fp32, multiply by the clipping factor), runs FusedAdam over it, and copies the updated
fp32 weights to the bf16 model weights: five passes. `adam_step` reads each bf16 gradient where autograd left it
(located by its offset from the first one's address), scales it, updates the weights and both moments with
FusedAdam's arithmetic, and writes the bf16 weights, in one Triton kernel. `adam_update` is the same arithmetic
in PyTorch, its reference in tests.
"""
import functools

import torch

BLOCK = 4096  # elements per program; a gradient's last block is masked


def bias_corrections(beta1, beta2, step):
    """FusedAdam's 1 - beta^step: its float betas raised in double (std::pow), then rounded to float by the kernel."""
    def as_float32(x):
        return torch.tensor(x, dtype=torch.float32).item()
    return 1 - as_float32(beta1) ** step, 1 - as_float32(beta2) ** step


def adam_update(grad, param, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, bias_correction1, bias_correction2,
                weight_decay, decoupled):
    """DeepSpeed's multi_tensor_adam on fp32 tensors: returns the new (param, exp_avg, exp_avg_sq).
    decoupled: AdamW's weight decay; else L2 (the decay added to the gradient)."""
    def f32(x):
        return torch.tensor(x, dtype=torch.float32)
    lr, beta1, beta2, eps, bias_correction1, bias_correction2, weight_decay = map(
        f32, (lr, beta1, beta2, eps, bias_correction1, bias_correction2, weight_decay))
    if not decoupled:
        grad = grad + weight_decay * param
    exp_avg = beta1 * exp_avg + (1 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    update = (exp_avg / bias_correction1) / ((exp_avg_sq / bias_correction2).sqrt() + eps)
    if decoupled:
        update = update + weight_decay * param
    return param - lr * update, exp_avg, exp_avg_sq


class BlockTable:
    """Which gradient, and where in it, each program of the kernel works on, for gradients of these sizes (they
    are the same every step, unlike the gradients' addresses)."""

    def __init__(self, numels, device):
        # all sizes multiples of 8 let the kernel move 16 bytes per load (8 bf16 / 4 fp32), where it can count on
        # nothing but single elements otherwise (MiniPile's sizes on an H100: 1.82 against 2.16 ms a step)
        self.align = 8 if all(n % 8 == 0 for n in numels) else 1
        numels = torch.tensor(numels, dtype=torch.int64)
        blocks = (numels + BLOCK - 1) // BLOCK
        first_block = torch.cumsum(blocks, 0) - blocks
        self.tensor = torch.repeat_interleave(torch.arange(len(numels)), blocks)
        self.start = (torch.arange(int(blocks.sum())) - first_block[self.tensor]) * BLOCK
        self.offset = torch.cumsum(numels, 0) - numels
        self.numel = numels
        self.tensor, self.start, self.offset, self.numel = (
            t.to(device) for t in (self.tensor, self.start, self.offset, self.numel))
        self.blocks = len(self.start)

    def grad_offsets(self, grads):
        """Where each bf16 gradient starts, in elements from the first one's address, and the alignment the kernel
        may assume: `align` if every gradient is as aligned as the first (Triton checks that one itself)."""
        base = grads[0].data_ptr()
        offsets = [g.data_ptr() - base for g in grads]
        return [o // 2 for o in offsets], self.align if all(o % (2 * self.align) == 0 for o in offsets) else 1


def adam_step(grads, grad_scale, param, exp_avg, exp_avg_sq, param_bf16, table, lr, beta1, beta2, eps, step,
              weight_decay, decoupled, bias_correction=True):
    """One FusedAdam step of the flat fp32 `param` (with its moments) whose gradient is the bf16 tensors `grads`
    laid end to end, each multiplied by grad_scale (a 0-dim fp32 tensor: 1 / the clipping factor); writes the new
    weights to param_bf16 too. `table`: the BlockTable of the gradients' sizes."""
    bias_correction1, bias_correction2 = bias_corrections(beta1, beta2, step) if bias_correction else (1.0, 1.0)
    grad_offsets, align = table.grad_offsets(grads)
    grad_offsets = torch.tensor(grad_offsets, dtype=torch.int64).pin_memory()   # pinned: a copy that does not wait
    _adam_kernel()[(table.blocks,)](
        grads[0], grad_offsets.to(param.device, non_blocking=True), table.tensor, table.start, table.numel,
        table.offset, param, exp_avg, exp_avg_sq, param_bf16, grad_scale, lr, beta1, beta2, eps, bias_correction1,
        bias_correction2, weight_decay, DECOUPLED=decoupled, BLOCK=BLOCK, ALIGN=align, num_warps=8)


@functools.cache
def _adam_kernel():
    """The Triton kernel, defined on first use (Triton comes with CUDA builds of torch only)."""
    import triton
    import triton.language as tl

    @triton.jit
    def adam_kernel(grads, grad_offsets, block_tensor, block_start, tensor_numel, tensor_offset,
                    param, exp_avg, exp_avg_sq, param_bf16, grad_scale,
                    lr, beta1, beta2, eps, bias_correction1, bias_correction2, weight_decay,
                    DECOUPLED: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
        block = tl.program_id(0)
        tensor = tl.load(block_tensor + block)
        # the hints (sizes, offsets and starts are multiples of ALIGN) let the loads and stores take ALIGN at once
        i = tl.multiple_of(tl.load(block_start + block), BLOCK) + tl.arange(0, BLOCK)
        mask = i < tl.multiple_of(tl.load(tensor_numel + tensor), ALIGN)
        flat = tl.multiple_of(tl.load(tensor_offset + tensor), ALIGN) + i
        grad = grads + tl.multiple_of(tl.load(grad_offsets + tensor), ALIGN) + i
        g = tl.load(grad, mask=mask).to(tl.float32) * tl.load(grad_scale)
        p = tl.load(param + flat, mask=mask)
        m = tl.load(exp_avg + flat, mask=mask)
        v = tl.load(exp_avg_sq + flat, mask=mask)
        if not DECOUPLED:
            g = g + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        update = (m / bias_correction1) / (tl.sqrt(v / bias_correction2) + eps)
        if DECOUPLED:
            update = update + weight_decay * p
        p = p - lr * update
        tl.store(param + flat, p, mask=mask)
        tl.store(exp_avg + flat, m, mask=mask)
        tl.store(exp_avg_sq + flat, v, mask=mask)
        tl.store(param_bf16 + flat, p.to(tl.bfloat16), mask=mask)

    return adam_kernel
