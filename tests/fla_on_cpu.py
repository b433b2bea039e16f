"""Run fla's RWKV-7 on the CPU in Triton's interpreter (TRITON_INTERPRET=1, set before Triton is first imported).

Two things stand in the way in Triton 3.9's interpreter, and `patch()` works around both without touching what the
model computes:
- autotuned kernels time their configs on a device, and the interpreter has no driver: each takes its first config;
- fla's chunked WKV kernel (chunk_rwkv7, used from 64 tokens on) fails in the interpreter ("'int' object has no
  attribute 'to'"): fla's own recurrent DPLR kernel (fused_recurrent_rwkv7, the same recurrence, same a/b inputs)
  runs in its place. The chunked kernel runs compiled in tests/gpu/test_export_hf_gpu.py.
"""
import os
import sys


def patch():
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before Triton is imported"
    import triton.runtime.autotuner as autotuner
    prune = autotuner.Autotuner.prune_configs
    autotuner.Autotuner.prune_configs = lambda self, kwargs: prune(self, kwargs)[:1]

    import fla.layers.rwkv7 as layer
    from fla.ops.rwkv7 import fused_recurrent_rwkv7

    def chunk_as_recurrent(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=False,
                           cu_seqlens=None, **chunk_options):
        return fused_recurrent_rwkv7(r, w, k, v, a, b, scale, initial_state, output_final_state, cu_seqlens)
    layer.chunk_rwkv7 = chunk_as_recurrent


if __name__ == "__main__":   # python tests/fla_on_cpu.py lm-eval ARGS...: lm-eval's CLI with the patches applied
    patch()
    from lm_eval.__main__ import cli_evaluate
    sys.argv = sys.argv[1:]
    cli_evaluate()
