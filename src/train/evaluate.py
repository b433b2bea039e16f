"""Evaluation: held-out loss over a token stream, and LAMBADA with the RWKV protocol.

Both work with any `model` whose call model(idx [B,T]) returns logits [B,T,V] from a zero state
(the RWKV module in any dtype, on any device). Sequences of a batch are right-padded to a multiple
of the kernel's chunk: the model is causal, so padding after a sequence never changes its logits.
No argparse here: the trainer calls `val_loss` after each mini-epoch, tools/eval.py wraps both.
"""
import contextlib
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from src.data import DataError
from src.data.binidx import BinIdx
from src.data.dataset import DataProblems, find_shards, iter_shard_lines
from src.data.tokenizer import END_OF_DOC, RWKVTokenizer
from src.kernels.wkv7 import CHUNK_LEN

IGNORE = -100  # target of a padded position
LOGIT_ROWS = 4096  # positions put through the head at once: [4096, 65536] fp32 logits are 1 GiB


def padded_length(n):
    return max(1, -(-n // CHUNK_LEN)) * CHUNK_LEN


def model_device(model):
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def evaluating(model):
    """eval mode and no grad for the duration; the model's training flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def right_pad(sequences, pad):
    """[B, padded_length(longest)] int64 tensor of the sequences, padded at the end with `pad`."""
    batch = torch.full((len(sequences), padded_length(max(len(s) for s in sequences))), pad, dtype=torch.long)
    for row, seq in zip(batch, sequences):
        row[:len(seq)] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
    return batch


def logit_rows(model, x, mask, rows=LOGIT_ROWS):
    """Yield fp32 logits [n, V] for consecutive runs of the positions where mask [B,T] is true (row-major
    order). A model with hidden() and head (RWKV) puts only those positions through the head, `rows` at
    a time, so all B*T*V logits never exist at once; any other model is called as model(x)."""
    if hasattr(model, "hidden") and hasattr(model, "head"):
        hidden = model.hidden(x)[mask]
        for start in range(0, len(hidden), rows):
            yield model.head(hidden[start:start + rows]).float()
    else:
        yield model(x)[mask].float()


# ---------------------------------------------------------------------------------------------
# Validation loss


def binidx_prefix(path):
    """PREFIX if `path` names a binidx (PREFIX, PREFIX.bin or PREFIX.idx), else None."""
    if path.endswith((".bin", ".idx")):
        return path[:-4]
    return path if os.path.isfile(path + ".bin") or os.path.isfile(path + ".idx") else None


def jsonl_documents(paths, tokenizer, problems):
    """Token arrays of the documents of jsonl(.zst) files / folders / globs, each ended by 0 as in training."""
    for shard in find_shards(paths):
        for line in iter_shard_lines(shard, problems):
            text = problems.text_of(line)
            if text is not None:
                yield np.array(tokenizer.encode(text) + [END_OF_DOC], np.int64)


def load_token_stream(path, tokenizer=None, max_tokens=None, log=None):
    """The token stream of a binidx (a memmap, as the trainer reads it) or of jsonl(.zst) documents
    (tokenized, each ended by 0), cut to its first max_tokens tokens if given. Load it once and pass
    it to `val_loss` on every call: tokenizing is the slow part."""
    prefix = binidx_prefix(path)
    if prefix is not None:
        tokens = BinIdx(prefix).tokens
        return tokens[:max_tokens] if max_tokens else tokens
    tokenizer = tokenizer or RWKVTokenizer()
    problems, parts, total = DataProblems(), [], 0
    for doc in jsonl_documents(path, tokenizer, problems):
        parts.append(doc)
        total += len(doc)
        if max_tokens and total >= max_tokens:
            break
    if report := problems.report():
        (log or (lambda msg: print(msg, file=sys.stderr)))(f"[eval] {report}")
    if total < 2:
        raise DataError(f"{path}: fewer than 2 tokens of documents with a string \"text\"; nothing to evaluate")
    stream = np.concatenate(parts)
    return stream[:max_tokens] if max_tokens else stream


def _windows(tokens, ctx_len, rank, world_size):
    """Yield the windows (inputs + the last target) to evaluate, every world_size-th from rank."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.cpu().numpy()
    is_stream = (tokens.ndim == 1 if isinstance(tokens, np.ndarray)
                 else len(tokens) > 0 and isinstance(tokens[0], (int, np.integer)))
    if not is_stream:
        for i in range(rank, len(tokens), world_size):
            yield tokens[i]
        return
    # non-overlapping windows of ctx_len + 1 tokens sharing one token: each token after the first is a
    # target once; the last window may be shorter
    for start in range(rank * ctx_len, len(tokens) - 1, world_size * ctx_len):
        yield tokens[start:start + ctx_len + 1]


def val_loss(model, tokens, ctx_len, batch_size=4, device=None, rank=0, world_size=1):
    """Mean next-token cross-entropy (natural log) of `model` on held-out tokens.

    tokens: a token stream (1-D list / numpy array or memmap / tensor; see `load_token_stream`), cut
    into non-overlapping windows of ctx_len inputs, or token windows (2-D array, or a list of
    sequences), each scored on its own as inputs w[:-1] and targets w[1:].
    rank / world_size: score every world_size-th window from `rank` (one share per GPU); combine the
    shares as sum(loss_sum) / sum(tokens) (a share with no window gives tokens 0, loss_sum 0).
    Returns dict(loss, ppl, tokens = targets scored, loss_sum).
    """
    device = device or model_device(model)
    loss_sum, count = 0.0, 0
    windows = [w for w in _windows(tokens, ctx_len, rank, world_size) if len(w) >= 2]
    with evaluating(model):
        for first in range(0, len(windows), batch_size):
            batch = windows[first:first + batch_size]
            x = right_pad([w[:-1] for w in batch], END_OF_DOC).to(device)
            y = right_pad([w[1:] for w in batch], IGNORE).to(device)
            mask = y != IGNORE
            targets, start = y[mask], 0
            for logits in logit_rows(model, x, mask):
                loss_sum += F.cross_entropy(logits, targets[start:start + len(logits)], reduction="sum").item()
                start += len(logits)
            count += len(targets)
    if count == 0:
        if world_size == 1:
            raise ValueError("val_loss: no targets to score (need windows of at least 2 tokens)")
        return dict(loss=math.nan, ppl=math.nan, tokens=0, loss_sum=0.0)   # a share with no window: adds nothing
    loss = loss_sum / count
    return dict(loss=loss, ppl=math.exp(min(loss, 700.0)), tokens=count, loss_sum=loss_sum)


# ---------------------------------------------------------------------------------------------
# LAMBADA


def lambada_examples(path, tokenizer, limit=None):
    """[(context ids, target ids)] per line {"text": ...}: split at the last space; context ids =
    [0] + encode(text before it), target ids = encode(the last word with its leading space)."""
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: pass the LAMBADA test set, a jsonl of {{\"text\": ...}} lines "
                        f"(lambada_test.jsonl)")
    examples = []
    for line_no, line in enumerate(iter_shard_lines(path, DataProblems()), 1):
        if limit is not None and len(examples) >= limit:
            break
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
            cut = text.rindex(" ")
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{line_no}: not a LAMBADA line {{\"text\": \"... last-word\"}} "
                            f"with a space before the last word ({type(e).__name__}: {e})") from e
        examples.append(([END_OF_DOC] + tokenizer.encode(text[:cut]), tokenizer.encode(text[cut:])))
    if not examples:
        raise DataError(f"{path}: no LAMBADA examples")
    return examples


def lambada(model, tokenizer, path, device=None, limit=None, batch_size=16):
    """LAMBADA accuracy and perplexity (the RWKV protocol) on the first `limit` lines of `path`.

    The model reads context + target[:-1]; an example is a hit iff the greedy (argmax) token is the
    target token at every target position. ppl = exp(mean over examples of -log P(target)), with
    log P(target) summed over the target's tokens. Returns dict(accuracy, ppl, n).
    """
    device = device or model_device(model)
    examples = lambada_examples(path, tokenizer, limit)
    order = sorted(range(len(examples)), key=lambda i: sum(map(len, examples[i])))  # less padding
    hits, nll_sum = 0, 0.0
    with evaluating(model):
        for first in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[first:first + batch_size]]
            x = right_pad([context + target[:-1] for context, target in batch], END_OF_DOC).to(device)
            mask = torch.zeros(x.shape, dtype=torch.bool)
            for row, (context, target) in zip(mask, batch):
                row[len(context) - 1:len(context) - 1 + len(target)] = True   # the positions predicting the target
            logits = torch.cat(list(logit_rows(model, x, mask.to(device))))
            targets = torch.tensor([t for _, target in batch for t in target], device=logits.device)
            nll = -torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
            hit = logits.argmax(dim=-1) == targets
            lengths = [len(target) for _, target in batch]
            for part_nll, part_hit in zip(nll.split(lengths), hit.split(lengths)):
                nll_sum += part_nll.sum().item()
                hits += bool(part_hit.all())
    n = len(examples)
    return dict(accuracy=hits / n, ppl=math.exp(min(nll_sum / n, 700.0)), n=n)
