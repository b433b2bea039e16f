"""Helpers for the data tests: the committed text fixtures (tests/fixtures/README.md) and small Pile-format shards."""

import itertools
import json
import os

import numpy as np
import torch
import zstandard

from src.data.dataset import DataProblems, iter_shard_lines

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures")
GUTENBERG = os.path.join(FIXTURES, "gutenberg.jsonl.zst")   # 13 book openings, 314 k characters
LAMBADA = os.path.join(FIXTURES, "lambada_test_100.jsonl")


def gutenberg_texts():
    """The texts of the Gutenberg fixture's documents, in order."""
    return [json.loads(line)["text"] for line in iter_shard_lines(GUTENBERG, DataProblems())]


def write_shard(path, lines):
    """Write lines (dicts become JSON, str/bytes go as they are) as .jsonl or .jsonl.zst."""
    data = b"".join((json.dumps(line).encode() if isinstance(line, dict) else
                     line.encode() if isinstance(line, str) else line) + b"\n" for line in lines)
    if path.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    with open(path, "wb") as f:
        f.write(data)
    return path


def numbered_documents(shard, count, seed=0):
    """Distinct small documents of varied length, named by shard and line."""
    words = "the of and to in a is that for it as was with be by on not he I this".split()
    rng = itertools.cycle(range(3, 40, 7))
    return [{"text": f"doc {shard}-{i}: " + " ".join(words[(i * 7 + k + seed) % len(words)]
                                                     for k in range(next(rng)))}
            for i in range(count)]


def write_numbered_shards(folder, lines):
    """Four shards (three .jsonl.zst, one plain .jsonl) of `lines` numbered documents each; returns all texts."""
    os.makedirs(folder, exist_ok=True)
    texts = []
    for k, name in enumerate(["00.jsonl.zst", "01.jsonl.zst", "02.jsonl", "03.jsonl.zst"]):
        documents = numbered_documents(k, lines)
        write_shard(os.path.join(folder, name), documents)
        texts += [d["text"] for d in documents]
    return texts


def windows(batches):
    """The windows of ctx_len + 1 tokens of (x, y) batches (y is x shifted by one)."""
    for x, y, *_ in batches:
        assert x.dtype == y.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
        yield from torch.cat([x, y[:, -1:]], dim=1).tolist()


def documents(tokenizer, reader_windows):
    """The documents one reader served: windows overlap by one token; each document ends with 0."""
    stream = list(reader_windows[0])
    for previous, window in zip(reader_windows, reader_windows[1:]):
        assert window[0] == previous[-1]
        stream += window[1:]
    *complete, _partial = np.split(np.array(stream), np.flatnonzero(np.array(stream) == 0) + 1)
    return [tokenizer.decode(d[:-1].tolist()) for d in complete]


def passes_cover_every_document_once(served, texts, passes):
    """Assert that in each of the first `passes` passes the readers together served every text exactly once
    (`served`: reader -> its documents in order; each reader serves an equal share of a pass). Returns each
    pass as reader -> documents."""
    per_pass = len(texts) // len(served)
    shares = []
    for pass_index in range(passes):
        share = {reader: docs[pass_index * per_pass:(pass_index + 1) * per_pass] for reader, docs in served.items()}
        assert sorted(text for docs in share.values() for text in docs) == sorted(texts), f"pass {pass_index}"
        shares.append(share)
    return shares


def served_by_readers(rank_batches, workers, tokenizer):
    """reader (rank, worker) -> documents it served, from each rank's batches in step order: a rank's
    DataLoader takes its batches from its `workers` loader workers in turn."""
    reader_windows = {}
    for rank, batches in enumerate(rank_batches):
        for k, batch in enumerate(batches):
            reader_windows.setdefault((rank, k % workers), []).extend(windows([batch]))
    return {reader: documents(tokenizer, w) for reader, w in reader_windows.items()}


def check_two_ranks_stream(tmp_path, *train_flags):
    """Train 60 steps on 2 ranks from 4 small shards (tests/run_steps.py with `train_flags`), then assert from the
    batches each rank trained on that the 2 ranks x STREAM_WORKERS readers served every document exactly once
    in each of the first two passes."""
    from src.data.dataset import STREAM_WORKERS
    from src.data.tokenizer import RWKVTokenizer
    from tests.conftest import run_steps
    texts = write_numbered_shards(tmp_path / "shards", 12)
    batches = tmp_path / "batches"
    run_steps(tmp_path, "losses", 60, ["--proj_dir", tmp_path / "run", "--data_type", "jsonl", "--data_file",
                                       tmp_path / "shards", "--vocab_size", 65536, "--ctx_len", 16, "--micro_bsz", 2,
                                       "--epoch_steps", 20, "--epoch_count", 3, "--n_layer", 1, "--n_embd", 32,
                                       "--head_size", 8, "--devices", 2, "--enable_progress_bar", "False",
                                       "--random_seed", 0, "--train_stage", 0, *train_flags],
              batches_out=batches, timeout=900)
    rank_batches = [torch.load(batches / f"rank{rank}.pt") for rank in range(2)]
    assert [len(b) for b in rank_batches] == [60, 60]
    served = served_by_readers(rank_batches, STREAM_WORKERS, RWKVTokenizer())
    assert len(served) == 2 * STREAM_WORKERS
    passes_cover_every_document_once(served, texts, passes=2)
