"""The offline demo: a small RWKV-7 trained on this machine's Python standard library sources, with no download.

It runs the recipe's own path: write the data as a .jsonl shard, `train.py --train_stage 1` (init),
`train.py --train_stage 3` (streamed jsonl training, the loss falls in the progress bar and train_log.txt),
then `tools/generate.py` for a sample. About 3 minutes on an idle 2-core CPU, which train.py uses with one thread
(src/engine/threads.py; --threads to choose); it uses the GPU when there is one.

A rerun starts afresh: stage 1 moves the last run (its checkpoints, train_log.txt and stream positions) to
PROJ_DIR/previous-<time>/, after the demo has deleted the runs moved there before, so that PROJ_DIR holds this run
and the one before it.

    python tools/demo.py
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from src.train.checkpoint import MOVED_ASIDE, TRAIN_LOG  # noqa: E402
from src.config import ConfigError, build_config, check_schedule  # noqa: E402
from train import parse_flags  # noqa: E402


TEST_DIRS = {"test", "tests", "idle_test"}
MAX_FILE_CHARS = 32_000   # a loader worker reads about 100 kB of code a mini-epoch: a larger file would fill most of it


def is_generated(text):
    """Files that say in their first lines that a tool wrote them: codec tables (encodings/cp*.py), the build's
    configuration (_sysconfigdata_*.py), help text (pydoc_data/topics.py), token and keyword lists."""
    return "generated" in "\n".join(text.splitlines()[:3]).lower()


def write_stdlib_shard(path, max_bytes):
    """The standard library's hand-written .py files, tests and files over MAX_FILE_CHARS left out, in an order
    shuffled with a fixed seed (every machine with the same Python gets the same data). Sorted by path, each
    mini-epoch read a few neighbouring files: the last mostly _sysconfigdata_*.py, compiler flags and paths at a
    loss of 7.9 where code was at 5, so the loss rose; shuffled, every mini-epoch reads the same mix."""
    stdlib = sysconfig.get_paths()["stdlib"]
    sources = sorted(os.path.join(d, f) for d, dirs, files in os.walk(stdlib)
                     if "site-packages" not in d and not TEST_DIRS & set(os.path.relpath(d, stdlib).split(os.sep))
                     for f in files if f.endswith(".py"))
    random.Random(0).shuffle(sources)
    written = 0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for source in sources:
            with open(source, encoding="utf-8", errors="replace") as f:
                text = f.read()
            if len(text) > MAX_FILE_CHARS or is_generated(text):
                continue
            out.write(json.dumps({"text": text, "meta": {"file": os.path.relpath(source, stdlib)}}) + "\n")
            written += len(text)
            if written >= max_bytes:
                break
    print(f"demo data: {written / 1e6:.1f} MB of Python sources from {stdlib} -> {path}")


def drop_older_runs(proj_dir):
    """Delete the runs that earlier demos moved aside: stage 1 then moves the last run there, so that proj_dir holds
    this run and the one before it (0.4 GB each on CPU), not every run."""
    for name in os.listdir(proj_dir) if os.path.isdir(proj_dir) else []:
        if name.startswith(MOVED_ASIDE):
            shutil.rmtree(os.path.join(proj_dir, name))


def run(*args, env=None):
    """Run a script of the recipe; if it fails (it has printed why), stop here with its exit status."""
    print("+ " + " ".join(args), flush=True)
    returncode = subprocess.run([sys.executable, *args], cwd=ROOT, env=env).returncode
    if returncode:
        sys.exit(returncode)


def main(argv=None):
    import torch
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proj_dir", default="out/demo")
    parser.add_argument("--n_layer", type=int, default=4 if gpu else 2)
    parser.add_argument("--n_embd", type=int, default=256 if gpu else 128)
    parser.add_argument("--ctx_len", type=int, default=256 if gpu else 64)
    parser.add_argument("--micro_bsz", type=int, default=16 if gpu else 8)
    parser.add_argument("--epoch_steps", type=int, default=35, help="steps per mini-epoch")
    parser.add_argument("--epoch_count", type=int, default=4, help="mini-epochs")
    parser.add_argument("--warmup_steps", type=int, default=10, help="steps of LR warmup, fewer than the run's")
    parser.add_argument("--data_mb", type=float, default=8.0, help="MB of sources to train on")
    parser.add_argument("--length", type=int, default=200, help="tokens to sample at the end")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch, passed on as OMP_NUM_THREADS (0: train.py's automatic choice)")
    args = parser.parse_args(argv)

    proj_dir = os.path.join(ROOT, args.proj_dir)
    data_dir = os.path.join(proj_dir, "data")
    device = ["--accelerator", "gpu", "--precision", "bf16"] if gpu else ["--accelerator", "cpu", "--precision", "fp32"]
    common = ["--proj_dir", proj_dir, "--data_file", data_dir, "--data_type", "jsonl", "--vocab_size", "65536",
              "--ctx_len", str(args.ctx_len), "--n_layer", str(args.n_layer), "--n_embd", str(args.n_embd),
              "--micro_bsz", str(args.micro_bsz), "--epoch_steps", str(args.epoch_steps),
              "--epoch_count", str(args.epoch_count), "--devices", "1", "--strategy", "auto", *device]
    training = [*common, "--train_stage", "3", "--lr_init", "2e-3", "--lr_final", "2e-4",
                "--warmup_steps", str(args.warmup_steps), "--beta1", "0.9", "--beta2", "0.99", "--adam_eps", "1e-18",
                "--epoch_save", "1", "--random_seed", "0"]
    try:
        check_schedule(build_config(parse_flags(training)))   # before stage 1 moves the last run aside
    except ConfigError as e:
        sys.exit(f"error: {e}")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads)) if args.threads > 0 else None
    write_stdlib_shard(os.path.join(data_dir, "stdlib.jsonl"), int(args.data_mb * 1e6))
    drop_older_runs(proj_dir)
    run("train.py", *common, "--train_stage", "1", env=env)
    run("train.py", *training, env=env)
    with open(os.path.join(proj_dir, TRAIN_LOG)) as f:
        print(f"{TRAIN_LOG} (mini-epoch, mean loss, perplexity, lr, time, epoch in run):\n" +
              "".join(line for line in f if line[:1].isdigit()))
    run("tools/generate.py", "--model", os.path.join(proj_dir, "rwkv-final.pth"), "--prompt", "def ",
        "--length", str(args.length), "--temperature", "0.7", "--top_p", "0.9", env=env)


if __name__ == "__main__":
    main()
