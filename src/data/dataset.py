"""Training data: the magic-prime binidx sampler and the streaming JSONL (The Pile) loader.

Trainer contract for both datasets: set `real_epoch`, `global_rank` and `world_size` on the
dataset before each mini-epoch, then build a fresh DataLoader(dataset, batch_size=micro_bsz,
shuffle=False, drop_last=True, persistent_workers=False) with num_workers=1 for
BinidxDataset and num_workers=STREAM_WORKERS for JsonlStreamDataset.

A run resumed inside a mini-epoch (a full state, src/train/full_state.py) sets `start_step`, the
batches of the mini-epoch already trained, before the loader measures its length: the mini-epoch
then serves exactly the batches start_step, start_step + 1, ... of the uninterrupted run. The stream
also needs `start_positions`: each loader worker's position after its last batch, which it sends as a
third element of every sample (a JSON string, so it stays on the host) for the trainer to save.
"""

import functools
import glob
import json
import math
import os

import numpy as np
import torch
import zstandard
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from src.config import MINI_EPOCH_SAMPLES
from src.data import DataError
from src.data.binidx import BinIdx
from src.data.tokenizer import END_OF_DOC, RWKVTokenizer
STREAM_WORKERS = 2  # DataLoader workers per rank for JsonlStreamDataset (any count is correct)

# ---------------------------------------------------------------------------------------------
# The magic prime


def is_prime(n):
    """Deterministic Miller-Rabin (exact for n < 3.3e24)."""
    if n < 2:
        return False
    witnesses = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    if n in witnesses:
        return True
    if any(n % w == 0 for w in witnesses):
        return False
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for w in witnesses:
        x = pow(w, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _largest_magic_prime(slots):
    """Largest prime p <= slots - 1 with p % 3 == 2 (cubing then permutes the residues mod p)."""
    for p in range(slots - 1, 1, -1):
        if p % 3 == 2 and is_prime(p):
            return p
    return 0


def _in_range(magic_prime, data_size, ctx_len):
    """0.9 < p / slots, and the last slot's ctx_len + 1 tokens fit in the data."""
    slots = data_size // ctx_len
    return 10 * magic_prime > 9 * slots and magic_prime * ctx_len + 1 <= data_size


def find_magic_prime(data_size, ctx_len):
    """The recipe's --magic_prime for a token stream of data_size tokens."""
    magic_prime = _largest_magic_prime(data_size // ctx_len)
    if not _in_range(magic_prime, data_size, ctx_len):
        raise DataError(
            f"{data_size} tokens hold only {data_size // ctx_len} samples of ctx_len {ctx_len}, too few "
            f"for a magic prime within 90% of them: use more data (tools/make_data.py --copies K) "
            f"or a smaller --ctx_len")
    return magic_prime


def check_magic_prime(magic_prime, data_size, ctx_len, path):
    if not is_prime(magic_prime):
        problem = "is not prime"
    elif magic_prime % 3 != 2:
        problem = "is not 2 mod 3"
    elif not _in_range(magic_prime, data_size, ctx_len):
        problem = f"is out of range (needs 0.9 < p / {data_size // ctx_len} slots and p * ctx_len < tokens)"
    else:
        return
    raise DataError(
        f"--magic_prime {magic_prime} {problem} for {path} ({data_size} tokens, ctx_len {ctx_len}): "
        f"use --magic_prime {find_magic_prime(data_size, ctx_len)}")


def recipe_flags(data_size, ctx_len):
    """The trainer flags for a binidx of data_size tokens, plus a note if it is under one mini-epoch."""
    magic_prime = find_magic_prime(data_size, ctx_len)
    flags = f"--my_exit_tokens {data_size} --magic_prime {magic_prime} --ctx_len {ctx_len}"
    if magic_prime >= MINI_EPOCH_SAMPLES:
        return flags
    copies = 2
    while _largest_magic_prime(copies * data_size // ctx_len) < MINI_EPOCH_SAMPLES:
        copies += 1
    return (f"{flags}\nnote: {data_size} tokens are {magic_prime} samples of ctx_len {ctx_len}, less than one "
            f"mini-epoch ({MINI_EPOCH_SAMPLES} samples): the run stops at --my_exit_tokens inside mini-epoch 0, "
            f"before its first checkpoint; for a full mini-epoch use make_data.py --copies {copies} or more data")


def sample_start(magic_prime, ctx_len, epoch, idx, world_size, rank):
    """Token offset of sample idx of mini-epoch epoch on rank of world_size (the reference's formula)."""
    ii = 1 + epoch * MINI_EPOCH_SAMPLES + idx * world_size + rank
    factor = int(magic_prime * ((math.sqrt(5) - 1) / 2))  # float64, exactly as the reference
    return (factor * ii ** 3 % magic_prime) * ctx_len


def check_real_bsz(micro_bsz, world_size, epoch_steps):
    real_bsz = micro_bsz * world_size
    if MINI_EPOCH_SAMPLES % real_bsz:
        valid = [m for m in range(1, 257) if MINI_EPOCH_SAMPLES % (m * world_size) == 0]
        raise DataError(
            f"real_bsz = micro_bsz {micro_bsz} x {world_size} GPUs = {real_bsz} does not divide the "
            f"{MINI_EPOCH_SAMPLES}-sample mini-epoch: use --micro_bsz in {valid}")
    if epoch_steps != MINI_EPOCH_SAMPLES // real_bsz:
        raise DataError(
            f"--epoch_steps {epoch_steps} with real_bsz {real_bsz} does not make a {MINI_EPOCH_SAMPLES}-sample "
            f"mini-epoch: the magic-prime sampler needs --epoch_steps {MINI_EPOCH_SAMPLES // real_bsz}")


def _sample(window):
    window = torch.from_numpy(np.asarray(window, dtype=np.int64))
    return window[:-1], window[1:]


class BinidxDataset(Dataset):
    """The magic-prime sampler over a binidx token stream (bit-exact with the reference)."""

    def __init__(self, data_file, ctx_len, magic_prime, micro_bsz, world_size, vocab_size, epoch_steps):
        self.data = BinIdx(data_file)
        self.data.check_vocab(vocab_size)
        check_real_bsz(micro_bsz, world_size, epoch_steps)
        data_size = self.data.num_tokens
        if data_size < ctx_len + 1:
            raise DataError(
                f"{data_file}.bin has {data_size} tokens, fewer than one sample (ctx_len + 1 = {ctx_len + 1}): "
                f"use more data or a smaller --ctx_len")
        check_magic_prime(magic_prime, data_size, ctx_len, data_file)
        self.ctx_len, self.magic_prime = ctx_len, magic_prime
        self.micro_bsz, self.epoch_steps = micro_bsz, epoch_steps
        self.real_epoch, self.global_rank, self.world_size = 0, 0, world_size  # set by the trainer
        self.start_step = 0

    def __len__(self):
        return (self.epoch_steps - self.start_step) * self.micro_bsz

    def resume_at(self, step, positions):
        """Serve the current mini-epoch from batch `step` on (the magic-prime order needs no reader positions)."""
        self.start_step = step

    def __getitem__(self, idx):
        idx += self.start_step * self.micro_bsz
        start = sample_start(self.magic_prime, self.ctx_len, self.real_epoch, idx, self.world_size, self.global_rank)
        return _sample(self.data.tokens[start:start + self.ctx_len + 1])


# ---------------------------------------------------------------------------------------------
# JSONL shards (The Pile's NN.jsonl.zst)

SHARD_SUFFIXES = (".jsonl.zst", ".jsonl")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_READ_BYTES = 1 << 20  # compressed bytes per read


def find_shards(paths, suffixes=SHARD_SUFFIXES):
    """Files named by `paths` (files, folders of such files, or globs), validated and sorted."""
    shards = []
    for path in [paths] if isinstance(paths, str) else paths:
        if os.path.isdir(path):
            found = sorted(f for f in glob.glob(os.path.join(path, "*")) if f.endswith(suffixes))
            if not found:
                raise DataError(f"{path} holds no {' / '.join(suffixes)} files: point at the folder of the shards")
        elif os.path.isfile(path):
            found = [path]
        else:
            found = sorted(glob.glob(path))
            if not found:
                raise DataError(f"{path}: no such file or folder, and no file matches it as a glob")
        shards += [f for f in found if f not in shards]
    for shard in shards:
        if not shard.endswith(suffixes):
            raise DataError(f"{shard}: unknown file type, expected {' / '.join(suffixes)}")
        if os.path.getsize(shard) == 0:
            raise DataError(f"{shard} is empty: re-download or remove it")
        if shard.endswith(".zst"):
            with open(shard, "rb") as f:
                if f.read(4) != _ZSTD_MAGIC:
                    raise DataError(f"{shard} is not zstd-compressed (bad magic): re-download it or rename it to .jsonl")
    return shards


class DataProblems:
    """What a long run skips instead of failing on: bad lines and truncated or corrupt shards."""

    def __init__(self):
        self.bad_lines = 0
        self.broken_shards = []

    def text_of(self, line):
        """The "text" of one JSON line; None for a blank line, or (counted) one that is not JSON
        or has no string "text"."""
        if not line.strip():
            return None
        try:
            text = json.loads(line)["text"]
        except (ValueError, KeyError, TypeError, IndexError):
            text = None
        if not isinstance(text, str):
            self.bad_lines += 1
            return None
        return text

    def merge(self, other):
        self.bad_lines += other.bad_lines
        self.broken_shards += other.broken_shards

    def report(self):
        """One line describing what was skipped, or None if nothing was."""
        parts = []
        if self.bad_lines:
            parts.append(f"skipped {self.bad_lines} lines that are not JSON or have no string \"text\"")
        for shard, reason in self.broken_shards:
            parts.append(f"{shard} is truncated or corrupt ({reason}): read up to there, its partial "
                         f"last line dropped; re-download it")
        return "; ".join(parts) or None


def _read_blocks(file, zstd):
    """Yield (data, file bytes consumed); a zstd file may hold several frames, the last one complete."""
    if not zstd:
        while raw := file.read(_READ_BYTES):
            yield raw, len(raw)
        return
    decompressor = zstandard.ZstdDecompressor()
    frame = decompressor.decompressobj()
    while raw := file.read(_READ_BYTES):
        data, consumed = b"", len(raw)
        while raw:
            if frame.eof:
                frame = decompressor.decompressobj()
            data += frame.decompress(raw)
            raw = frame.unused_data if frame.eof else b""
        yield data, consumed
    if not frame.eof:
        raise zstandard.ZstdError("truncated: the stream ends inside a frame")


def iter_shard_blocks(path, problems):
    """Yield (complete lines, file bytes consumed) of a .jsonl / .jsonl.zst / .txt file.

    A .txt file is one document: one "line" holding the whole file. A truncated or corrupt
    .zst ends early, recorded in `problems`, instead of stopping a long run.
    """
    pending = b""
    with open(path, "rb") as file:
        try:
            for data, consumed in _read_blocks(file, zstd=path.endswith(".zst")):
                if path.endswith(".txt"):
                    pending += data
                    lines = []
                else:
                    lines = (pending + data).split(b"\n")
                    pending = lines.pop()
                yield lines, consumed
        except zstandard.ZstdError as error:
            problems.broken_shards.append((path, str(error)))
            return
    if pending:
        yield [pending], 0


def iter_shard_lines(path, problems):
    for lines, _ in iter_shard_blocks(path, problems):
        yield from lines


# ---------------------------------------------------------------------------------------------
# The streaming loader


def _batches_served(batches, worker, num_workers):
    """How many of a mini-epoch's first `batches` batches loader worker `worker` serves (the k-th goes to worker
    k % num_workers)."""
    return batches // num_workers + (worker < batches % num_workers)


@functools.lru_cache(maxsize=None)
def _shared_tokenizer(vocab_path):
    return RWKVTokenizer(vocab_path)


class JsonlStreamDataset(IterableDataset):
    """Documents of JSONL shards, tokenized on the fly, each ended by 0, packed into windows of
    ctx_len + 1 tokens (consecutive windows share one token, so every token is a target once).

    Reader k of n (k = global_rank * num_workers + worker, n = world_size * num_workers) takes
    line i of the j-th shard of a pass when (i + j) % n == k: readers never share a document
    and together cover the pass. Each pass visits the shards in an order drawn from `seed`.
    After each mini-epoch every reader saves where it stopped in `state_dir`; mini-epoch e
    starts from the position saved after e - 1, so a restart resumes exactly.
    """

    def __init__(self, paths, ctx_len, micro_bsz, epoch_steps, seed, state_dir, vocab_path=None):
        self.shards = find_shards(paths)
        self.ctx_len, self.micro_bsz, self.epoch_steps, self.seed = ctx_len, micro_bsz, epoch_steps, seed
        self.state_dir = state_dir
        self.tokenizer = _shared_tokenizer(vocab_path)  # built here, so forked loader workers share it
        # a saved position only means something for the same shards in the same order
        self.data_key = {"seed": seed, "shards": [[os.path.basename(s), os.path.getsize(s)] for s in self.shards]}
        self.real_epoch, self.global_rank, self.world_size = 0, 0, 1  # set by the trainer
        self.start_step, self.start_positions = 0, {}

    def __len__(self):
        return (self.epoch_steps - self.start_step) * self.micro_bsz

    def resume_at(self, step, positions):
        """Serve the current mini-epoch from batch `step` on, each reader from its position after its last batch
        ({reader name: position}; a reader missing there starts from the end saved after the previous mini-epoch)."""
        self.start_step, self.start_positions = step, positions

    def __iter__(self):
        worker = get_worker_info()
        return self.samples(*((worker.id, worker.num_workers) if worker else (0, 1)))

    def samples(self, worker, num_workers):
        """The (x, y, position) samples of loader worker `worker` of `num_workers` on this rank in mini-epoch
        real_epoch: its share of the rank's epoch_steps batches of micro_bsz samples, from batch start_step on."""
        # the loader hands batch k to worker k % num_workers: batch start_step + k of the mini-epoch was served by
        # worker (start_step + k) % num_workers, whose reader this worker continues
        worker = (worker + self.start_step) % num_workers
        epoch_quota = _batches_served(self.epoch_steps, worker, num_workers) * self.micro_bsz
        quota = epoch_quota - _batches_served(self.start_step, worker, num_workers) * self.micro_bsz
        name = f"rank{self.global_rank}of{self.world_size}-worker{worker}of{num_workers}"
        if quota == 0:
            if name in self.start_positions:   # it served its last batch of the mini-epoch before the save
                self._save_position(name, self.start_positions[name])
            return
        if name in self.start_positions:
            start_epoch, position = self.real_epoch, self.start_positions[name]
        else:
            start_epoch, position = self._resume_point(name)
        problems = DataProblems()
        reader, num_readers = self.global_rank * num_workers + worker, self.world_size * num_workers
        windows = self._windows(reader, num_readers, position, problems)
        for _ in range((self.real_epoch - start_epoch) * epoch_quota):  # replay mini-epochs with no saved end
            next(windows)
        for n in range(quota):
            window, position = next(windows)
            if n == quota - 1:  # before the last yield: the consumer may stop right after it
                self._save_position(name, position)
                if report := problems.report():
                    print(f"[data] {name} mini-epoch {self.real_epoch}: {report}", flush=True)
            yield (*_sample(window), json.dumps({"reader": name, **position}))

    def _windows(self, reader, num_readers, position, problems):
        """Yield (window of ctx_len + 1 tokens, position after it) from `position` on."""
        buffer, start = np.empty(0, np.int64), 0
        used = position["offset"] if position else 0  # tokens of the first document already served
        for where, tokens in self._documents(reader, num_readers, position, problems):
            buffer = np.concatenate([buffer[start:], tokens])
            doc_start = len(buffer) - len(tokens)
            start, used = used, 0  # only the first document skips tokens, and it starts at 0
            while len(buffer) - start > self.ctx_len:
                window = buffer[start:start + self.ctx_len + 1]
                start += self.ctx_len
                # what is left starts inside this document: the buffer held <= ctx_len tokens before it
                yield window, {**where, "offset": start - doc_start}

    def _documents(self, reader, num_readers, position, problems):
        """Yield ({pass, shard, line}, tokens + [0]) of the reader's documents, from `position` on."""
        where = position or {"pass": 0, "shard": 0, "line": 0}
        pass_index, first_shard, first_line = where["pass"], where["shard"], where["line"]
        while True:
            full_pass, pass_tokens = first_shard == 0 and first_line == 0, 0
            order = np.random.default_rng([self.seed, pass_index]).permutation(len(self.shards))
            for j in range(first_shard, len(order)):
                for i, line in enumerate(iter_shard_lines(self.shards[order[j]], problems)):
                    if i < first_line or (i + j) % num_readers != reader:
                        continue
                    text = problems.text_of(line)
                    if text is not None:
                        tokens = np.array(self.tokenizer.encode(text) + [END_OF_DOC], np.int64)
                        pass_tokens += len(tokens)
                        yield {"pass": pass_index, "shard": j, "line": i}, tokens
                first_line = 0
            if full_pass and pass_tokens <= self.ctx_len:
                raise DataError(
                    f"reader {reader} of {num_readers} (ranks x loader workers) got {pass_tokens} tokens in a "
                    f"whole pass over {len(self.shards)} shards, less than one sample (ctx_len + 1 = "
                    f"{self.ctx_len + 1}): use fewer loader workers or more data")
            pass_index, first_shard = pass_index + 1, 0

    def _state_path(self, name, epoch):
        return os.path.join(self.state_dir, f"stream-{name}-after-{epoch}.json")

    def _save_position(self, name, position):
        path = self._state_path(name, self.real_epoch)
        # made here, not when the stream is built: a new run's init moves an earlier run's positions aside after that
        os.makedirs(self.state_dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump({"data": self.data_key, "position": position}, f)
        os.replace(path + ".tmp", path)  # atomic: a crash never leaves half a file

    def _resume_point(self, name):
        """(first mini-epoch after the saved position, position) for serving real_epoch."""
        last = next((e for e in range(self.real_epoch - 1, -1, -1) if os.path.isfile(self._state_path(name, e))), -1)
        if last < self.real_epoch - 1:
            print(f"[data] warning: {self.state_dir} has no stream position of {name} after mini-epoch "
                  f"{self.real_epoch - 1}; replaying mini-epochs {last + 1}..{self.real_epoch - 1} "
                  f"(deterministic, slower)", flush=True)
        if last < 0:
            return 0, None
        path = self._state_path(name, last)
        with open(path) as f:
            state = json.load(f)
        if state["data"] != self.data_key:
            raise DataError(
                f"{path} was saved for other data or seed ({state['data']['seed']}, "
                f"{len(state['data']['shards'])} shards): resume with the same --data_file and seed, "
                f"or give a new state dir to start over")
        return last + 1, state["position"]
