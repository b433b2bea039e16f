"""Helpers for the data tests: the shared corpus and small Pile-format shards."""

import itertools
import json
import os

import zstandard

from src.dataset import DataProblems, iter_shard_lines

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(REPO_ROOT, "..", "shared", "data", "corpus")


def corpus_texts(shard, max_chars):
    """Texts of the first documents of a shared-corpus shard, cut to max_chars in all."""
    texts, total = [], 0
    for line in iter_shard_lines(os.path.join(CORPUS, shard), DataProblems()):
        texts.append(json.loads(line)["text"][:max_chars - total])
        total += len(texts[-1])
        if total >= max_chars:
            break
    return texts


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
