"""The RWKV-7 model against docs/RECIPE.md sections 1, 3, 4, 5 and against the `rwkv` PyPI package."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from src.config import ConfigError, ModelConfig, OptimConfig
from src.head_loss import L2Wrap, head_loss_chunked, head_loss_reference
from src.model import RWKV, CompiledBlock, train_block
from tests.chains import CHAIN_NAMES, chain, chain_inputs, outputs_and_grads


def expected_shapes(L, C, V, N=64, F_=None):
    """docs/RECIPE.md section 1's state-dict table, written out independently of the model code."""
    H = C // N
    F_ = F_ or 4 * C
    r = lambda f, p: max(32, round(f * C**p / 32) * 32)
    Dw, Dv, Dg = r(1.8, 0.5), r(1.3, 0.5), r(0.6, 0.8)
    shapes = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
    for l in range(L):
        p = f"blocks.{l}."
        for ln in ("ln1", "ln2"):
            shapes[p + ln + ".weight"] = shapes[p + ln + ".bias"] = (C,)
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a"):
            shapes[p + "att." + name] = (1, 1, C)
        for name, d in (("w", Dw), ("a", Dw), ("v", Dv), ("g", Dg)):
            shapes[p + f"att.{name}1"] = (C, d)
            shapes[p + f"att.{name}2"] = (d, C)
        shapes[p + "att.r_k"] = (H, N)
        for name in ("receptance", "key", "value", "output"):
            shapes[p + f"att.{name}.weight"] = (C, C)
        shapes[p + "att.ln_x.weight"] = shapes[p + "att.ln_x.bias"] = (C,)
        shapes[p + "ffn.x_k"] = (1, 1, C)
        shapes[p + "ffn.key.weight"] = (F_, C)
        shapes[p + "ffn.value.weight"] = (C, F_)
    shapes["ln_out.weight"] = shapes["ln_out.bias"] = (C,)
    shapes["head.weight"] = (V, C)
    return shapes


@pytest.mark.parametrize("L,C,count", [(12, 768, 191_084_544), (18, 1024, 372_860_928), (24, 2048, 1_527_668_736)])
def test_state_dict_matches_spec(L, C, count):
    with torch.device("meta"):
        model = RWKV(ModelConfig(n_layer=L, n_embd=C, vocab_size=65536))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes(L, C, 65536)
    assert sum(p.numel() for p in model.parameters()) == count


def test_lora_widths_table():
    assert ModelConfig(1, 768).lora_dims == (64, 64, 32, 128)
    assert ModelConfig(1, 1024).lora_dims == (64, 64, 32, 160)
    assert ModelConfig(1, 2048).lora_dims == (96, 96, 64, 256)


@pytest.mark.parametrize("kwargs,hint", [
    (dict(n_layer=2, n_embd=100, head_size=64), "head_size"),
    (dict(n_layer=2, n_embd=80, head_size=16), "multiple of 32"),
    (dict(n_layer=2, n_embd=128, dim_att=256), "--dim_att"),
    (dict(n_layer=0, n_embd=128), "--n_layer"),
])
def test_impossible_shapes_are_refused(kwargs, hint):
    with pytest.raises(ConfigError, match=hint):
        RWKV(ModelConfig(**kwargs))


def make_model(L=2, C=128, V=300, seed=0, perturb=True, **cfg):
    torch.manual_seed(seed)
    model = RWKV(ModelConfig(n_layer=L, n_embd=C, vocab_size=V, **cfg))
    model.init_weights()
    if perturb:   # move every tensor away from its init so that none is trivially zero
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * (0.1 if p.dim() < 2 else 0.05))
    return model


def test_param_groups():
    model = make_model(perturb=False)
    names = dict(model.named_parameters())
    lr_1x, lr_2x, decay = model.param_groups()
    assert lr_2x == [n for n in names if n.endswith("att.w0")] and len(lr_2x) == 2
    assert decay == [] and set(lr_1x) == set(names) - set(lr_2x)

    model.optim = OptimConfig(weight_decay=0.1)
    lr_1x, lr_2x, decay = model.param_groups()
    matrices = {"emb.weight", "head.weight"} | {f"blocks.{l}.{m}.weight" for l in range(2) for m in
                                                ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")}
    assert set(decay) == matrices
    assert "blocks.0.att.w1" in lr_1x and "blocks.1.ln1.weight" in lr_1x and "blocks.0.att.ln_x.weight" in lr_1x
    assert set(lr_1x) | set(lr_2x) | set(decay) == set(names)

    model.optim = OptimConfig(weight_decay=0.1, layerwise_lr=0)
    lr_1x, lr_2x, decay = model.param_groups()
    assert lr_2x == [] and "blocks.0.att.w0" in lr_1x

    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["my_lr_scale"] for g in opt.param_groups] == [1.0, 1.0]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.1]


def test_loss_is_cross_entropy_and_l2wrap_gradient():
    torch.manual_seed(0)
    B, T, V = 2, 5, 11
    logits = (torch.randn(B, T, V) * 3).requires_grad_()
    targets = torch.randint(0, V, (B, T))
    ce = F.cross_entropy(logits.view(-1, V), targets.view(-1))
    loss = L2Wrap.apply(ce, logits)
    assert loss.item() == ce.item()
    loss.backward()

    plain = logits.detach().clone().requires_grad_()
    F.cross_entropy(plain.view(-1, V), targets.view(-1)).backward()
    extra = logits.grad - plain.grad
    max_logit, argmax = logits.detach().max(-1)
    expected = torch.zeros(B, T, V)
    for b in range(B):
        for t in range(T):
            expected[b, t, argmax[b, t]] = max_logit[b, t] * 1e-4 / (B * T)
    assert expected.abs().max() > 1e-5
    assert torch.allclose(extra, expected, rtol=0, atol=5e-8)


@pytest.mark.parametrize("chunk_tokens", [7, 48, 1000])
def test_chunked_head_loss_equals_reference(chunk_tokens):
    torch.manual_seed(0)
    B, T, C, V = 3, 16, 32, 97
    x = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(V, C, dtype=torch.float64) * 0.5).requires_grad_()
    targets = torch.randint(0, V, (B, T))
    loss_ref = head_loss_reference(x, w, targets)
    gx_ref, gw_ref = torch.autograd.grad(loss_ref, (x, w))
    loss = head_loss_chunked(x, w, targets, chunk_tokens)
    gx, gw = torch.autograd.grad(loss, (x, w))
    assert torch.allclose(loss.double(), loss_ref, rtol=1e-6)
    assert torch.allclose(gx, gx_ref, rtol=1e-5, atol=1e-9) and torch.allclose(gw, gw_ref, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("chunk_tokens", [16, 1000])
def test_chunked_head_loss_under_autocast(chunk_tokens):
    """Lightning's bf16 precision without DeepSpeed: fp32 weights and hidden state, the products in bf16 by
    autocast. The chunked loss and gradients come out in fp32 and near the reference's under the same autocast."""
    torch.manual_seed(0)
    B, T, C, V = 2, 16, 32, 97
    x = torch.randn(B, T, C, requires_grad=True)
    w = (torch.randn(V, C) * 0.5).requires_grad_()
    targets = torch.randint(0, V, (B, T))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref = head_loss_reference(x, w, targets)
        loss = head_loss_chunked(x, w, targets, chunk_tokens)
    gx_ref, gw_ref = torch.autograd.grad(loss_ref, (x, w))
    gx, gw = torch.autograd.grad(loss, (x, w))
    assert gx.dtype == gw.dtype == torch.float32
    assert torch.allclose(loss.float(), loss_ref.float(), rtol=1e-2)
    assert torch.allclose(gx, gx_ref, rtol=0.05, atol=1e-4) and torch.allclose(gw, gw_ref, rtol=0.05, atol=1e-4)


def grads_of(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_training_step_loss_fused_and_grad_cp_match():
    torch.manual_seed(0)
    idx, targets = torch.randint(0, 300, (2, 24)), torch.randint(0, 300, (2, 24))
    grads = []
    for grad_cp, fused in ((0, False), (0, True), (1, True)):
        model = make_model(grad_cp=grad_cp, fused=fused)
        loss = model.training_step((idx, targets), 0)
        assert torch.allclose(loss, F.cross_entropy(model(idx).view(-1, 300), targets.view(-1)))
        loss.backward()
        grads.append(grads_of(model))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)
    assert torch.allclose(grads[1], grads[2], atol=1e-6, rtol=1e-5)


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
        model = make_model(L=L, grad_cp=grad_cp)
        loss = model.training_step((idx, targets), 0)
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
        ModelConfig(n_layer=2, n_embd=128, grad_cp=grad_cp, compile_blocks=compile_blocks).validate()


@pytest.mark.parametrize("grad_cp", [0, 1])
def test_compiled_blocks_trace_whole_and_train_as_eager(grad_cp, monkeypatch):
    """The fused CUDA path compiles each block whole (RWKV._block_runner): torch.compile must trace it in one graph
    (fullgraph: a graph break raises), with one graph for block 0 and one shared by all the others, under
    activation checkpointing too, and train exactly as the eager blocks. On CPU through the aot_eager backend
    (dynamo + AOTAutograd, no code generation); inductor's numerics are the GPU loss-parity test's."""
    from torch._dynamo.utils import counters
    idx, targets = torch.randint(0, 300, (2, 32)), torch.randint(0, 300, (2, 32))
    model = make_model(L=4, C=64, head_size=16, grad_cp=grad_cp, compile_blocks=True)
    assert model._block_runner(idx) is train_block   # CPU tensors: eager blocks

    def loss_and_grads():
        model.zero_grad()
        loss = model.training_step((idx, targets), 0)
        loss.backward()
        return loss.detach(), grads_of(model)

    eager_loss, eager_grads = loss_and_grads()
    torch._dynamo.reset()
    counters.clear()
    compiled = CompiledBlock(backend="aot_eager")
    monkeypatch.setattr(model, "_block_runner", lambda x: compiled)
    for _ in range(2):   # the second step reuses the two graphs
        loss, grads = loss_and_grads()
        assert torch.equal(loss, eager_loss)
        torch.testing.assert_close(grads, eager_grads, rtol=1e-5, atol=1e-7)
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


def test_recurrent_logits_equal_parallel():
    model = make_model(L=3).eval()
    idx = torch.randint(0, 300, (2, 20))
    parallel = model(idx)
    state, steps = model.zero_state(2), []
    for t in range(0, 20, 7):   # uneven pieces: carrying the state must not depend on how the input is cut
        logits, state = model.forward_with_state(idx[:, t:t + 7], state)
        steps.append(logits)
    assert torch.allclose(torch.cat(steps, dim=1), parallel, atol=1e-5, rtol=1e-5)


def test_rwkv_package_runs_our_checkpoint(tmp_path):
    """Independent oracle: the `rwkv` PyPI package loads our state dict unchanged and agrees on logits."""
    os.environ["RWKV_V7_ON"] = "1"
    from rwkv.model import RWKV as PackageRWKV

    model = make_model(L=3, C=128, V=1000).eval()
    torch.save(model.state_dict(), tmp_path / "tiny.pth")
    package = PackageRWKV(str(tmp_path / "tiny"), "cpu fp32")

    idx = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3))
    ours = model(idx[None])[0]
    theirs, _ = package.forward(idx.tolist(), None, full_output=True)
    scale = theirs.abs().max()
    assert scale > 1
    assert (ours - theirs).abs().max() <= 1e-4 * scale

    state, stepwise = None, []
    for token in idx[:16].tolist():
        logits, state = package.forward([token], state)
        stepwise.append(logits)
    assert (torch.stack(stepwise) - ours[:16]).abs().max() <= 1e-4 * scale


@pytest.mark.parametrize("name", [n for n in CHAIN_NAMES if chain(n).kernel is None])
def test_compiled_chain_equals_plain(name):
    """Each fused piece without a kernel of its own compiles as one graph (fullgraph) and computes what its plain form
    computes, gradients of the [1,1,C] parameters included (in their own shape). The token-shift mixes run Triton
    kernels instead, checked in tests/test_triton_interpreted.py."""
    args = chain_inputs(name, "cpu", torch.float32)
    plain = outputs_and_grads(chain(name).fn, args)
    compiled = outputs_and_grads(chain(name).run_compiled, args)
    for p, c in zip(plain, compiled):
        assert (c is None) == (p is None)
        if p is not None:
            assert c.shape == p.shape
            torch.testing.assert_close(c, p, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy, flag, graphs", [
    ("deepspeed_stage_2", 1, True), ("deepspeed_stage_2_offload", 1, True), ("deepspeed_stage_3", 1, False),
    ("deepspeed_stage_2", 0, False), ("auto", 1, True)])
def test_cuda_graphs_by_default_but_not_under_zero3(strategy, flag, graphs):
    """--cuda_graph 1 (the default) records the blocks, except under ZeRO-3 (weights gathered into new memory at
    every use); DeepSpeed's reentrant checkpointing, which a recording cannot hold, only runs without graphs."""
    from src.config import TrainConfig
    assert TrainConfig().cuda_graph == 1
    cfg = TrainConfig(strategy=strategy, cuda_graph=flag).model_config()
    assert cfg.cuda_graph == graphs
    assert cfg.deepspeed_checkpointing == (strategy != "auto" and not graphs)


def test_parameters_replaced_puts_the_originals_back():
    """While the blocks are recorded they read new leaf tensors (src/cuda_graph.py); afterwards, and after an error
    inside, the module has its own parameters again."""
    from src.cuda_graph import parameters_replaced
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
    import src.model

    def fail(*args):
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
    monkeypatch.setattr(src.model, "GraphedFunction", fail)
    model = make_model(L=2, C=64, head_size=16, cuda_graph=True)
    with pytest.raises(RuntimeError, match=r"during capture\nTrain with --cuda_graph 0"):
        model._graphed_blocks(model.emb(torch.zeros(1, 16, dtype=torch.long)))
