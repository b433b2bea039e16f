"""Our RWKV-7 state dict as a Hugging Face folder that fla (PyPI flash-linear-attention, RWKV7ForCausalLM) loads.

The two models compute the same function (README "Using the model elsewhere"); only names and layouts differ:

- keys: blocks.i.att.receptance -> model.layers.i.attn.r_proj, ln0/ln1/ln2 -> pre_norm/attn_norm/ffn_norm, ln_x ->
  g_norm, emb -> model.embeddings, ln_out -> model.norm, head -> lm_head (KEY_NAMES below);
- LoRAs: ours are x @ w1 @ w2 with w1 [C, D], w2 [D, C] and the bias w0 [1,1,C] added after; fla's are
  nn.Sequential(Linear(C, D), act, Linear(D, C, bias)) with weights [out, in]: lora.0.weight = w1^T,
  lora.2.weight = w2^T, lora.2.bias = w0 (a0, v0 likewise; the gate's LoRA has no bias);
- the decay: ours is w = -softplus(-(w0 + lora)) - 0.5, decay exp(-exp(w)); fla's log-decay is
  -exp(-0.5) * sigmoid(w0 + lora): the same number, since exp(-softplus(-u)) = sigmoid(u), so w0 goes over as is;
- layer 0 computes no value residual: fla's layer 0 has no v_lora, so our layer 0's v0/v1/v2 (kept only so that
  every block has the same keys) are left out;
- k_k, k_a and the channel mix's x_k are [1,1,C] here, [C] in fla;
- ln_x's epsilon: ours (and the rwkv package's) is 64e-5 whatever the head size; fla's is head_dim * norm_eps, and
  norm_eps (1e-5) is also every LayerNorm's. With head size 64 that is 64e-5 too. For another head size N the
  export scales every layer's value projection by c = sqrt(N / 64) and r_k by 1 / c: every value, the value
  residual, the WKV state and so ln_x's input scale by c, and GroupNorm(c y, eps c^2) = GroupNorm(y, eps), while
  the bonus term (r . k * r_k) v is unchanged. Exact but for rounding.
"""
import json
import math
import os
import shutil

from src.data.tokenizer import DEFAULT_VOCAB
from src.train.checkpoint import CheckpointError, load_state_dict, model_shape

HERE = os.path.dirname(os.path.abspath(__file__))
TRIE_TOKENIZER = os.path.join(os.path.dirname(HERE), "data", "tokenizer.py")
LN_X_EPS = 64e-5       # src/model/rwkv7.py TimeMix.ln_x
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, every LayerNorm of src/model/rwkv7.py
END_OF_DOC = 0

# ours -> fla, per block (without the "blocks.i." / "model.layers.i." prefixes); LoRAs and layer 0's ln0 below
KEY_NAMES = {
    **{f"{ours}.{p}": f"{theirs}.{p}" for ours, theirs in (("ln1", "attn_norm"), ("ln2", "ffn_norm"),
                                                           ("att.ln_x", "attn.g_norm")) for p in ("weight", "bias")},
    **{f"att.x_{m}": f"attn.x_{m}" for m in "rwkvag"},
    "att.k_k": "attn.k_k", "att.k_a": "attn.k_a", "att.r_k": "attn.r_k",
    "att.receptance.weight": "attn.r_proj.weight", "att.key.weight": "attn.k_proj.weight",
    "att.value.weight": "attn.v_proj.weight", "att.output.weight": "attn.o_proj.weight",
    "ffn.x_k": "ffn.x_k", "ffn.key.weight": "ffn.key.weight", "ffn.value.weight": "ffn.value.weight",
}
FLAT = {"att.k_k", "att.k_a", "ffn.x_k"}   # [1,1,C] here, [C] in fla
LORAS = {"w": "w_lora", "a": "a_lora", "v": "v_lora", "g": "g_lora"}   # ours: {m}1, {m}2 and the bias {m}0
GLOBAL_NAMES = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
                "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}


def needed_keys(n_layer):
    """Every key of our state dict that the export reads."""
    keys = list(GLOBAL_NAMES) + ["blocks.0.ln0.weight", "blocks.0.ln0.bias"]
    for i in range(n_layer):
        loras = [m for m in LORAS if m != "v" or i > 0]
        keys += [f"blocks.{i}.{k}" for k in KEY_NAMES]
        keys += [f"blocks.{i}.att.{m}{n}" for m in loras for n in ("1", "2") + (("0",) if m != "g" else ())]
    return keys


def fla_config(shape, lora_dims, dtype):
    """config.json for fla's RWKV7Config: sizes, head size and LoRA ranks from the weights."""
    d_w, d_a, d_v, d_g = lora_dims
    return {
        "architectures": ["RWKV7ForCausalLM"],
        "model_type": "rwkv7",
        "auto_map": {"AutoConfig": "modeling_rwkv7.RWKV7Config", "AutoModel": "modeling_rwkv7.RWKV7Model",
                     "AutoModelForCausalLM": "modeling_rwkv7.RWKV7ForCausalLM"},
        "vocab_size": shape["vocab_size"],
        "hidden_size": shape["n_embd"],
        "num_hidden_layers": shape["n_layer"],
        "head_dim": shape["head_size"],
        "num_heads": shape["n_embd"] // shape["head_size"],
        "intermediate_size": shape["dim_ffn"],
        "decay_low_rank_dim": d_w, "a_low_rank_dim": d_a, "v_low_rank_dim": d_v, "gate_low_rank_dim": d_g,
        "hidden_act": "sqrelu",
        "norm_first": True,      # layer 0's ln0 on the embeddings
        "norm_bias": True,
        "norm_eps": LAYER_NORM_EPS,
        "tie_word_embeddings": False,
        "bos_token_id": END_OF_DOC, "eos_token_id": END_OF_DOC, "pad_token_id": END_OF_DOC,
        "dtype": str(dtype).removeprefix("torch."),
    }


def to_fla(state_dict, path):
    """(config dict, fla state dict) of our state dict; CheckpointError naming `path` if it is not an RWKV-7 model
    or lacks keys."""
    shape = model_shape(state_dict, path)
    missing = [k for k in needed_keys(shape["n_layer"]) if k not in state_dict]
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} tensors of an RWKV-7 model ({shown}); pass a "
                              ".pth that train.py wrote")
    dtype = state_dict["emb.weight"].dtype
    N = shape["head_size"]
    scale = math.sqrt(N * LAYER_NORM_EPS / LN_X_EPS)   # 1 for head size 64: see the module's docstring
    out = {theirs: state_dict[ours] for ours, theirs in GLOBAL_NAMES.items()}
    out.update({"model.layers.0.pre_norm.weight": state_dict["blocks.0.ln0.weight"],
                "model.layers.0.pre_norm.bias": state_dict["blocks.0.ln0.bias"]})
    for i in range(shape["n_layer"]):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        for k, fla_k in KEY_NAMES.items():
            tensor = state_dict[ours + k]
            out[theirs + fla_k] = tensor.flatten() if k in FLAT else tensor
        for m, lora in LORAS.items():
            if m == "v" and i == 0:
                continue   # layer 0's value residual does not exist
            out[f"{theirs}attn.{lora}.lora.0.weight"] = state_dict[f"{ours}att.{m}1"].t()
            out[f"{theirs}attn.{lora}.lora.2.weight"] = state_dict[f"{ours}att.{m}2"].t()
            if m != "g":
                out[f"{theirs}attn.{lora}.lora.2.bias"] = state_dict[f"{ours}att.{m}0"].flatten()
        if scale != 1.0:
            for k, factor in (("attn.v_proj.weight", scale), ("attn.r_k", 1 / scale)):
                out[theirs + k] = (out[theirs + k].double() * factor).to(dtype)
    # the value LoRA's rank from layer 1 (a one-layer model has none; fla still wants a number)
    lora_dims = [state_dict[f"blocks.0.att.{m}1"].shape[1] for m in "wa"] + \
        [state_dict["blocks.1.att.v1"].shape[1] if shape["n_layer"] > 1 else 32, state_dict["blocks.0.att.g1"].shape[1]]
    return fla_config(shape, lora_dims, dtype), {k: v.contiguous() for k, v in out.items()}


def tokenizer_config():
    return {
        "tokenizer_class": "RWKVWorldTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_rwkv_world.RWKVWorldTokenizer", None]},
        "add_bos_token": False,
        "bos_token": "<|rwkv_end_of_text|>", "eos_token": "<|rwkv_end_of_text|>",
        "pad_token": "<|rwkv_end_of_text|>", "unk_token": "<|rwkv_end_of_text|>",
        "model_max_length": 1 << 20,   # a recurrent model: no position limit
        "clean_up_tokenization_spaces": False,
    }


def export(checkpoint, out_dir, vocab=None):
    """Write the Hugging Face folder of `checkpoint` to out_dir; returns the config dict."""
    from safetensors.torch import save_file   # requirements-export.txt

    config, tensors = to_fla(load_state_dict(checkpoint), checkpoint)
    vocab = vocab or DEFAULT_VOCAB
    if not os.path.isfile(vocab):
        raise FileNotFoundError(f"tokenizer vocab {vocab} not found; pass the path of rwkv_vocab_v20230424.txt")
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    for name, content in (("config.json", config), ("tokenizer_config.json", tokenizer_config()),
                          ("generation_config.json", {"bos_token_id": END_OF_DOC, "eos_token_id": END_OF_DOC,
                                                      "pad_token_id": END_OF_DOC})):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(content, f, indent=2)
            f.write("\n")
    shutil.copyfile(vocab, os.path.join(out_dir, "rwkv_vocab_v20230424.txt"))
    shutil.copyfile(TRIE_TOKENIZER, os.path.join(out_dir, "rwkv_world_trie.py"))
    for name in ("tokenization_rwkv_world.py", "modeling_rwkv7.py"):
        shutil.copyfile(os.path.join(HERE, "hf_folder", name), os.path.join(out_dir, name))
    return config
