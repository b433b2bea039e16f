import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

from src.data import DataError
from src.data.binidx import BinIdx, write_binidx
from src.data.dataset import find_magic_prime
from src.data.tokenizer import RWKVTokenizer
from tests.data_helpers import REPO_ROOT, gutenberg_texts, write_shard

DOCS = [[5, 6, 7, 0], [65535, 0], [1, 2, 3, 4, 5, 0]]


def write_by_hand(prefix, docs, dtype_code, dtype):
    """The section-7 layout, written independently of src/data/binidx.py."""
    sizes = [len(d) for d in docs]
    pointers = np.cumsum([0] + sizes[:-1]) * np.dtype(dtype).itemsize
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, dtype_code, len(docs), len(docs) + 1))
        f.write(np.array(sizes, "<i4").tobytes() + np.array(pointers, "<i8").tobytes())
        f.write(np.arange(len(docs) + 1, dtype="<i8").tobytes())
    with open(prefix + ".bin", "wb") as f:
        f.write(np.concatenate(docs).astype(dtype).tobytes())


@pytest.mark.parametrize("dtype, code", [(np.uint16, 8), (np.int32, 4)])
def test_writer_matches_spec_layout(tmp_path, dtype, code):
    write_binidx(str(tmp_path / "ours"), DOCS, dtype=dtype)
    write_by_hand(str(tmp_path / "hand"), DOCS, code, dtype)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"hand{ext}").read_bytes()


@pytest.mark.parametrize("dtype, code", [(np.uint16, 8), (np.int32, 4), (np.uint8, 1), (np.int64, 5)])
def test_reader(tmp_path, dtype, code):
    docs = [[1, 2, 0], [3, 0], [4, 5, 6, 0]]
    write_by_hand(str(tmp_path / "d"), docs, code, dtype)
    data = BinIdx(str(tmp_path / "d"))
    assert isinstance(data.tokens, np.memmap) and data.tokens.dtype == dtype and data.dtype == dtype
    assert data.num_tokens == 9
    assert data.tokens.tolist() == [1, 2, 0, 3, 0, 4, 5, 6, 0]
    assert data.doc_sizes.tolist() == [3, 2, 4]


def test_writer_rejects_ids_that_do_not_fit(tmp_path):
    with pytest.raises(DataError, match="document 1 .*70000.*int32"):
        write_binidx(str(tmp_path / "d"), [[1, 0], [70000, 0]])


@pytest.fixture
def data_prefix(tmp_path):
    prefix = str(tmp_path / "d")
    write_binidx(prefix, DOCS)
    return prefix


@pytest.mark.parametrize("missing", [".bin", ".idx"])
def test_missing_file(data_prefix, missing):
    os.remove(data_prefix + missing)
    with pytest.raises(DataError, match=f"d\\{missing} not found.*PREFIX.*make_data"):
        BinIdx(data_prefix)


def test_size_mismatch(data_prefix):
    with open(data_prefix + ".bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(DataError, match=r"d\.bin has 26 bytes but .*d\.idx describes 24.*make_data"):
        BinIdx(data_prefix)


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_unknown_dtype_code(data_prefix):
    patch(data_prefix + ".idx", 17, bytes([6]))  # 6 is float32 in Megatron: not a token type
    with pytest.raises(DataError, match="unknown token dtype code 6.*8 uint16"):
        BinIdx(data_prefix)


def test_bad_magic_and_truncated_index(data_prefix):
    with open(data_prefix + ".idx", "rb") as f:
        index = f.read()
    patch(data_prefix + ".idx", 0, b"NOTANIDX!")
    with pytest.raises(DataError, match="bad magic"):
        BinIdx(data_prefix)
    with open(data_prefix + ".idx", "wb") as f:
        f.write(index[:-8])
    with pytest.raises(DataError, match="truncated or corrupt"):
        BinIdx(data_prefix)


def test_empty_data(tmp_path):
    write_binidx(str(tmp_path / "d"), [[]])
    with pytest.raises(DataError, match="holds no tokens"):
        BinIdx(str(tmp_path / "d"))


def test_check_vocab(tmp_path):
    prefix = str(tmp_path / "d")
    write_binidx(prefix, [[1, 2, 0], [3, 70000, 65536, 0]], dtype=np.int32)
    data = BinIdx(prefix)
    data.check_vocab(70001)
    with pytest.raises(DataError, match=r"token id 70000 at token 4 \(document 1\).*\[0, 70000\]"):
        data.check_vocab(65536)
    write_binidx(prefix, [[1, -3, 0]], dtype=np.int32)
    with pytest.raises(DataError, match=r"token id -3 at token 1 \(document 0\)"):
        BinIdx(prefix).check_vocab(65536)
    write_binidx(prefix, [[1, 60000, 0]], dtype=np.uint16)
    BinIdx(prefix).check_vocab(65536)  # every u16 fits
    with pytest.raises(DataError, match="token id 60000"):
        BinIdx(prefix).check_vocab(50000)


def run_tool(name, *args):
    """Run a tool from outside the repository, as a user would."""
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", name), *args],
                            cwd="/", capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout, result.stderr


def documents_of(prefix):
    data = BinIdx(prefix)
    starts = np.concatenate([[0], np.cumsum(data.doc_sizes)])
    return [data.tokens[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])]


def test_make_data(tmp_path):
    texts = gutenberg_texts()[:2] + ["second shard", "", "üñí 😀"]
    write_shard(str(tmp_path / "a.jsonl.zst"), [{"text": t, "meta": {}} for t in texts[:3]])
    write_shard(str(tmp_path / "b.jsonl"), [{"text": t} for t in texts[3:]] + ["not json", {"meta": 1}])
    (tmp_path / "c.txt").write_text("a whole .txt file\nis one document\n")
    texts.append("a whole .txt file\nis one document\n")

    code, out, err = run_tool("make_data.py", str(tmp_path), "--output", str(tmp_path / "out" / "d"),
                              "--copies", "2", "--ctx_len", "4")
    assert code == 0, err
    assert re.search(r"tokenizing: 100%.*<00:00", err)  # the progress bar with its time left
    tokenizer = RWKVTokenizer()
    expected = sorted(tokenizer.encode(t) + [0] for t in texts)
    documents = documents_of(str(tmp_path / "out" / "d"))
    assert sorted(documents[:len(texts)]) == expected and sorted(documents[len(texts):]) == expected
    assert documents[:len(texts)] != documents[len(texts):]  # each copy has its own order
    num_tokens = sum(map(len, documents))
    assert f"--my_exit_tokens {num_tokens} --magic_prime {find_magic_prime(num_tokens, 4)} --ctx_len 4" in out
    assert "less than one mini-epoch" in out and "--copies" in out
    assert "skipped 2 lines" in out
    assert not [f for f in os.listdir(tmp_path / "out") if "unshuffled" in f]

    code, out, _ = run_tool("magic_prime.py", str(tmp_path / "out" / "d"), "--ctx_len", "4")
    assert code == 0 and f"--magic_prime {find_magic_prime(num_tokens, 4)} --ctx_len 4" in out


def test_make_data_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run_tool("make_data.py", str(tmp_path / "empty"), "--output", str(tmp_path / "d"))
    assert code == 1 and "empty holds no .jsonl.zst / .jsonl / .txt files" in err
    code, _, err = run_tool("magic_prime.py", str(tmp_path / "nothing"))
    assert code == 1 and "nothing.idx not found" in err
