"""fla's RWKV-7 classes for transformers' Auto classes (trust_remote_code=True): the exported folder's config.json
names them in auto_map, so AutoModelForCausalLM (and lm-eval's hf model) load the folder without `import fla` first.
tools/export_hf.py copies this file into the folder; it needs `pip install flash-linear-attention`."""
from fla.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM, RWKV7Model

__all__ = ["RWKV7Config", "RWKV7ForCausalLM", "RWKV7Model"]
