"""The fast path applied from outside (src/engine/fast_path.py) on CPU: the chunked loss and the compiled chains
against the model's plain functions, checkpointing (grad_cp) and compiled blocks training exactly as the plain
blocks, the guard that refuses a twin which no longer matches its plain function, and the training module's
optimizer groups (docs/RECIPE.md section 4). The Triton twins run in Triton's interpreter in
tests/test_triton_interpreted.py; on the GPU in tests/gpu."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from src.config import ConfigError, OptimConfig, PerfConfig, build_config, flag_defaults
from src.engine import fast_path
from src.engine.fast_path import CompiledBlock, FastPathMismatch, GraphedTrunk, Twin, TrainingBlock, apply_fast_path
from src.kernels.head_loss import head_loss_chunked
from src.model.rwkv7 import RWKV, ChannelMix, TimeMix
from src.train.lightning_module import TrainingModule, param_groups
from tests.chains import CHAINS, chain_inputs, outputs_and_grads, plain
from tests.test_model import make_model

CPU = torch.device("cpu")


def with_fast_path(model, **perf):
    return apply_fast_path(model, PerfConfig(**perf), CPU)


def test_param_groups():
    model = make_model(perturb=False)
    names = dict(model.named_parameters())
    lr_1x, lr_2x, decay = param_groups(model, OptimConfig())
    assert lr_2x == [n for n in names if n.endswith("att.w0")] and len(lr_2x) == 2
    assert decay == [] and set(lr_1x) == set(names) - set(lr_2x)

    lr_1x, lr_2x, decay = param_groups(model, OptimConfig(weight_decay=0.1))
    matrices = {"emb.weight", "head.weight"} | {f"blocks.{l}.{m}.weight" for l in range(2) for m in
                                                ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")}
    assert set(decay) == matrices
    assert "blocks.0.att.w1" in lr_1x and "blocks.1.ln1.weight" in lr_1x and "blocks.0.att.ln_x.weight" in lr_1x
    assert set(lr_1x) | set(lr_2x) | set(decay) == set(names)

    optim = OptimConfig(weight_decay=0.1, layerwise_lr=0)
    lr_1x, lr_2x, decay = param_groups(model, optim)
    assert lr_2x == [] and "blocks.0.att.w0" in lr_1x
    opt = TrainingModule(model, optim).configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["my_lr_scale"] for g in opt.param_groups] == [1.0, 1.0]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.1]


@pytest.mark.parametrize("chunk_tokens", [7, 48, 1000])
def test_chunked_head_loss_equals_plain(chunk_tokens):
    torch.manual_seed(0)
    B, T, C, V = 3, 16, 32, 97
    x = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(V, C, dtype=torch.float64) * 0.5).requires_grad_()
    targets = torch.randint(0, V, (B, T))
    loss_ref = RWKV.head_loss(x, w, targets)
    gx_ref, gw_ref = torch.autograd.grad(loss_ref, (x, w))
    loss = head_loss_chunked(x, w, targets, chunk_tokens)
    gx, gw = torch.autograd.grad(loss, (x, w))
    assert torch.allclose(loss, loss_ref, rtol=1e-12)
    assert torch.allclose(gx, gx_ref, rtol=1e-10, atol=1e-12) and torch.allclose(gw, gw_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_tokens", [16, 1000])
def test_chunked_head_loss_under_autocast(chunk_tokens):
    """Lightning's bf16 without DeepSpeed runs the step under autocast: the hidden state is fp32, the products bf16;
    the chunked loss gives the plain loss's value and gradients (in the inputs' dtype)."""
    torch.manual_seed(0)
    B, T, C, V = 2, 16, 32, 97
    x = torch.randn(B, T, C, requires_grad=True)
    w = (torch.randn(V, C) * 0.5).requires_grad_()
    targets = torch.randint(0, V, (B, T))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref = RWKV.head_loss(x, w, targets)
        loss = head_loss_chunked(x, w, targets, chunk_tokens)
    gx_ref, gw_ref = torch.autograd.grad(loss_ref, (x, w))
    gx, gw = torch.autograd.grad(loss, (x, w))
    assert gx.dtype == gw.dtype == torch.float32
    assert torch.allclose(loss.float(), loss_ref.float(), rtol=1e-2)
    assert torch.allclose(gx, gx_ref, rtol=0.05, atol=1e-4) and torch.allclose(gw, gw_ref, rtol=0.05, atol=1e-4)


def grads_of(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_training_step_with_checkpointing_matches_plain():
    torch.manual_seed(0)
    idx, targets = torch.randint(0, 300, (2, 24)), torch.randint(0, 300, (2, 24))
    grads = []
    for grad_cp in (0, 1):
        model = with_fast_path(make_model(), grad_cp=grad_cp)
        loss = TrainingModule(model, OptimConfig()).training_step((idx, targets), 0)
        assert torch.allclose(loss, F.cross_entropy(model(idx).view(-1, 300), targets.view(-1)))
        loss.backward()
        grads.append(grads_of(model))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)


class CountProducts(TorchDispatchMode):
    """Counts the matrix products that run while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
        return func(*args, **(kwargs or {}))


def test_grad_cp_2_and_3_recompute_only_the_elementwise_math():
    """--grad_cp 2 and 3 recompute a block's elementwise math but reuse the outputs of its C-wide matrix products
    from the forward: the gradients of grad_cp 1 bit for bit, with the backward running the products it runs without
    checkpoints plus the LoRA up-projections again (cheap to run, large to keep). (On CPU the wkv7 recurrence is
    elementwise math too; tests/gpu/test_cuda_graph.py checks which of them reuses the CUDA kernel's forward.)"""
    L = 3
    lora_up_projections = 3 + 4 * (L - 1)   # w, a, g in every block; v from block 1 on
    idx, targets = torch.randint(0, 300, (2, 32)), torch.randint(0, 300, (2, 32))
    products, grads = {}, {}
    for grad_cp in (0, 1, 2, 3):
        model = with_fast_path(make_model(L=L), grad_cp=grad_cp)
        loss = model.loss(idx, targets)
        with CountProducts() as backward_products:
            loss.backward()
        products[grad_cp], grads[grad_cp] = backward_products.count, grads_of(model)
    assert products[1] > products[2] == products[3] == products[0] + lora_up_projections
    assert torch.equal(grads[2], grads[1]) and torch.equal(grads[3], grads[1])
    assert torch.allclose(grads[2], grads[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("grad_cp, compile_blocks, fix", [(4, False, "--grad_cp 4: use 0"),
                                                         (2, True, "use --compile_blocks 0 or --grad_cp 1"),
                                                         (3, True, "use --compile_blocks 0 or --grad_cp 1")])
def test_bad_grad_cp_is_refused(grad_cp, compile_blocks, fix):
    with pytest.raises(ConfigError, match=fix):
        PerfConfig(grad_cp=grad_cp, compile_blocks=compile_blocks).validate()


@pytest.mark.parametrize("grad_cp", [0, 1])
def test_compiled_blocks_trace_whole_and_train_as_plain(grad_cp):
    """--compile_blocks compiles each block whole: torch.compile must trace it in one graph (fullgraph: a graph break
    raises), with one graph for block 0 and one shared by all the others, under activation checkpointing too, and
    train exactly as the plain blocks. On CPU through the aot_eager backend (dynamo + AOTAutograd, no code
    generation); inductor's numerics are the GPU loss-parity test's."""
    from torch._dynamo.utils import counters
    idx, targets = torch.randint(0, 300, (2, 32)), torch.randint(0, 300, (2, 32))

    def loss_and_grads(model):
        model.zero_grad()
        loss = model.loss(idx, targets)
        loss.backward()
        return loss.detach(), grads_of(model)

    plain_loss, plain_grads = loss_and_grads(make_model(L=4, C=64, head_size=16))
    model = make_model(L=4, C=64, head_size=16)
    torch._dynamo.reset()
    counters.clear()
    compiled = CompiledBlock(backend="aot_eager")
    for block in model.blocks:
        block.forward = TrainingBlock(block, PerfConfig(grad_cp=grad_cp), compiled)
    for _ in range(2):   # the second step reuses the two graphs
        loss, grads = loss_and_grads(model)
        assert torch.equal(loss, plain_loss)
        torch.testing.assert_close(grads, plain_grads, rtol=1e-5, atol=1e-7)
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


@pytest.mark.parametrize("name", [n for n in CHAINS if n not in ("shift_mixes", "shift_mix")])
def test_compiled_chain_equals_plain(name):
    """Each elementwise function without a twin compiles as one graph (fullgraph) and computes what the model's
    function computes, gradients of the [1,1,C] parameters included (in their own shape)."""
    args = chain_inputs(name, "cpu", torch.float32)
    want = outputs_and_grads(plain(name), args)
    got = outputs_and_grads(fast_path.compiled(plain(name)), args)
    for p, c in zip(want, got):
        assert (c is None) == (p is None)
        if p is not None:
            assert c.shape == p.shape
            torch.testing.assert_close(c, p, rtol=1e-4, atol=1e-4)


def test_compiled_chains_are_made_from_the_models_functions():
    """The fast path compiles each chain from the class's function as it is when the path is applied: an edited
    function is what gets compiled (the cache is keyed by the function object)."""
    assert {(o, n) for o, n in fast_path.COMPILED_CHAINS} | {("twin", t.owner, t.name) for t in fast_path.TRITON_TWINS} \
        >= {(TimeMix, "wkv_inputs"), (TimeMix, "wkv_output"), (ChannelMix, "relu_square")}

    def edited(k):
        return torch.relu(k) ** 3
    k = torch.randn(4, 8)
    torch.testing.assert_close(fast_path.compiled(edited)(k), edited(k))


def doubled_twin(twin):
    """The same twin with its output scaled: what a kernel that no longer matches its function looks like."""
    def fast(*args):
        out = twin.fast(*args)
        return tuple(2 * o for o in out) if isinstance(out, tuple) else 2 * out
    return Twin(twin.owner, twin.name, fast, twin.source, twin.sample, twin.tolerance)


def plain_twin(owner, name):
    """A twin that is the plain function itself: the guard accepts it."""
    return Twin(owner, name, getattr(owner, name), "the plain function", fast_path.TRITON_TWINS[0].sample, 1e-6)


def test_guard_refuses_a_twin_that_differs_and_names_the_fix():
    model = make_model(L=2, C=64, head_size=16)
    fast_path.install_twins(model, [plain_twin(TimeMix, "shift_mixes")], CPU)
    with pytest.raises(FastPathMismatch, match=r"TimeMix\.shift_mixes of src/model/rwkv7\.py: relative error "
                                               r"1\.00e\+00 in output 0 .*--fused 0"):
        fast_path.install_twins(make_model(L=2, C=64, head_size=16), [doubled_twin(plain_twin(TimeMix, "shift_mixes"))],
                                CPU)


def test_installed_twins_run_only_on_their_device_and_from_a_zero_state():
    """A twin stands in for its function on the fast path's device and from a zero state; decoding with a state,
    and tensors elsewhere, run the model's function."""
    calls = []
    twin = Twin(ChannelMix, "shift_mix", lambda *a: calls.append(1) or ChannelMix.shift_mix(*a), "a counting twin",
                lambda device, C, N, gen: (torch.randn(2, 16, C, generator=gen), None, torch.rand(1, 1, C, generator=gen)),
                1e-6)
    model = make_model(L=2, C=64, head_size=16).eval()
    fast_path.install_twins(model, [twin], CPU)
    calls.clear()
    idx = torch.randint(0, 300, (1, 8))
    model(idx)
    assert len(calls) == 2   # one per block
    model.forward_with_state(idx, model.zero_state(1))
    assert len(calls) == 2


def test_cuda_graphs_by_default_but_not_under_zero3():
    """--cuda_graph 1 (the default) records the blocks, except under ZeRO-3 (weights gathered into new memory at
    every use); DeepSpeed's reentrant checkpointing, which a recording cannot hold, only runs without graphs."""
    assert flag_defaults()["cuda_graph"] == 1
    for strategy, flag, graphs in [("deepspeed_stage_2", 1, True), ("deepspeed_stage_2_offload", 1, True),
                                   ("deepspeed_stage_3", 1, False), ("deepspeed_stage_2", 0, False), ("auto", 1, True)]:
        perf = build_config(dict(strategy=strategy, cuda_graph=flag)).perf
        assert perf.cuda_graph == graphs
        assert perf.deepspeed_checkpointing == (strategy != "auto" and not graphs)


def test_parameters_replaced_puts_the_originals_back():
    """While the blocks are recorded they read new leaf tensors (src/engine/cuda_graph.py); afterwards, and after an
    error inside, the module has its own parameters again."""
    from src.engine.cuda_graph import parameters_replaced
    model = make_model(L=2, C=64, head_size=16)
    before = dict(model.named_parameters())
    leaves = {n: torch.nn.Parameter(p.detach()) for n, p in before.items() if n.startswith(("blocks.", "ln_out."))}
    with pytest.raises(RuntimeError), parameters_replaced(model, leaves):
        now = dict(model.named_parameters())
        assert all(now[n] is leaves[n] for n in leaves) and now["emb.weight"] is before["emb.weight"]
        assert model.blocks[1].att.key.weight is leaves["blocks.1.att.key.weight"]
        raise RuntimeError("recording failed")
    assert all(p is before[n] for n, p in model.named_parameters())


def test_a_failed_recording_names_the_flag_that_avoids_it(monkeypatch):
    def fail(*args):
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
    monkeypatch.setattr(fast_path, "GraphedFunction", fail)
    model = make_model(L=2, C=64, head_size=16)
    with pytest.raises(RuntimeError, match=r"during capture\nTrain with --cuda_graph 0"):
        GraphedTrunk(model, model.trunk).record(model.emb(torch.zeros(1, 16, dtype=torch.long)))
