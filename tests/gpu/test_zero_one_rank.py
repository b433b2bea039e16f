"""One GPU: plain ZeRO-2 without contiguous gradient buckets (train.py's setting there) leaves out DeepSpeed's
average of each gradient bucket over the one rank (src/zero_patches.py): the same weights, bit for bit, and no
bucket flattened. (On CPU DeepSpeed's fallback reduction skips CPU tensors altogether, so only a GPU shows it.)"""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def test_one_rank_skips_the_average_and_trains_the_same():
    from tests.conftest import run
    out = json.loads(run(__file__, timeout=900).stdout.strip().splitlines()[-1])
    assert out["max_difference"] == 0.0 and out["max_change_from_init"] > 1e-3
    assert out["flattened_with_patch"] == 0 < out["flattened_without"]


def train_steps(zero, steps=6):
    """Weights of a small RWKV after `steps` bf16 ZeRO steps on the GPU with this zero_optimization."""
    import dataclasses

    import deepspeed

    from src.config import TrainConfig
    from src.model import RWKV
    cfg = TrainConfig(n_layer=2, n_embd=128, head_size=64, vocab_size=512, ctx_len=64, micro_bsz=4, lr_init=1e-2,
                      cuda_graph=0)
    torch.manual_seed(0)
    model = RWKV(cfg.model_config(), dataclasses.replace(cfg.optim_config(), optimizer="torch"))
    model.init_weights()
    init = [p.detach().float().clone() for p in model.parameters()]
    config = {"train_micro_batch_size_per_gpu": cfg.micro_bsz, "gradient_clipping": 1.0, "bf16": {"enabled": True},
              "zero_allow_untested_optimizer": True, "zero_optimization": {**zero, "reduce_bucket_size": 20000}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=model.configure_optimizers(), config=config)
    tokens = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = torch.randint(0, cfg.vocab_size, (cfg.micro_bsz, cfg.ctx_len + 1), generator=tokens).cuda()
        engine.backward(engine.module.training_step((batch[:, :-1], batch[:, 1:]), 0))
        engine.step()
    return [p.detach().float().cpu() for p in engine.module.parameters()], init


def main():
    import deepspeed
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from src import zero_patches
    from tests.test_zero_buckets import zero_optimization
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29400 + os.getpid() % 500), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="nccl")
    flattened = []   # the buckets DeepSpeed flattens to average them
    allreduce_bucket = DeepSpeedZeroOptimizer.allreduce_bucket
    DeepSpeedZeroOptimizer.allreduce_bucket = lambda self, bucket, **kw: flattened.append(1) or \
        allreduce_bucket(self, bucket, **kw)
    zero = zero_optimization("deepspeed_stage_2", 1)   # train.py's; building its trainer installs the patches
    assert not zero["contiguous_gradients"]
    assert DeepSpeedZeroOptimizer.allreduce_and_copy is zero_patches.allreduce_and_copy_one_rank
    DeepSpeedZeroOptimizer.allreduce_and_copy = zero_patches._deepspeed_allreduce_and_copy
    theirs, init = train_steps(zero)
    flattened_without = len(flattened)
    DeepSpeedZeroOptimizer.allreduce_and_copy = zero_patches.allreduce_and_copy_one_rank
    ours, _ = train_steps(zero)
    print(json.dumps({"max_difference": max((p - q).abs().max().item() for p, q in zip(ours, theirs)),
                      "max_change_from_init": max((p - q).abs().max().item() for p, q in zip(ours, init)),
                      "flattened_with_patch": len(flattened) - flattened_without,
                      "flattened_without": flattened_without}), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
