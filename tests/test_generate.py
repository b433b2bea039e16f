"""tools/generate.py: nucleus sampling, UTF-8 streaming, and the CLI on a small checkpoint."""
import os
import subprocess
import sys

import torch

from src.config import ModelConfig
from src.model import RWKV
from src.data.tokenizer import RWKVTokenizer
from tools.generate import generate, load_model, sample_token, utf8_stream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_utf8_stream_holds_back_partial_characters():
    stream = utf8_stream()
    emoji = "😀".encode("utf-8")   # 4 bytes; one token may carry only part of it
    assert stream.decode(b"ab" + emoji[:2]) == "ab"
    assert stream.decode(emoji[2:3]) == ""
    assert stream.decode(emoji[3:] + "é".encode()) == "😀é"
    assert stream.decode(b"\xff") == "\ufffd"   # never valid UTF-8: shown as a replacement, not held forever
    tokenizer = RWKVTokenizer()
    ids = tokenizer.encode("a😀b")
    assert len(ids) > 3   # the emoji is split over byte tokens
    stream = utf8_stream()
    assert "".join(stream.decode(tokenizer.decode_bytes([i])) for i in ids) == "a😀b"


def test_sample_token_top_p_and_temperature():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    generator = torch.Generator().manual_seed(0)
    assert sample_token(logits, 0, 0.9, generator) == 0
    picks = [sample_token(logits, 1.0, 0.7, generator) for _ in range(400)]
    assert set(picks) == {0, 1}                                   # 0.5 + 0.3 reaches 0.7: token 2 is cut
    assert abs(picks.count(0) / 400 - 0.5 / 0.8) < 0.08           # renormalised over the nucleus
    assert {sample_token(logits, 1.0, 1e-6, generator) for _ in range(50)} == {0}


def test_generate_cli_is_deterministic_and_streams(tmp_path):
    torch.manual_seed(0)
    model = RWKV(ModelConfig(n_layer=2, n_embd=64, head_size=32, vocab_size=65536))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "rwkv-final.pth"
    torch.save(model.state_dict(), path)

    loaded = load_model(str(path), "cpu")
    assert (loaded.cfg.n_layer, loaded.cfg.n_embd, loaded.cfg.head_size) == (2, 64, 32)
    ids = list(generate(loaded, RWKVTokenizer(), "Hello", 12, temperature=1.0, top_p=0.9, seed=3))
    assert len(ids) == 12

    cmd = [sys.executable, "tools/generate.py", "--model", str(path), "--prompt", "Hello", "--length", "12",
           "--seed", "3", "--top_p", "0.9", "--device", "cpu"]
    outputs = [subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True) for _ in range(2)]
    assert outputs[0].stdout == outputs[1].stdout
    assert outputs[0].stdout == "Hello" + RWKVTokenizer().decode(ids)   # same tokens as the library call
    assert "# 12 tokens in" in outputs[0].stderr
