"""GPU: the blocks replayed as CUDA graphs (--cuda_graph 1, src/engine/cuda_graph.py) compute exactly what the same
blocks run eagerly compute, step after step while the weights change in place, and are recorded again when the
input shape changes or the weights move to other memory."""
import collections

import pytest
import torch

from src.config import ModelConfig, PerfConfig
from src.engine.fast_path import GraphedTrunk, apply_fast_path
from src.model import RWKV

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def make_model(cuda_graph, grad_cp, compile_blocks=False):
    """The plain model (bf16, on the GPU) with the fused fast path applied: its blocks replayed as CUDA graphs
    (model.trunk a GraphedTrunk) or run eagerly."""
    torch.manual_seed(0)
    model = RWKV(ModelConfig(n_layer=3, n_embd=256, vocab_size=1000))
    model.init_weights()
    with torch.no_grad():   # off the init, whose zero matrices would hide a wrong gradient
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.dim() < 2 else 0.02))
    model = model.cuda().bfloat16().train()
    apply_fast_path(model, PerfConfig(grad_cp=grad_cp, cuda_graph=cuda_graph, compile_blocks=compile_blocks),
                    torch.device("cuda"))
    assert isinstance(model.trunk, GraphedTrunk) == cuda_graph
    # as DeepSpeed does: a hook per parameter, its gradient node made now on the default stream and kept alive
    model.hook_calls = collections.Counter()
    model.grad_nodes = [p.view_as(p).grad_fn.next_functions[0][0] for p in model.parameters()]
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: model.hook_calls.update([name]))
    return model


def train_steps(model, lengths):
    """(loss, gradients) of SGD steps on random tokens, one per sequence length in `lengths`."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    results = []
    for step, T in enumerate(lengths):
        idx = torch.randint(0, 1000, (4, T), generator=torch.Generator().manual_seed(step)).cuda()
        loss = model.loss(idx, idx.roll(-1, 1))
        loss.backward()
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        results.append((loss.detach().float(), grads))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return results


def assert_same_steps(graphed, eager):
    for step, ((graphed_loss, graphed_grads), (eager_loss, eager_grads)) in enumerate(zip(graphed, eager)):
        assert torch.equal(graphed_loss, eager_loss), f"step {step}: loss {graphed_loss} vs {eager_loss}"
        for a, b in zip(graphed_grads, eager_grads):
            assert (a is None) == (b is None)
            assert a is None or torch.equal(a, b), f"step {step}: gradient differs by {(a - b).abs().max()}"


@pytest.mark.parametrize("grad_cp, compile_blocks", [(0, False), (1, False), (2, False), (3, False), (0, True),
                                                     (1, True)])
def test_graphed_steps_equal_eager_steps(grad_cp, compile_blocks):
    graphed_model = make_model(True, grad_cp, compile_blocks)
    graphed = train_steps(graphed_model, [128] * 3)
    assert graphed_model.trunk.graphed is not None
    eager_model = make_model(False, grad_cp, compile_blocks)
    eager = train_steps(eager_model, [128] * 3)
    assert not isinstance(eager_model.trunk, GraphedTrunk)
    assert_same_steps(graphed, eager)
    assert graphed_model.hook_calls == eager_model.hook_calls and max(eager_model.hook_calls.values()) == 3


def test_grad_cp_2_reuses_the_forward_kernel():
    """--grad_cp 2: the backward reuses each block's wkv7 forward (and matrix products) instead of running it
    again; grad_cp 3 runs it again, as grad_cp 1 does. Both train exactly as grad_cp 1."""
    def forward_kernels_and_steps(grad_cp):
        model = make_model(False, grad_cp)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            steps = train_steps(model, [128])
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return sum(n.startswith("wkv7::") and "fwd_rows_kernel" in n for n in names), steps

    recomputing, recomputed_steps = forward_kernels_and_steps(1)
    reusing, reused_steps = forward_kernels_and_steps(2)
    recomputing_wkv7, products_kept_steps = forward_kernels_and_steps(3)
    assert (recomputing, reusing, recomputing_wkv7) == (6, 3, 6)   # 3 layers
    assert_same_steps(reused_steps, recomputed_steps)
    assert_same_steps(products_kept_steps, recomputed_steps)


def test_gradients_are_the_buffers_and_accumulate_as_eager():
    """The graphed backward's gradient buffers become the parameters' .grad without a copy; kept across steps
    (gradient accumulation, no zero_grad) they still add up exactly as the eager gradients do."""
    accumulated = []
    for cuda_graph in (True, False):
        model = make_model(cuda_graph, 1)
        for step in range(3):
            idx = torch.randint(0, 1000, (4, 128), generator=torch.Generator().manual_seed(step)).cuda()
            model.loss(idx, idx.roll(-1, 1)).backward()
            if cuda_graph and step == 0:
                graphed = model.trunk.graphed
                buffers = {g.data_ptr() for g in graphed.grads[1:]}
                assert all(p.grad.data_ptr() in buffers for p in graphed.params)
        accumulated.append([p.grad for p in model.parameters()])
    for a, b in zip(*accumulated):
        assert (a is None) == (b is None)
        assert a is None or torch.equal(a, b), f"accumulated gradient differs by {(a - b).abs().max()}"


def test_recorded_again_for_a_new_shape_or_moved_weights():
    graphed_model, eager_model = make_model(True, 1), make_model(False, 1)
    graphed, eager = train_steps(graphed_model, [128]), train_steps(eager_model, [128])
    first = graphed_model.trunk.graphed
    graphed += train_steps(graphed_model, [64])
    eager += train_steps(eager_model, [64])
    second = graphed_model.trunk.graphed
    assert second is not first
    for model in (graphed_model, eager_model):   # new memory for every weight, as a strategy's re-layout would give
        for p in model.parameters():
            p.data = p.data.clone()
    graphed += train_steps(graphed_model, [64])
    eager += train_steps(eager_model, [64])
    assert graphed_model.trunk.graphed is not second
    assert_same_steps(graphed, eager)
