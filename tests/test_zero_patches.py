"""src/engine/zero_patches.py: the multi-tensor gradient norm that replaces DeepSpeed ZeRO-1/2's per-parameter loop gives
its numbers, the average of a gradient bucket is left out over one rank only, and the one-kernel optimizer step's
pieces that run on CPU (src/kernels/adam_step.py: its arithmetic, its block table) are right. The kernel itself and the
step against DeepSpeed's: tests/gpu/test_zero_one_rank.py."""
import types

import pytest
import torch


@pytest.fixture
def one_rank(monkeypatch):
    """A data-parallel group of one rank: its all-reduce leaves the tensor as it is."""
    import deepspeed.comm as dist
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None, group=None, **kwargs: None)


def fake_optimizer():
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    opt = types.SimpleNamespace(model_parallel_rank=0, model_parallel_group=None, dp_process_group=None, device="cpu")
    opt._model_parallel_all_reduce = types.MethodType(DeepSpeedZeroOptimizer._model_parallel_all_reduce, opt)
    return opt


@pytest.mark.parametrize("case", ["finite", "nan", "inf", "empty"])
def test_foreach_norm_equals_deepspeed(one_rank, case):
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from src.engine import zero_patches
    g = torch.Generator().manual_seed(0)
    grads = [] if case == "empty" else [torch.randn(*shape, generator=g).bfloat16() * scale
                                        for shape, scale in [((768, 768), 1e-3), ((1, 1, 768), 2.0), ((12, 64), 1e-6), ((65536, 8), 0.1)]]
    if case in ("nan", "inf"):
        grads[1][0, 0, 3] = float(case)
    params = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
    optimizer = fake_optimizer()
    zero_patches.install(optimizer)
    ours = optimizer.get_grad_norm_direct(grads, params)
    theirs = DeepSpeedZeroOptimizer.get_grad_norm_direct(fake_optimizer(), grads, params)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)   # fp32 sums against DeepSpeed's fp64
    if case in ("nan", "inf"):
        assert ours.item() == -1.0


@pytest.mark.parametrize("ranks", [1, 2])
def test_average_over_one_rank_is_left_out(monkeypatch, ranks):
    """Over one rank (and no sequence parallelism) DeepSpeed's flatten / divide / all-reduce / copy-back of a
    gradient bucket is the identity and is left out; over two ranks DeepSpeed's own code runs."""
    import deepspeed.comm as dist
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from src.engine import zero_patches
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: ranks)
    averaged = []
    monkeypatch.setattr(DeepSpeedZeroOptimizer, "allreduce_and_copy", lambda opt, bucket, **kw: averaged.append(bucket))
    optimizer = types.SimpleNamespace(dp_process_group=None, sequence_parallel_size=1)
    zero_patches.install(optimizer)
    bucket = [torch.randn(3, 4), torch.randn(5)]
    optimizer.allreduce_and_copy(bucket)
    assert averaged == ([] if ranks == 1 else [bucket])


def test_patches_are_installed_on_one_optimizer_only():
    """install() gives one optimizer the replacements as its own methods; DeepSpeed's class, and so every other
    optimizer, keeps DeepSpeed's code."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from src.engine import zero_patches
    before = {name: getattr(DeepSpeedZeroOptimizer, name) for name in ("get_grad_norm_direct", "allreduce_and_copy",
                                                                       "step")}
    optimizer = types.SimpleNamespace()
    zero_patches.install(optimizer)
    assert optimizer.step.__func__ is zero_patches.step_one_pass and optimizer.step.__self__ is optimizer
    assert optimizer.get_grad_norm_direct.__func__ is zero_patches.grad_norm_foreach
    assert {name: getattr(DeepSpeedZeroOptimizer, name) for name in before} == before


@pytest.mark.parametrize("decoupled", [True, False])
def test_adam_update_is_adam(decoupled):
    """src/kernels/adam_step.py's arithmetic (DeepSpeed FusedAdam's, the one-kernel step's reference) over 5 steps equals
    torch's AdamW (decoupled weight decay) or Adam (L2), bias correction included."""
    from src.kernels.adam_step import adam_update, bias_corrections
    g = torch.Generator().manual_seed(0)
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    p0 = torch.randn(1000, generator=g)
    grads = [torch.randn(1000, generator=g) for _ in range(5)]
    theirs = torch.nn.Parameter(p0.clone())
    optimizer = (torch.optim.AdamW if decoupled else torch.optim.Adam)([theirs], **hyper)
    ours, exp_avg, exp_avg_sq = p0.clone(), torch.zeros(1000), torch.zeros(1000)
    for step, grad in enumerate(grads, 1):
        theirs.grad = grad.clone()
        optimizer.step()
        bias_correction1, bias_correction2 = bias_corrections(*hyper["betas"], step)
        ours, exp_avg, exp_avg_sq = adam_update(grad, ours, exp_avg, exp_avg_sq, hyper["lr"], *hyper["betas"],
                                                hyper["eps"], bias_correction1, bias_correction2,
                                                hyper["weight_decay"], decoupled)
    assert (ours - p0).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(exp_avg_sq, optimizer.state[theirs]["exp_avg_sq"], rtol=1e-5, atol=0)


def test_block_table_covers_every_element_once():
    """Each gradient split in blocks of BLOCK elements: every (gradient, element) is in exactly one block, at its
    place in the flat partition."""
    from src.kernels.adam_step import BLOCK, BlockTable
    numels = [1, BLOCK, BLOCK + 1, 3 * BLOCK - 5, 768]
    table = BlockTable(numels, "cpu")
    covered = torch.zeros(sum(numels), dtype=torch.int64)
    for tensor, start in zip(table.tensor.tolist(), table.start.tolist()):
        i = torch.arange(start, min(start + BLOCK, numels[tensor]))
        covered[table.offset[tensor] + i] += 1
    assert table.blocks == sum((n + BLOCK - 1) // BLOCK for n in numels)
    assert torch.equal(covered, torch.ones_like(covered))
    assert table.numel.tolist() == numels


def test_block_table_claims_alignment_only_where_it_holds():
    """The kernel reads 8 elements at once only when every size, and every gradient's distance from the first, is
    a multiple of 8 elements; the offsets it gets locate each gradient."""
    from src.kernels.adam_step import BlockTable
    flat = torch.zeros(4096, dtype=torch.bfloat16)
    aligned = [flat[0:16], flat[64:64 + 768], flat[1024:1032]]
    offsets, align = BlockTable([16, 768, 8], "cpu").grad_offsets(aligned)
    assert (offsets, align) == ([0, 64, 1024], 8)
    shifted = [flat[0:16], flat[68:68 + 768], flat[1024:1032]]   # 8 bytes off
    assert BlockTable([16, 768, 8], "cpu").grad_offsets(shifted) == ([0, 68, 1024], 1)
    odd_size = [flat[0:16], flat[64:64 + 767]]
    assert BlockTable([16, 767], "cpu").grad_offsets(odd_size) == ([0, 64], 1)
