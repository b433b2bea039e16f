"""The exported folder on a GPU: fla's compiled kernels, with its chunked WKV kernel (chunk_rwkv7, used from 64
tokens on, which Triton's interpreter cannot run: tests/test_export_hf.py runs fla's recurrent kernel in its place on
the CPU), against our model on the same GPU, both fp32.

    python -m pytest -q -s tests/gpu/test_export_hf_gpu.py

Tolerance: fla's chunk kernel multiplies fp32 tiles with tl.dot, which on NVIDIA GPUs may run in TF32 (10-bit
mantissa, 5e-4 relative), against ours in fp32: 2e-3 of the largest logit. Measured on an H100: 9.0e-4 where the
largest logit is 5.15; the demo's trained checkpoint, 1.2e-2 where it is 9.87 (README "Using the model
elsewhere")."""
import pytest
import torch

from tests.test_export_hf import export_folder, perturbed_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_fla_chunked_kernel_equals_ours_on_gpu(tmp_path):
    from transformers import AutoModelForCausalLM
    model = perturbed_model(n_layer=3, n_embd=256, head_size=64)
    _, folder = export_folder(model, tmp_path, "gpu")
    fla = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).cuda().eval()
    model = model.cuda()
    idx = torch.randint(0, 65536, (2, 300), generator=torch.Generator().manual_seed(0)).cuda()   # 5 chunks of 64
    with torch.no_grad():
        ours = model(idx)
        theirs = fla(idx).logits
    scale = ours.abs().max().item()
    difference = (theirs - ours).abs().max().item()
    print(f"max |logit| {scale:.3f}, fla (chunked kernel) - ours {difference:.2e}")
    assert difference <= 2e-3 * scale


def test_trained_demo_checkpoint_gives_our_logits_in_fla(tmp_path):
    """The demo's trained rwkv-final.pth (bf16, trained on this GPU), exported: fla's model and ours (both fp32 on the
    GPU) on a passage of real text tokenized by the exported folder's tokenizer, which gives our ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from src.data.tokenizer import RWKVTokenizer
    from tests.conftest import run
    from tests.data_helpers import gutenberg_texts
    from tools.generate import load_model
    run("tools/demo.py", "--proj_dir", tmp_path / "demo", "--length", 16, timeout=900)
    checkpoint, folder = tmp_path / "demo" / "rwkv-final.pth", str(tmp_path / "hf")
    run("tools/export_hf.py", checkpoint, folder)
    text = gutenberg_texts()[0][:2000]
    ids = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)(text)["input_ids"]
    assert ids == RWKVTokenizer().encode(text)
    fla = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).cuda().eval()
    model = load_model(str(checkpoint), "cuda")
    idx = torch.tensor([[0] + ids], device="cuda")
    with torch.no_grad():
        ours, theirs = model(idx), fla(idx).logits
    scale = ours.abs().max().item()
    difference = (theirs - ours).abs().max().item()
    agree = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
    print(f"demo checkpoint, {idx.shape[1]} tokens: max |logit| {scale:.3f}, fla - ours {difference:.2e}, "
          f"same top token at {agree:.2%} of positions")
    assert difference <= 2e-3 * scale
