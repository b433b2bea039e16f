"""Export a checkpoint as a Hugging Face folder that fla's RWKV7ForCausalLM loads (pip install -r
requirements-export.txt):

    python tools/export_hf.py out/L12-D768-x070/rwkv-final.pth out/L12-D768-hf

The folder holds config.json (sizes, head size and LoRA ranks read from the weights), model.safetensors (fla's key
names and layouts, the checkpoint's dtype), and the RWKV world tokenizer (tokenizer_config.json, the vocab and two
small Python files). Load it with trust_remote_code=True:

    AutoTokenizer.from_pretrained(OUT_DIR, trust_remote_code=True)
    AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.export.hf import export  # noqa: E402
from src.train.checkpoint import CheckpointError  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a .pth that train.py wrote")
    parser.add_argument("out_dir", help="the folder to write (made if missing; its files are overwritten)")
    parser.add_argument("--vocab", default=None, help="vocab file (default: rwkv_vocab_v20230424.txt)")
    args = parser.parse_args(argv)
    try:
        config = export(args.checkpoint, args.out_dir, args.vocab)
    except ImportError as e:
        print(f"error: {e.name or e} is not installed; pip install -r requirements-export.txt", file=sys.stderr)
        return 2
    except (CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out_dir}: L{config['num_hidden_layers']}-D{config['hidden_size']}, head size {config['head_dim']}, "
          f"vocab {config['vocab_size']}, {config['dtype']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
