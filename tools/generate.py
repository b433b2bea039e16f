"""Sample text from an RWKV-7 checkpoint, recurrently (constant work per new token), streaming it as it comes.

    python tools/generate.py --model out/L18-D1024-x070/rwkv-final.pth --prompt "The" --length 200
"""
import argparse
import codecs
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from src.train.checkpoint import CheckpointError, load_state_dict, model_shape, numbered_checkpoints  # noqa: E402
from src.config import ModelConfig  # noqa: E402
from src.model import RWKV  # noqa: E402
from src.data.tokenizer import RWKVTokenizer  # noqa: E402
from src.engine.threads import use_cpu_threads  # noqa: E402

DEFAULT_PROJ_DIR = "out/L18-D1024-x070"   # the 0.36B Pile recipe


def newest_checkpoint(proj_dir):
    """rwkv-final.pth if the run finished, else its highest rwkv-<n>.pth, else rwkv-init.pth."""
    final = os.path.join(proj_dir, "rwkv-final.pth")
    if os.path.exists(final):
        return final
    saved = numbered_checkpoints(proj_dir)
    if not saved:
        raise CheckpointError(f"no rwkv-*.pth in {proj_dir}; pass --model PATH.pth")
    return saved[0][1]


def load_model(path, device):
    state_dict = load_state_dict(path)
    model = RWKV(ModelConfig(**model_shape(state_dict, path)))
    model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return model.to(device).eval()


def sample_token(logits, temperature, top_p, generator):
    """Nucleus sampling: keep the most likely tokens whose probabilities sum to top_p; temperature 0 is greedy."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p   # always keeps the top token
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs.cpu(), 1, generator=generator)
    return int(order[choice.to(order.device)])


def utf8_stream():
    """An incremental UTF-8 decoder: holds back an incomplete character until its next bytes arrive
    (one token can carry part of an emoji), and shows bytes that can never be UTF-8 as U+FFFD."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


@torch.no_grad()
def generate(model, tokenizer, prompt, length, temperature=1.0, top_p=0.85, seed=0, out=None):
    """Yields sampled token ids; writes the text to `out` as it is produced."""
    generator = torch.Generator().manual_seed(seed)
    device = model.emb.weight.device
    ids = tokenizer.encode(prompt) or [0]   # an empty prompt starts a new document
    logits, state = model.forward_with_state(torch.tensor([ids], device=device), model.zero_state(1))
    stream = utf8_stream()
    for _ in range(length):
        token = sample_token(logits[0, -1], temperature, top_p, generator)
        if out is not None:
            out.write(stream.decode(tokenizer.decode_bytes([token])))
            out.flush()
        yield token
        logits, state = model.forward_with_state(torch.tensor([[token]], device=device), state)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help=f"a .pth; default: the newest checkpoint in {DEFAULT_PROJ_DIR}")
    parser.add_argument("--prompt", default="\nThe", help="text to continue")
    parser.add_argument("--length", type=int, default=200, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="softmax temperature; 0 takes the most likely token")
    parser.add_argument("--top_p", type=float, default=0.85, help="sample from the likeliest tokens whose "
                        "probabilities sum to this")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda where there is a GPU)")
    parser.add_argument("--vocab", default=None, help="vocab file (default: rwkv_vocab_v20230424.txt)")
    args = parser.parse_args(argv)

    use_cpu_threads(args.device)
    try:
        path = args.model or newest_checkpoint(DEFAULT_PROJ_DIR)
        model = load_model(path, args.device)
        tokenizer = RWKVTokenizer(args.vocab)
    except (CheckpointError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    cfg = model.cfg
    print(f"# {path}: L{cfg.n_layer}-D{cfg.n_embd}, vocab {cfg.vocab_size}, on {args.device}", file=sys.stderr)
    sys.stdout.write(args.prompt)
    start = time.time()
    n = sum(1 for _ in generate(model, tokenizer, args.prompt, args.length, args.temperature, args.top_p,
                                args.seed, out=sys.stdout))
    print(f"\n# {n} tokens in {time.time() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
