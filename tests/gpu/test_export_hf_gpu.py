"""The exported folder on a GPU: fla's compiled kernels, with its chunked WKV kernel (chunk_rwkv7, used from 64
tokens on, which Triton's interpreter cannot run: tests/test_export_hf.py runs fla's recurrent kernel in its place on
the CPU), against our model on the same GPU, both fp32.

    python -m pytest -q -s tests/gpu/test_export_hf_gpu.py

Tolerance: fla's chunk kernel multiplies fp32 tiles with tl.dot, which on NVIDIA GPUs may run in TF32 (10-bit
mantissa, 5e-4 relative), against ours in fp32: 2e-3 of the largest logit. Measured on an H100: 9.0e-4 where the
largest logit is 5.15 (README "Using the model elsewhere")."""
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
