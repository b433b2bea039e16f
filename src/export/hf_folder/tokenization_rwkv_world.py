"""The RWKV "world" tokenizer (rwkv_vocab_v20230424) for transformers' AutoTokenizer (trust_remote_code=True).

tools/export_hf.py copies this file into an exported folder beside rwkv_world_trie.py (the training repository's
src/data/tokenizer.py, unchanged) and the vocab file, so that the folder tokenizes offline with the same ids as
training: the trie tokenizer does the work, this class only adapts it to transformers.

Tokens are byte strings, many of them not valid UTF-8 on their own; transformers wants str tokens, so each token's
bytes are carried as a latin-1 str (one char per byte, a bijection) and joined back to bytes when decoding.
Id 0, absent from the vocab file, ends every training document; it is the bos/eos/pad token here. With
add_bos_token=True (what lm-eval passes), encode() puts it in front, as the training repository's LAMBADA
evaluation does; by default encode() gives exactly the ids of the training tokenizer.
"""
import os

from transformers import PreTrainedTokenizer

from .rwkv_world_trie import RWKVTokenizer

VOCAB_FILE = "rwkv_vocab_v20230424.txt"
END_OF_TEXT = "<|rwkv_end_of_text|>"   # id 0's name: a string no RWKV text contains by chance


class RWKVWorldTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, add_bos_token=False, **kwargs):
        self.trie = RWKVTokenizer(vocab_file)
        self.vocab_file = vocab_file
        self.add_bos_token = add_bos_token
        # id -> latin-1 str of the token's bytes, and back; id 0 (and the empty ids) by its special name
        self.id_to_token = [token.decode("latin-1") for token in self.trie.id_to_bytes]
        self.id_to_token[0] = END_OF_TEXT
        self.token_to_id = {token: i for i, token in enumerate(self.id_to_token) if token}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            kwargs.setdefault(name, END_OF_TEXT)
        super().__init__(add_bos_token=add_bos_token, **kwargs)

    @property
    def vocab_size(self):
        return self.trie.real_vocab_size

    def get_vocab(self):
        return dict(self.token_to_id)

    def _tokenize(self, text, **kwargs):
        return [self.id_to_token[i] for i in self.trie.encode(text)]

    def _convert_token_to_id(self, token):
        return self.token_to_id.get(token, 0)

    def _convert_id_to_token(self, index):
        return self.id_to_token[index] if 0 <= index < len(self.id_to_token) else END_OF_TEXT

    def convert_tokens_to_string(self, tokens):
        # id 0 reads as its name unless decode(skip_special_tokens=True) left it out, as transformers does
        return b"".join(token.encode("latin-1") for token in tokens).decode("utf-8", errors="replace")

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        return bos + token_ids_0 + ([] if token_ids_1 is None else bos + token_ids_1)

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return [int(i == self.bos_token_id) for i in token_ids_0 + (token_ids_1 or [])]
        bos = [1] if self.add_bos_token else []
        return bos + [0] * len(token_ids_0) + ([] if token_ids_1 is None else bos + [0] * len(token_ids_1))

    def save_vocabulary(self, save_directory, filename_prefix=None):
        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        if os.path.abspath(path) != os.path.abspath(self.vocab_file):
            with open(self.vocab_file, "rb") as src, open(path, "wb") as dst:
                dst.write(src.read())
        return (path,)
