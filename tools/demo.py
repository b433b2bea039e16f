"""The offline demo: a small RWKV-7 trained on this machine's Python standard library sources, with no download.

It runs the recipe's own path: write the data as a .jsonl shard, `train.py --train_stage 1` (init),
`train.py --train_stage 3` (streamed jsonl training, the loss falls in the progress bar and train_log.txt),
then `tools/generate.py` for a sample. A few minutes on 2 CPU cores; it uses the GPU when there is one.

    python tools/demo.py
"""
import argparse
import json
import os
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_stdlib_shard(path, max_bytes):
    """The standard library's .py files (sorted, so every machine with the same Python gets the same data)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    sources = sorted(os.path.join(d, f) for d, dirs, files in os.walk(stdlib)
                     if "site-packages" not in d and "test" not in os.path.relpath(d, stdlib).split(os.sep)
                     for f in files if f.endswith(".py"))
    written = 0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for source in sources:
            with open(source, encoding="utf-8", errors="replace") as f:
                text = f.read()
            out.write(json.dumps({"text": text, "meta": {"file": os.path.relpath(source, stdlib)}}) + "\n")
            written += len(text)
            if written >= max_bytes:
                break
    print(f"demo data: {written / 1e6:.1f} MB of Python sources from {stdlib} -> {path}")


def run(*args):
    print("+ " + " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def main(argv=None):
    import torch
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proj_dir", default="out/demo")
    parser.add_argument("--n_layer", type=int, default=4 if gpu else 2)
    parser.add_argument("--n_embd", type=int, default=256 if gpu else 128)
    parser.add_argument("--ctx_len", type=int, default=256 if gpu else 128)
    parser.add_argument("--micro_bsz", type=int, default=16 if gpu else 8)
    parser.add_argument("--epoch_steps", type=int, default=50, help="steps per mini-epoch")
    parser.add_argument("--epoch_count", type=int, default=4, help="mini-epochs")
    parser.add_argument("--data_mb", type=float, default=8.0, help="MB of sources to train on")
    parser.add_argument("--length", type=int, default=200, help="tokens to sample at the end")
    args = parser.parse_args(argv)

    proj_dir = os.path.join(ROOT, args.proj_dir)
    data_dir = os.path.join(proj_dir, "data")
    write_stdlib_shard(os.path.join(data_dir, "stdlib.jsonl"), int(args.data_mb * 1e6))
    device = ["--accelerator", "gpu", "--precision", "bf16"] if gpu else ["--accelerator", "cpu", "--precision", "fp32"]
    common = ["--proj_dir", proj_dir, "--data_file", data_dir, "--data_type", "jsonl", "--vocab_size", "65536",
              "--ctx_len", str(args.ctx_len), "--n_layer", str(args.n_layer), "--n_embd", str(args.n_embd),
              "--micro_bsz", str(args.micro_bsz), "--epoch_steps", str(args.epoch_steps),
              "--epoch_count", str(args.epoch_count), "--devices", "1", "--strategy", "auto", *device]
    run("train.py", *common, "--train_stage", "1")
    run("train.py", *common, "--train_stage", "3", "--lr_init", "2e-3", "--lr_final", "2e-4", "--warmup_steps", "10",
        "--beta1", "0.9", "--beta2", "0.99", "--adam_eps", "1e-18", "--epoch_save", "1", "--random_seed", "0")
    with open(os.path.join(proj_dir, "train_log.txt")) as f:
        print("train_log.txt (mini-epoch, mean loss, perplexity, lr, time, epoch in run):\n" +
              "".join(line for line in f if line[:1].isdigit()))
    run("tools/generate.py", "--model", os.path.join(proj_dir, "rwkv-final.pth"), "--prompt", "def ",
        "--length", str(args.length), "--temperature", "0.7", "--top_p", "0.9")


if __name__ == "__main__":
    main()
