"""src/train/evaluate.py and tools/eval.py: validation loss against a direct computation, the LAMBADA
protocol on hand-made cases, and the CLI's JSON line."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.data.binidx import write_binidx
from src.config import ModelConfig
from src.train.evaluate import lambada, lambada_examples, load_token_stream, logit_rows, val_loss
from src.model import RWKV
from src.data.tokenizer import RWKVTokenizer
from tests.data_helpers import LAMBADA, REPO_ROOT, write_shard

CTX_LEN = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is as fast, and stays fast on a machine busy with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = RWKV(ModelConfig(n_layer=2, n_embd=64, head_size=32, vocab_size=65536))
    model.init_weights()
    with torch.no_grad():   # the init zeroes the output projections: perturb so every part matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return RWKVTokenizer()


def direct_loss(model, stream, ctx_len):
    """Mean cross-entropy over windows stream[i : i + ctx_len + 1], i = 0, ctx_len, ..., one window at a
    time and unpadded."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(stream) - 1, ctx_len):
            window = torch.tensor(np.asarray(stream[i:i + ctx_len + 1], dtype=np.int64))
            logits = model(window[None, :-1])[0]
            nll += F.cross_entropy(logits, window[1:], reduction="sum").item()
            count += len(window) - 1
    return nll / count, count


def test_val_loss_binidx_equals_direct_cross_entropy(model, tmp_path):
    rng = np.random.default_rng(1)
    docs = [np.append(rng.integers(1, 65536, size=n), 0) for n in (30, 11, 41)]   # 85 tokens: a short last window
    write_binidx(str(tmp_path / "val"), docs)
    stream = load_token_stream(str(tmp_path / "val"))
    assert np.array_equal(stream, np.concatenate(docs))
    assert np.array_equal(load_token_stream(str(tmp_path / "val.bin"), max_tokens=50), stream[:50])

    expected, count = direct_loss(model, stream, CTX_LEN)
    result = val_loss(model, stream, CTX_LEN, batch_size=2, device="cpu")
    assert result["tokens"] == count == len(stream) - 1
    assert result["loss"] == pytest.approx(expected, abs=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]))


def test_val_loss_jsonl_joins_documents_with_0(model, tokenizer, tmp_path):
    texts = ["The quick brown fox jumps over the lazy dog.", "Held-out text, second document.", "Three"]
    path = write_shard(str(tmp_path / "val.jsonl.zst"), [{"text": texts[0]}, "not json", {"text": texts[1]},
                                                         {"text": texts[2], "meta": {}}])
    stream = load_token_stream(path, tokenizer, log=lambda msg: None)
    assert stream.tolist() == sum((tokenizer.encode(t) + [0] for t in texts), [])
    expected, count = direct_loss(model, stream, 8)
    result = val_loss(model, stream, 8, batch_size=3)
    assert result["tokens"] == count
    assert result["loss"] == pytest.approx(expected, abs=1e-5)


def test_val_loss_token_windows_and_shares(model):
    rng = np.random.default_rng(2)
    windows = [rng.integers(0, 65536, size=n).tolist() for n in (17, 9, 17)]
    nll = sum(direct_loss(model, w, len(w))[0] * (len(w) - 1) for w in windows)
    result = val_loss(model, windows, CTX_LEN, batch_size=2)
    assert result["tokens"] == 16 + 8 + 16
    assert result["loss"] == pytest.approx(nll / 40, abs=1e-5)
    # two ranks' shares combine to the whole
    stream = rng.integers(0, 65536, size=70)
    whole = val_loss(model, stream, CTX_LEN)
    shares = [val_loss(model, stream, CTX_LEN, rank=r, world_size=2) for r in range(2)]
    assert sum(s["tokens"] for s in shares) == whole["tokens"] == 69
    assert sum(s["loss_sum"] for s in shares) / 69 == pytest.approx(whole["loss"], abs=1e-5)
    # more ranks than windows: the idle share adds nothing instead of failing (the others wait for it)
    idle = val_loss(model, stream[:20], CTX_LEN, rank=2, world_size=3)
    assert (idle["tokens"], idle["loss_sum"]) == (0, 0.0)
    assert model.training is False


def test_logit_rows_in_pieces_equal_full_logits(model):
    x = torch.randint(0, 65536, (2, 16), generator=torch.Generator().manual_seed(4))
    mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(5)) < 0.6
    with torch.no_grad():
        pieces = list(logit_rows(model, x, mask, rows=5))
        full = model(x)[mask]
    assert [len(p) for p in pieces[:-1]] == [5] * (len(pieces) - 1) and sum(map(len, pieces)) == int(mask.sum())
    assert torch.allclose(torch.cat(pieces), full, atol=1e-5)


class PieceTokenizer:
    """Hand-made tokenizer: an optional space plus one character per token, so " ab" is [" a", "b"]."""
    PIECES = [None] + [c for c in "abcdqxyz"] + [" " + c for c in "abcdqxyz"]

    def encode(self, text):
        return [self.PIECES.index(piece) for piece in re.findall(r" ?[^ ]", text)]


class BigramModel(torch.nn.Module):
    """logits[t] = TABLE[token t]: its greedy choices are known. Any letter is followed by " a",
    " a" by "b"; every call's inputs are recorded."""

    def __init__(self):
        super().__init__()
        ids = {piece: i for i, piece in enumerate(PieceTokenizer.PIECES)}
        table = torch.randn(len(ids), len(ids), generator=torch.Generator().manual_seed(0))
        table[:, ids[" a"]] += 6.0
        table[ids[" a"], ids["b"]] += 12.0
        self.table = torch.nn.Parameter(table)
        self.inputs = []

    def forward(self, idx):
        self.inputs.append(idx.clone())
        return self.table[idx]


def test_lambada_protocol_on_hand_made_cases(tmp_path):
    tok, model = PieceTokenizer(), BigramModel()
    ids = {piece: i for i, piece in enumerate(tok.PIECES)}
    lines = ["xy ab",      # hit: " a" after y, then "b" after " a"
             "xy ac",      # miss on the word's second token: "b" is predicted, "c" is the target
             "q qz ab",    # hit, another length: the batch is padded
             "xy ba"]      # miss on the first token
    path = tmp_path / "lambada.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))

    assert lambada_examples(str(path), tok)[1] == ([0, ids["x"], ids["y"]], [ids[" a"], ids["c"]])
    result = lambada(model, tok, str(path), device="cpu", batch_size=4)
    assert result["n"] == 4 and result["accuracy"] == 0.5

    log_p = torch.log_softmax(model.table.detach(), dim=-1)
    def nll(context, target):   # -log P(target | context) summed over the target's tokens, directly
        seq = [0] + [ids[p] for p in context] + [ids[p] for p in target]
        return -sum(log_p[seq[i - 1], seq[i]].item() for i in range(len(seq) - len(target), len(seq)))
    expected = [nll("xy", [" a", "b"]), nll("xy", [" a", "c"]), nll(["q", " q", "z"], [" a", "b"]),
                nll("xy", [" b", "a"])]
    assert result["ppl"] == pytest.approx(math.exp(sum(expected) / 4), rel=1e-6)

    # inputs: 0, the context, the target without its last token; right-padded with 0 to the chunk
    (batch,) = model.inputs
    assert batch.shape == (4, 16)
    assert batch[:, 0].tolist() == [0, 0, 0, 0]
    assert [ids["q"], ids[" q"], ids["z"], ids[" a"]] in [row[1:5].tolist() for row in batch]
    # batch size 1 gives the same answer
    assert lambada(model, tok, str(path), batch_size=1, limit=3) == pytest.approx(
        dict(accuracy=2 / 3, ppl=math.exp(sum(expected[:3]) / 3), n=3), rel=1e-6)


def test_lambada_real_data_matches_unbatched_direct_scoring(model, tokenizer):
    n = 6
    result = lambada(model, tokenizer, LAMBADA, device="cpu", limit=n, batch_size=4)
    hits, nll = 0, 0.0
    with open(LAMBADA) as f:
        texts = [json.loads(next(f))["text"] for _ in range(n)]
    with torch.no_grad():
        for text in texts:
            context, word = text.rsplit(" ", 1)
            src, dst = [0] + tokenizer.encode(context), tokenizer.encode(" " + word)
            logits = model(torch.tensor([src + dst])[:, :-1])[0, len(src) - 1:]
            nll -= torch.log_softmax(logits, -1)[torch.arange(len(dst)), dst].sum().item()
            hits += logits.argmax(-1).tolist() == dst
    assert result["n"] == n
    assert result["accuracy"] == hits / n
    assert result["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_cli_prints_one_json_line(model, tokenizer, tmp_path, capsys):
    pth = str(tmp_path / "tiny.pth")
    torch.save(model.state_dict(), pth)
    rng = np.random.default_rng(3)
    write_binidx(str(tmp_path / "val"), [np.append(rng.integers(1, 65536, size=40), 0)])
    from tools.eval import main
    assert main(["--model", pth, "--data", str(tmp_path / "val"), "--ctx_len", "16", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"model", "data", "tokens", "loss", "ppl", "seconds"} <= out.keys()
    assert out["model"] == pth and out["data"] == str(tmp_path / "val") and out["tokens"] == 40
    assert out["loss"] == pytest.approx(direct_loss(model, load_token_stream(str(tmp_path / "val")), 16)[0], abs=1e-5)

    # as a program (one subprocess: importing Lightning takes seconds)
    with open(LAMBADA) as f:
        (tmp_path / "lambada.jsonl").write_text("".join(next(f) for _ in range(5)))
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "eval.py"), "--model", pth,
                           "--lambada", str(tmp_path / "lambada.jsonl"), "--device", "cpu"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.strip().splitlines()
    out = json.loads(line)
    assert {"model", "data", "examples", "accuracy", "ppl", "seconds"} <= out.keys()
    expected = lambada(model, tokenizer, str(tmp_path / "lambada.jsonl"))
    assert out["examples"] == 5
    assert (out["accuracy"], out["ppl"]) == pytest.approx((expected["accuracy"], expected["ppl"]), rel=1e-5)


def test_cli_errors_name_the_file(tmp_path, capsys):
    from tools.eval import main
    assert main(["--model", str(tmp_path / "missing.pth"), "--data", "x", "--device", "cpu"]) == 2
    assert "missing.pth does not exist" in capsys.readouterr().err
