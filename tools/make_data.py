"""Convert text to binidx for the magic-prime recipe and print the trainer flags for it.

    python tools/make_data.py INPUT... --output PREFIX [--ctx_len 512] [--copies 1] [--seed 0]

INPUT: .jsonl / .jsonl.zst files (one {"text": ...} per line), .txt files (one document each),
folders of them, or globs. Every document is tokenized and ended by 0. Like the reference
make_data.py, the output holds --copies copies of all documents, each copy in its own
random order. Tokenization runs on every core.
"""

import argparse
import os
import sys
from collections import deque
from multiprocessing import Pool

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from src.data import DataError  # noqa: E402
from src.data.binidx import BinIdx, write_binidx  # noqa: E402
from src.data.dataset import DataProblems, find_shards, iter_shard_blocks, recipe_flags  # noqa: E402
from src.data.tokenizer import END_OF_DOC, RWKVTokenizer  # noqa: E402

INPUT_SUFFIXES = (".jsonl.zst", ".jsonl", ".txt")
_tokenizer = None  # one per worker process


def _init_worker():
    global _tokenizer
    _tokenizer = RWKVTokenizer()


def _tokenize(lines, is_json):
    """Token arrays (each ended by 0) of a block of lines (or of one .txt file), and what was skipped."""
    problems, documents = DataProblems(), []
    for line in lines:
        if is_json:
            text = problems.text_of(line)
            if text is None:
                continue
            ids = _tokenizer.encode(text)
        else:
            ids = _tokenizer.encode_bytes(line)
        documents.append(np.array(ids + [END_OF_DOC], dtype=np.uint16))
    return documents, problems


def _tokenize_in_parallel(blocks, workers):
    """Yield (documents, problems, bytes consumed) per block in input order, few blocks in flight."""
    def collect(job):
        result, consumed = job
        return *result.get(), consumed

    with Pool(workers, _init_worker) as pool:
        in_flight = deque()
        for lines, is_json, consumed in blocks:
            in_flight.append((pool.apply_async(_tokenize, (lines, is_json)), consumed))
            if len(in_flight) > 2 * workers:
                yield collect(in_flight.popleft())
        while in_flight:
            yield collect(in_flight.popleft())


def tokenize_files(files, prefix, workers, problems):
    """Write every document of `files`, in input order, to the binidx `prefix`; return the token count."""
    blocks = ((lines, not path.endswith(".txt"), consumed)
              for path in files for lines, consumed in iter_shard_blocks(path, problems))
    num_tokens = 0
    with tqdm(total=sum(map(os.path.getsize, files)), unit="B", unit_scale=True, desc="tokenizing") as bar:
        def documents():
            nonlocal num_tokens
            for block_documents, block_problems, consumed in _tokenize_in_parallel(blocks, workers):
                problems.merge(block_problems)
                num_tokens += sum(map(len, block_documents))
                bar.update(consumed)
                bar.set_postfix_str(f"{num_tokens / 1e6:.1f}M tokens")
                yield from block_documents

        write_binidx(prefix, documents())
    return num_tokens


def write_shuffled_copies(source_prefix, prefix, copies, seed):
    source = BinIdx(source_prefix)
    starts = source.doc_pointers // source.dtype.itemsize
    rng = np.random.default_rng(seed)
    order = (d for _ in range(copies) for d in rng.permutation(len(starts)))
    documents = (source.tokens[starts[d]:starts[d] + source.doc_sizes[d]] for d in order)
    write_binidx(prefix, tqdm(documents, total=copies * len(starts), desc="shuffling", unit="doc"))
    return copies * source.num_tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help=".jsonl / .jsonl.zst / .txt files, folders or globs")
    parser.add_argument("--output", required=True, help="output PREFIX: writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--ctx_len", type=int, default=512, help="ctx_len to compute --magic_prime for")
    parser.add_argument("--copies", type=int, default=1, help="shuffled copies of the data to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffles")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer processes")
    args = parser.parse_args()
    if args.copies < 1:
        parser.error("--copies must be at least 1")

    try:
        files = find_shards(args.inputs, INPUT_SUFFIXES)
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        problems = DataProblems()
        unshuffled = args.output + ".unshuffled"
        try:
            if tokenize_files(files, unshuffled, args.workers, problems) == 0:
                raise DataError(f"no documents in {' '.join(args.inputs)}: {problems.report() or 'the input is empty'}")
            num_tokens = write_shuffled_copies(unshuffled, args.output, args.copies, args.seed)
        finally:
            for suffix in (".bin", ".idx"):
                if os.path.exists(unshuffled + suffix):
                    os.remove(unshuffled + suffix)
    except DataError as error:
        sys.exit(f"error: {error}")
    except OSError as error:   # the inputs were found readable files: most likely --output cannot be written
        sys.exit(f"error: {error.filename}: {error.strerror}; pass --output a PREFIX in a folder you can write to")
    if report := problems.report():
        print(f"warning: {report}")
    print(f"wrote {args.output}.bin/.idx: {num_tokens} tokens from {len(files)} files, {args.copies} copies")
    try:
        print(recipe_flags(num_tokens, args.ctx_len))
    except DataError as error:
        print(f"note: {error}")

if __name__ == "__main__":
    main()
