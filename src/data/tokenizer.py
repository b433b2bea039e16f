"""The RWKV "world" tokenizer (rwkv_vocab_v20230424): greedy longest match over a byte trie.

Ids equal the `rwkv` package's TRIE_TOKENIZER on every input. Speed comes from a cache:
the text is cut into word-like chunks, each chunk is tokenized once, and its ids are
reused while the chunk boundary provably cannot change the greedy match (see
`_tokenize_chunk`), so the result is exact whatever the cut.
"""

import ast
import os
import re

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_VOCAB = os.path.join(REPO_ROOT, "rwkv_vocab_v20230424.txt")
VOCAB_FIX = "pass the path of rwkv_vocab_v20230424.txt (it is committed at the top of the repository)"
END_OF_DOC = 0  # id 0 is not in the vocab file; it ends every document

# Any cut is correct (chunks that could merge across the cut are re-tokenized together);
# this one follows the vocab's shape (" word", " 123", punctuation runs, whitespace runs)
# so most chunks are cache hits that need no merging.
_CHUNK_RE = re.compile(rb" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9\x80-\xff]+|[\x80-\xff]+|\s+")
_TOKEN_ID = -1  # key under which a trie node stores the id of the token ending there
_CACHE_LIMIT = 1 << 20  # chunks kept before the cache is reset (bounds memory on long runs)
_CACHE_MAX_CHUNK = 64  # longer chunks (e.g. runs of CJK text) rarely repeat: not cached
_END_OF_TEXT = (256,)  # stands for the chunk after the last one: its "first byte" continues no match


def _parse_vocab(path):
    """Yield (id, token bytes) from lines `<id> <python str/bytes literal> <byte length>`."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                first, last = line.index(" "), line.rindex(" ")
                token = ast.literal_eval(line[first:last].strip())
                token_id, length = int(line[:first]), int(line[last:])
            except (ValueError, SyntaxError) as e:
                raise ValueError(f"{path}:{line_no} is not a vocab line (<id> <token literal> <byte length>); "
                                 f"{VOCAB_FIX}") from e
            if isinstance(token, str):
                token = token.encode("utf-8")
            if len(token) != length:
                raise ValueError(f"{path}:{line_no}: token length {len(token)} != {length}")
            yield token_id, token


class RWKVTokenizer:
    def __init__(self, vocab_path=None):
        vocab_path = vocab_path or DEFAULT_VOCAB
        if not os.path.isfile(vocab_path):
            raise FileNotFoundError(f"tokenizer vocab {vocab_path} not found; {VOCAB_FIX}")
        vocab = dict(_parse_vocab(vocab_path))
        self.real_vocab_size = max(vocab) + 1  # 65530: the entries plus id 0
        self.id_to_bytes = [b""] * self.real_vocab_size
        self._trie = {}
        for token_id, token in vocab.items():
            self.id_to_bytes[token_id] = token
            node = self._trie
            for byte in token:
                node = node.setdefault(byte, {})
            node[_TOKEN_ID] = token_id
        self._cache = {}

    @property
    def vocab_size(self):
        """The embedding size the recipe uses: ids rounded up to a multiple of 64 (65536)."""
        return (self.real_vocab_size + 63) // 64 * 64

    def encode(self, text):
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data):
        ids = []
        chunks = _CHUNK_RE.findall(data)
        carry = b""  # the unsettled tail of the previous chunk, to be re-tokenized with this one
        for chunk, next_chunk in zip(chunks, chunks[1:] + [_END_OF_TEXT]):
            if carry:
                chunk, carry = carry + chunk, b""
            entry = self._cache.get(chunk) or self._tokenize_chunk(chunk)
            chunk_ids, frontier, settled_ids, tail = entry
            if next_chunk[0] in frontier:
                ids += settled_ids
                carry = tail
            else:
                ids += chunk_ids
        return ids

    def _tokenize_chunk(self, chunk):
        """Greedy longest match on one chunk, plus what is needed to know if it holds in context.

        A match whose trie walk reached the end of the chunk could grow if the text goes on
        with one of the bytes that continue that walk (the `frontier`). If the next chunk
        starts with such a byte, only the ids before the first such match are final
        (`settled_ids`); the rest of the chunk (`tail`) is re-tokenized with the next chunk.
        """
        ids, open_nodes = [], []
        settled_ids, tail = None, b""
        pos = 0
        while pos < len(chunk):
            node, end = self._trie, pos
            match_id, match_end = None, pos
            while end < len(chunk):
                node = node.get(chunk[end])
                if node is None:
                    break
                end += 1
                if _TOKEN_ID in node:
                    match_id, match_end = node[_TOKEN_ID], end
            if node is not None and len(node) > (_TOKEN_ID in node):  # walk still open at the end
                if settled_ids is None:
                    settled_ids, tail = tuple(ids), chunk[pos:]
                open_nodes.append(node)
            ids.append(match_id)
            pos = match_end
        # the bytes that continue an open walk; a trie node's keys are those bytes (and _TOKEN_ID)
        frontier = open_nodes[0] if len(open_nodes) == 1 else frozenset().union(*open_nodes)
        entry = (tuple(ids), frontier, settled_ids, tail)
        if len(chunk) <= _CACHE_MAX_CHUNK:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[chunk] = entry
        return entry

    def decode_bytes(self, ids):
        """Concatenated token bytes; id 0 (end of document) and unknown ids give no bytes."""
        table, size = self.id_to_bytes, self.real_vocab_size
        return b"".join(table[i] if 0 <= i < size else b"" for i in ids)

    def decode(self, ids):
        """Text of the ids; a partial UTF-8 sequence (e.g. one token of an emoji) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")
