"""Print the trainer flags (--my_exit_tokens, --magic_prime) for an existing binidx file.

    python tools/magic_prime.py data/minipile --ctx_len 512
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.data import DataError  # noqa: E402
from src.data.binidx import BinIdx  # noqa: E402
from src.data.dataset import recipe_flags  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefix", help="binidx PREFIX (PREFIX.bin and PREFIX.idx)")
    parser.add_argument("--ctx_len", type=int, default=512, help="the run's --ctx_len (default: 512, MiniPile's)")
    args = parser.parse_args()
    try:
        print(recipe_flags(BinIdx(args.prefix).num_tokens, args.ctx_len))
    except DataError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
