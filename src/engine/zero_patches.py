"""Three pieces of DeepSpeed ZeRO-1/2 replaced by equivalents that launch far fewer kernels or move less memory.
install(optimizer) puts them in place on one DeepSpeedZeroOptimizer (the ZeroPatches callback does, for the
run's optimizer, with --zero_patches 1); every other case, and every other optimizer, keeps DeepSpeed's own code.

The gradient norm (for --grad_clip): DeepSpeedZeroOptimizer.get_grad_norm_direct takes the norm of every
parameter's gradient on its own, each through an fp64 copy: three kernel launches and their Python per parameter
(about 1,200 for L12-D768) every step. grad_norm_foreach computes the same quantity, sqrt of the sum of the
squared per-tensor norms over the data-parallel group (NaN or inf reported as -1, as DeepSpeed does), with
torch._foreach_norm: a few launches in all, summing in fp32 where DeepSpeed sums in fp64 (1e-5 relative at most,
immaterial for a clipping threshold), and without a host sync.

The gradient average on one rank: without contiguous gradient buckets (plain ZeRO-2 on one GPU, train.py)
DeepSpeed averages each bucket of gradients by flattening it into a new tensor, dividing it by the number of
ranks, all-reducing it and copying every gradient back out of it (a copy per parameter). Over one rank that
average is the identity, so allreduce_and_copy_one_rank does nothing there.

The optimizer step on one rank (bf16, FusedAdam, no offload): step_one_pass updates each parameter group with one
kernel (src/kernels/adam_step.py) where DeepSpeed makes the flat fp32 gradient, clips it, runs FusedAdam and copies the
weights to bf16 in five passes over memory. The optimizer state is FusedAdam's own (exp_avg, exp_avg_sq, step of
the flat fp32 partition), so checkpoints and DeepSpeed's other code see no difference.
"""
import types

import deepspeed.comm as dist
import pytorch_lightning as pl
import torch
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer


def grad_norm_foreach(optimizer, gradients, params, norm_type=2):
    if float(norm_type) != 2.0 or optimizer.model_parallel_rank != 0 or \
            any(getattr(p, "ds_pipe_replicated", False) for p in params):
        return DeepSpeedZeroOptimizer.get_grad_norm_direct(optimizer, gradients, params, norm_type)
    if gradients:
        total_norm = torch.stack(torch._foreach_norm(list(gradients), 2.0, dtype=torch.float32)).square().sum()
    else:
        total_norm = torch.zeros((), dtype=torch.float32, device=optimizer.device)
    dist.all_reduce(total_norm, op=dist.ReduceOp.SUM, group=optimizer.dp_process_group)
    optimizer._model_parallel_all_reduce(tensor=total_norm, op=dist.ReduceOp.SUM)
    # NaN or inf -> -1 as DeepSpeed's mask_nan_or_inf_with_val_inplace, which makes its -1 with torch.tensor on
    # the GPU: a copy from pageable memory that waits for the GPU to finish the step so far (3 times a step)
    return total_norm.sqrt().nan_to_num_(nan=-1.0, posinf=-1.0, neginf=-1.0)


def allreduce_and_copy_one_rank(optimizer, small_bucket, rank=None, log=None, divide=True, process_group=None):
    group = optimizer.dp_process_group if process_group is None else process_group
    if dist.get_world_size(group=group) == 1 and optimizer.sequence_parallel_size == 1:
        return
    DeepSpeedZeroOptimizer.allreduce_and_copy(optimizer, small_bucket, rank=rank, log=log, divide=divide,
                                              process_group=process_group)


def one_pass_applies(optimizer):
    """step_one_pass covers one rank, bf16, DeepSpeed's FusedAdam on the GPU, no offload or experts, and bf16
    gradients that fill each partition."""
    from deepspeed.ops.adam import FusedAdam
    groups = range(len(optimizer.bit16_groups))
    return (optimizer.dtype == torch.bfloat16 and not optimizer.cpu_offload and not optimizer.has_moe_layers
            and type(optimizer.optimizer) is FusedAdam and not optimizer.overflow
            and all(dist.get_world_size(group=optimizer.real_dp_process_group[i]) == 1 for i in groups)
            and all(_fills_partition(optimizer.averaged_gradients.get(i), optimizer.single_partition_of_fp32_groups[i])
                    for i in groups))


def _fills_partition(grads, partition):
    return (grads is not None and all(g.dtype == torch.bfloat16 and g.is_cuda and g.is_contiguous() for g in grads)
            and sum(g.numel() for g in grads) == partition.numel())


def step_one_pass(optimizer, closure=None):
    """DeepSpeedZeroOptimizer.step (bf16, one rank), each group's gradient scaling, FusedAdam update and bf16 copy in
    one kernel."""
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

    from src.kernels.adam_step import BlockTable, adam_step
    if not one_pass_applies(optimizer):
        return DeepSpeedZeroOptimizer.step(optimizer, closure)
    optimizer.micro_step_id = INITIAL_MICRO_STEP_ID
    prev_scale = optimizer.loss_scale
    optimizer._update_scale(optimizer.overflow)
    norm = optimizer.scaled_global_norm()
    optimizer._global_grad_norm = norm / prev_scale
    # DeepSpeed's unscale_and_clip_grads, as a factor the kernel applies to each gradient
    combined_scale = optimizer.loss_scale
    if optimizer.clip_grad > 0.:
        clip = torch.clamp(((norm / optimizer.loss_scale) + 1e-6) / optimizer.clip_grad, min=1.0)
        combined_scale = clip * optimizer.loss_scale
    grad_scale = 1. / combined_scale
    if not torch.is_tensor(grad_scale):
        grad_scale = torch.full((), grad_scale, dtype=torch.float32, device=norm.device)
    adam = optimizer.optimizer
    tables = optimizer.__dict__.setdefault("_one_pass_tables", {})
    for i, group in enumerate(adam.param_groups):
        partition, grads = optimizer.single_partition_of_fp32_groups[i], optimizer.averaged_gradients[i]
        numels = tuple(g.numel() for g in grads)
        if tables.get(i, (None,))[0] != numels:
            tables[i] = (numels, BlockTable(numels, partition.device))
        state = adam.state[partition]   # as FusedAdam.step keeps it
        if len(state) == 0:
            state.update(step=group.get("step", 0), exp_avg=torch.zeros_like(partition),
                         exp_avg_sq=torch.zeros_like(partition))
        group.setdefault("step", 0)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        adam_step(grads, grad_scale, partition, state["exp_avg"], state["exp_avg_sq"],
                  optimizer.parallel_partitioned_bit16_groups[i][0], tables[i][1], group["lr"], beta1, beta2,
                  group["eps"], state["step"], group["weight_decay"], decoupled=adam.adam_w_mode == 1,
                  bias_correction=group["bias_correction"])
        optimizer.free_grad_in_param_list(optimizer.params_in_partition[i])
        optimizer.averaged_gradients[i] = None
        optimizer._lazy_init_hp_params_optimizer_state()
    for i in range(len(optimizer.bit16_groups)):
        optimizer._update_model_bit16_weights(i)


def install(optimizer):
    """The three replacements, on this optimizer only (DeepSpeed calls them as its own methods)."""
    optimizer.get_grad_norm_direct = types.MethodType(grad_norm_foreach, optimizer)
    optimizer.allreduce_and_copy = types.MethodType(allreduce_and_copy_one_rank, optimizer)
    optimizer.step = types.MethodType(step_one_pass, optimizer)


class ZeroPatches(pl.Callback):
    """Installs the replacements on the run's ZeRO-1/2 optimizer once DeepSpeed has built it."""

    def on_fit_start(self, trainer, pl_module):
        optimizer = trainer.strategy.deepspeed_engine.optimizer
        if isinstance(optimizer, DeepSpeedZeroOptimizer):
            install(optimizer)
