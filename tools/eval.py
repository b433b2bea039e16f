"""Evaluate a checkpoint; prints one JSON line on stdout (progress and warnings go to stderr).

    python tools/eval.py --model out/L12-D768-x070/rwkv-final.pth --data data/val.jsonl.zst --ctx_len 512
    python tools/eval.py --model out/L12-D768-x070/rwkv-final.pth --lambada data/lambada_test.jsonl

--data takes a binidx (PREFIX, PREFIX.bin or PREFIX.idx) or jsonl(.zst) files, folders or globs:
validation loss and perplexity over non-overlapping ctx_len windows of the token stream (documents
joined by 0 as in training). --lambada: accuracy and perplexity with the RWKV protocol.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from src.config import PerfConfig  # noqa: E402
from src.engine.fast_path import FastPathMismatch, apply_fast_path  # noqa: E402
from src.train.checkpoint import CheckpointError  # noqa: E402
from src.train.evaluate import lambada, load_token_stream, val_loss  # noqa: E402
from src.data.tokenizer import RWKVTokenizer  # noqa: E402
from src.engine.threads import use_cpu_threads  # noqa: E402
from tools.generate import load_model  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOKENS_PER_BATCH = {"cpu": 2048, "cuda": 16384}   # the default --batch_size: sequences x length


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a .pth checkpoint")
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--data", help="binidx prefix or jsonl(.zst) files / folder / glob: validation loss")
    task.add_argument("--lambada", help="LAMBADA jsonl ({\"text\": ...} per line): accuracy and perplexity")
    parser.add_argument("--ctx_len", type=int, default=1024, help="window length for --data")
    parser.add_argument("--max_tokens", type=int, default=0, help="--data: only the first N tokens (0: all)")
    parser.add_argument("--limit", type=int, default=0, help="--lambada: only the first N examples (0: all)")
    parser.add_argument("--batch_size", type=int, default=0,
                        help="sequences per forward pass (0: about 2k tokens on CPU, 16k on GPU)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp32 on CPU, bf16 on GPU")
    parser.add_argument("--vocab", default=None, help="vocab file (default: rwkv_vocab_v20230424.txt)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu")
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    use_cpu_threads(args.device)

    try:
        # on CUDA the fast path's twins (the wkv7 kernel first), each checked against the model
        model = apply_fast_path(load_model(args.model, args.device), PerfConfig(), torch.device(args.device))
        model = model.to(DTYPES[dtype])
        tokenizer = RWKVTokenizer(args.vocab)
        start = time.time()
        result = {"model": args.model, "data": args.data or args.lambada, "device": args.device, "dtype": dtype}
        if args.data:
            batch_size = args.batch_size or max(1, TOKENS_PER_BATCH[args.device] // args.ctx_len)
            tokens = load_token_stream(args.data, tokenizer, args.max_tokens or None)
            loaded = time.time()
            scores = val_loss(model, tokens, args.ctx_len, batch_size, args.device)
            seconds = time.time() - start
            result.update(task="loss", ctx_len=args.ctx_len, tokens=scores["tokens"], loss=scores["loss"],
                          ppl=scores["ppl"], seconds=round(seconds, 3),
                          tokens_per_s=round(scores["tokens"] / max(time.time() - loaded, 1e-9), 1))
        else:
            batch_size = args.batch_size or max(1, TOKENS_PER_BATCH[args.device] // 128)
            scores = lambada(model, tokenizer, args.lambada, args.device, args.limit or None, batch_size)
            seconds = time.time() - start
            result.update(task="lambada", examples=scores["n"], accuracy=scores["accuracy"], ppl=scores["ppl"],
                          seconds=round(seconds, 3), examples_per_s=round(scores["n"] / max(seconds, 1e-9), 2))
    except (CheckpointError, FastPathMismatch, OSError, ValueError) as e:   # DataError, the vocab's: ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
