"""Two pieces of DeepSpeed ZeRO-1/2 replaced by equivalents that launch far fewer kernels, in a step that is bound
by launch overhead. install() puts them in place; every other case keeps DeepSpeed's own code.

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
"""
import deepspeed.comm as dist
import torch

_deepspeed_grad_norm = None
_deepspeed_allreduce_and_copy = None


def grad_norm_foreach(optimizer, gradients, params, norm_type=2):
    if float(norm_type) != 2.0 or optimizer.model_parallel_rank != 0 or \
            any(getattr(p, "ds_pipe_replicated", False) for p in params):
        return _deepspeed_grad_norm(optimizer, gradients, params, norm_type)
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
    _deepspeed_allreduce_and_copy(optimizer, small_bucket, rank=rank, log=log, divide=divide,
                                  process_group=process_group)


def install():
    global _deepspeed_grad_norm, _deepspeed_allreduce_and_copy
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    if _deepspeed_grad_norm is None:
        _deepspeed_grad_norm = DeepSpeedZeroOptimizer.get_grad_norm_direct
        _deepspeed_allreduce_and_copy = DeepSpeedZeroOptimizer.allreduce_and_copy
        DeepSpeedZeroOptimizer.get_grad_norm_direct = grad_norm_foreach
        DeepSpeedZeroOptimizer.allreduce_and_copy = allreduce_and_copy_one_rank
