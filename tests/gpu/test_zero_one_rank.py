"""One GPU, plain ZeRO-2 (train.py's setting there), src/engine/zero_patches.py installed on the engine's optimizer
(--zero_patches 1): DeepSpeed's average of each gradient bucket over the one rank is left out (the same weights bit
for bit, no bucket flattened; on CPU DeepSpeed's fallback reduction skips CPU tensors altogether, so only a GPU shows
it), and the FusedAdam step runs as one kernel per parameter group (src/kernels/adam_step.py) with the numbers of
DeepSpeed's own code (--zero_patches 0)."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.fixture(scope="module")
def trained():
    from tests.conftest import run
    return json.loads(run(__file__, timeout=900).stdout.strip().splitlines()[-1])


def test_one_rank_skips_the_average_and_trains_the_same(trained):
    average_left_out = trained["average_left_out"]
    assert average_left_out["max_difference"] == 0.0 and average_left_out["max_change_from_init"] > 1e-3
    assert average_left_out["flattened"]["patched"] == 0 < average_left_out["flattened"]["deepspeed"]


def test_one_kernel_step_equals_deepspeeds(trained):
    """Each of 6 steps (lr 1e-2, gradient clipping) from the same weights, moments and gradients: the fp32 weights
    and moments within an ulp or so of DeepSpeed's FusedAdam step (both divide and take the square root
    approximately: DeepSpeed builds FusedAdam with --use_fast_math), the bf16 weights their rounding."""
    steps = trained["one_pass_steps"]
    assert len(steps) == 6 and all(step["groups"] >= 2 for step in steps)
    for step in steps:
        assert step["weights"] <= 1e-6 and step["exp_avg"] <= 1e-6 and step["exp_avg_sq"] <= 1e-6, step
        assert step["bf16_differ"] <= 1e-3 and step["bf16_max"] <= 2 ** -7, step
    assert trained["max_change_from_init"] > 1e-2


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("sizes, view_at, align", [((1, 4097, 768 * 3), 7, 1), ((8, 4104, 768 * 3), 8, 8),
                                                   ((8, 4104, 768 * 3), 4, 1)])
def test_kernel_equals_reference(decoupled, sizes, view_at, align):
    """The kernel against adam_update on gradients of awkward sizes (one element, a block and one, a view into
    another tensor), and of sizes that let it read 8 elements at once, with the view aligned and not."""
    from src.kernels.adam_step import BlockTable, adam_step, adam_update, bias_corrections
    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(5000, device="cuda", generator=g).bfloat16()
    grads = [torch.randn(n, device="cuda", generator=g).bfloat16() for n in sizes]
    grads.append(base.narrow(0, view_at, 999 if align == 1 else 1000))
    table = BlockTable([t.numel() for t in grads], "cuda")
    assert table.grad_offsets(grads)[1] == align
    n = sum(t.numel() for t in grads)
    param, exp_avg = torch.randn(n, device="cuda", generator=g), torch.randn(n, device="cuda", generator=g) * 1e-2
    exp_avg_sq = torch.rand(n, device="cuda", generator=g) * 1e-4
    param_bf16 = torch.empty(n, device="cuda", dtype=torch.bfloat16)
    hyper = dict(lr=6e-4, beta1=0.9, beta2=0.99, eps=1e-18, weight_decay=0.1)
    grad_scale = torch.tensor(0.37, device="cuda")
    expected = adam_update(torch.cat(grads).float() * grad_scale, param, exp_avg, exp_avg_sq,
                           bias_correction1=bias_corrections(0.9, 0.99, 3)[0],
                           bias_correction2=bias_corrections(0.9, 0.99, 3)[1], decoupled=decoupled, **hyper)
    adam_step(grads, grad_scale, param, exp_avg, exp_avg_sq, param_bf16, table, step=3, decoupled=decoupled, **hyper)
    for ours, theirs in zip((param, exp_avg, exp_avg_sq), expected):   # an ulp or so: the order of rounding may differ
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6 * theirs.abs().max().item())
    assert torch.equal(param_bf16, param.bfloat16())


def main():
    import deepspeed

    from tests.test_zero_buckets import zero_optimization
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29400 + os.getpid() % 500), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="nccl")
    zero = zero_optimization("deepspeed_stage_2", 1)   # train.py's
    assert not zero["contiguous_gradients"]

    # torch's Adam: DeepSpeed's step runs in both runs (the one-kernel step covers FusedAdam only), and both take the
    # patched gradient norm: only the average differs
    theirs, init, flattened_theirs = average_run(zero, deepspeed_average=True)
    ours, _, flattened_ours = average_run(zero, deepspeed_average=False)
    average_left_out = {"max_difference": max((p - q).abs().max().item() for p, q in zip(ours, theirs)),
                        "max_change_from_init": max((p - q).abs().max().item() for p, q in zip(ours, init)),
                        "flattened": {"deepspeed": flattened_theirs, "patched": flattened_ours}}
    print(json.dumps({"average_left_out": average_left_out, **step_differences(zero)}), flush=True)


def average_run(zero, deepspeed_average, steps=6):
    """Weights (fp32 copies on the host) after `steps` steps of an engine with src/engine/zero_patches.py installed as
    train.py installs it, with DeepSpeed's own average of each gradient bucket put back if deepspeed_average; the
    initial weights; and how many buckets DeepSpeed flattened to average them."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from src.engine import zero_patches
    from tests.test_zero_buckets import batches, build_engine
    engine, cfg, init = build_engine(zero, "cuda")
    optimizer = engine.optimizer
    assert optimizer.allreduce_and_copy.__func__ is zero_patches.allreduce_and_copy_one_rank
    assert optimizer.step.__func__ is zero_patches.step_one_pass
    assert DeepSpeedZeroOptimizer.allreduce_and_copy is not zero_patches.allreduce_and_copy_one_rank   # per instance
    if deepspeed_average:
        del optimizer.allreduce_and_copy   # the class's method again: DeepSpeed's own
    flattened = []

    def allreduce_bucket(bucket, **kwargs):
        flattened.append(1)
        return DeepSpeedZeroOptimizer.allreduce_bucket(optimizer, bucket, **kwargs)
    optimizer.allreduce_bucket = allreduce_bucket
    for batch in batches(cfg, 0, steps, "cuda"):
        engine.backward(engine.module.training_step(batch, 0))
        engine.step()
    return [p.detach().float().cpu() for p in engine.module.parameters()], init, len(flattened)


def step_differences(zero, steps=6):
    """Two engines from one init on the same batches, one with DeepSpeed's own code (--zero_patches 0), the other with
    src/engine/zero_patches.py's (its one-kernel step) after taking the first's weights and optimizer state: for each
    step, the largest difference of their fp32 weights and moments (relative to the largest value) and how many bf16
    weights differ, and by how much at most."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from src.engine import zero_patches
    from src.kernels import adam_step
    from tests.test_zero_buckets import batches, build_engine
    theirs, cfg, init = build_engine(zero, "cuda", "fused", zero_patches=False)
    ours, _, _ = build_engine(zero, "cuda", "fused")
    assert theirs.optimizer.step.__func__ is DeepSpeedZeroOptimizer.step
    assert ours.optimizer.step.__func__ is zero_patches.step_one_pass
    kernel_groups = []
    kernel_step = adam_step.adam_step
    adam_step.adam_step = lambda *a, **kw: kernel_groups.append(1) or kernel_step(*a, **kw)

    def state(engine):
        opt = engine.optimizer
        moments = [opt.optimizer.state[p] for p in opt.single_partition_of_fp32_groups]
        return {"weights": opt.single_partition_of_fp32_groups, "bf16": opt.bit16_groups_flat,
                "exp_avg": [m.get("exp_avg") for m in moments], "exp_avg_sq": [m.get("exp_avg_sq") for m in moments],
                "adam": moments}

    def relative(a, b):
        return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))

    differences = []
    with torch.no_grad():
        for batch in batches(cfg, 0, steps, "cuda"):
            mine, yours = state(ours), state(theirs)
            for name in ("weights", "bf16", "exp_avg", "exp_avg_sq"):
                for x, y in zip(mine[name], yours[name]):
                    if y is not None:
                        x.copy_(y)
            for x, y in zip(mine["adam"], yours["adam"]):
                if "step" in y:
                    x["step"] = y["step"]
            for engine in (theirs, ours):
                with torch.enable_grad():
                    engine.backward(engine.module.training_step(batch, 0))
                groups = len(kernel_groups)
                engine.step()
            mine, yours = state(ours), state(theirs)
            bf16 = [(x.float() - y.float()).abs() for x, y in zip(mine["bf16"], yours["bf16"])]
            differences.append({name: relative(mine[name], yours[name]) for name in ("weights", "exp_avg", "exp_avg_sq")}
                               | {"bf16_differ": sum((d > 0).sum().item() for d in bf16) / sum(d.numel() for d in bf16),
                                  "bf16_max": max(d.max().item() for d in bf16), "groups": len(kernel_groups) - groups})
    weights = [p.detach().float().cpu() for p in theirs.module.parameters()]
    return {"one_pass_steps": differences,
            "max_change_from_init": max((p - q).abs().max().item() for p, q in zip(weights, init))}


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
