"""binidx (Megatron / GPT-NeoX indexed dataset): a memory-mapped reader and a writer.

PREFIX.idx, little-endian: 9-byte magic, u64 version (1), u8 dtype code, u64 number of
sequences n, u64 number of doc_idx entries m, int32 sizes[n], int64 byte pointers[n],
int64 doc_idx[m]. PREFIX.bin is the raw token array; the trainer reads it as one stream.
"""

import os
import struct

import numpy as np

from src.data import DataError

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, n, m
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_SCAN_TOKENS = 1 << 24  # tokens per slice when scanning the whole .bin (bounded memory)
REBUILD_HINT = "rebuild it with tools/make_data.py"


class BinIdx:
    def __init__(self, prefix):
        self.prefix = prefix
        self.idx_path, self.bin_path = prefix + ".idx", prefix + ".bin"
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise DataError(
                    f"{path} not found: a binidx data file is a PREFIX.bin + PREFIX.idx pair, given "
                    f"as PREFIX (no extension); make one with tools/make_data.py")
        self.dtype, num_docs = self._read_header()
        itemsize = self.dtype.itemsize
        self.doc_sizes = np.memmap(self.idx_path, np.int32, "r", _HEADER.size, (num_docs,))
        self.doc_pointers = np.memmap(self.idx_path, np.int64, "r", _HEADER.size + 4 * num_docs, (num_docs,))

        bin_bytes = os.path.getsize(self.bin_path)
        idx_bytes = int(self.doc_pointers[-1]) + int(self.doc_sizes[-1]) * itemsize if num_docs else 0
        if bin_bytes != idx_bytes:
            raise DataError(
                f"{self.bin_path} has {bin_bytes} bytes but {self.idx_path} describes {idx_bytes} "
                f"({self.dtype} tokens): the pair is truncated or from different runs; {REBUILD_HINT}")
        if bin_bytes == 0:
            raise DataError(f"{self.bin_path} holds no tokens; {REBUILD_HINT} from non-empty input")
        self.num_tokens = bin_bytes // itemsize
        self.tokens = np.memmap(self.bin_path, self.dtype, "r", shape=(self.num_tokens,))

    def _read_header(self):
        idx_bytes = os.path.getsize(self.idx_path)
        with open(self.idx_path, "rb") as f:
            header = f.read(_HEADER.size)
        if len(header) < _HEADER.size or header[:len(_MAGIC)] != _MAGIC:
            raise DataError(f"{self.idx_path} is not a binidx index (bad magic or too short); {REBUILD_HINT}")
        _, version, dtype_code, num_docs, num_doc_idx = _HEADER.unpack(header)
        if version != _VERSION:
            raise DataError(f"{self.idx_path}: index version {version}, only {_VERSION} is supported; {REBUILD_HINT}")
        if dtype_code not in DTYPE_CODES:
            known = ", ".join(f"{code} {np.dtype(t)}" for code, t in DTYPE_CODES.items())
            raise DataError(
                f"{self.idx_path}: unknown token dtype code {dtype_code} (known: {known}); {REBUILD_HINT}")
        expected = _HEADER.size + 12 * num_docs + 8 * num_doc_idx
        if idx_bytes != expected:
            raise DataError(
                f"{self.idx_path} has {idx_bytes} bytes but its header ({num_docs} documents) needs "
                f"{expected}: it is truncated or corrupt; {REBUILD_HINT}")
        return np.dtype(DTYPE_CODES[dtype_code]), num_docs

    def check_vocab(self, vocab_size):
        """Raise DataError if any token id is outside [0, vocab_size) (scans the whole file)."""
        info = np.iinfo(self.dtype)
        if info.min >= 0 and info.max < vocab_size:
            return  # every value of this dtype is a valid id (u16 data with vocab 65536)
        low, high, first_bad = 0, 0, None
        for start in range(0, self.num_tokens, _SCAN_TOKENS):
            part = self.tokens[start:start + _SCAN_TOKENS]
            part_low, part_high = int(part.min()), int(part.max())
            if first_bad is None and (part_low < 0 or part_high >= vocab_size):
                first_bad = start + int(np.flatnonzero((part < 0) | (part >= vocab_size))[0])
            low, high = min(low, part_low), max(high, part_high)
        if first_bad is None:
            return
        document = int(np.searchsorted(self.doc_pointers, first_bad * self.dtype.itemsize, side="right")) - 1
        raise DataError(
            f"{self.bin_path}: token id {self.tokens[first_bad]} at token {first_bad} (document {document}) "
            f"is outside [0, vocab_size={vocab_size}); ids found span [{low}, {high}]: tokenize with the "
            f"vocab the model uses (tools/make_data.py) or set --vocab_size above {high}")


def write_binidx(prefix, documents, dtype=np.uint16):
    """Write documents (iterables of token ids, each already ended by 0) to PREFIX.bin/.idx."""
    dtype = np.dtype(dtype)
    codes = {np.dtype(t): code for code, t in DTYPE_CODES.items()}
    if dtype not in codes:
        raise ValueError(f"binidx cannot store {dtype} tokens; use one of {sorted(map(str, codes))}")
    info = np.iinfo(dtype)
    sizes = []
    with open(prefix + ".bin", "wb") as f:
        for doc in documents:
            doc = np.asarray(doc)
            if doc.size and (doc.min() < info.min or doc.max() > info.max):
                raise DataError(
                    f"{prefix}.bin: document {len(sizes)} has token ids in [{doc.min()}, {doc.max()}] "
                    f"that do not fit {dtype}; write it with dtype=np.int32")
            f.write(doc.astype(dtype, copy=False).tobytes())
            sizes.append(doc.size)
    sizes = np.array(sizes, dtype=np.int32)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    np.cumsum(sizes[:-1] * np.int64(dtype.itemsize), out=pointers[1:])
    doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
    with open(prefix + ".idx", "wb") as f:
        f.write(_HEADER.pack(_MAGIC, _VERSION, codes[dtype], len(sizes), len(doc_idx)))
        f.write(sizes.tobytes() + pointers.tobytes() + doc_idx.tobytes())
