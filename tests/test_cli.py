"""The first hour on a fresh clone: every tool ends a bad or missing file with one `error:` line (no traceback),
train.py --help describes every flag, normal runs print no warnings a user cannot act on, and the MiniPile scripts
agree with each other and with tools/magic_prime.py."""
import glob
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from src.data.binidx import write_binidx
from src.config import flag_fields
from src.data.dataset import recipe_flags
from train import shown_default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = pathlib.Path(ROOT) / "README.md"
TINY = ["--n_layer", "1", "--n_embd", "32", "--head_size", "32", "--vocab_size", "65536", "--ctx_len", "16",
        "--micro_bsz", "2", "--data_type", "jsonl", "--epoch_steps", "2", "--epoch_count", "1", "--devices", "1",
        "--strategy", "auto", "--precision", "32", "--enable_progress_bar", "False", "--random_seed", "0"]
MINIPILE_TOKENS, MINIPILE_CTX_LEN, MINIPILE_MAGIC_PRIME = 1_498_226_207, 512, 2_926_181


def run_tool(*args, env=None):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def assert_one_error_line(result, named, fix):
    """Nonzero exit, no traceback, and exactly one stderr line starting with error: that names the file and
    matches the fix."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and "Traceback" not in result.stderr and len(errors) == 1, result.stderr[-3000:]
    assert str(named) in errors[0] and re.search(fix, errors[0]), errors[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad inputs (a missing path, a truncated checkpoint, a state dict of no RWKV model, binidx pairs whose .idx
    is cut short or is README.md) and good ones (a tiny RWKV-7 checkpoint, a shard, a train_log.txt)."""
    from src.config import ModelConfig
    from src.model import RWKV
    folder = tmp_path_factory.mktemp("bad")
    torch.save(RWKV(ModelConfig(n_layer=1, n_embd=32, head_size=32)).state_dict(), folder / "rwkv.pth")
    (folder / "train_log.txt").write_text("NEW RUN 2025-01-01-00-00-00\n{'ctx_len': 16}\n"
                                          "0 5.000000 148.4132 0.00100000 2025-01-01 00:00:00.000000 0\n")
    torch.save({"w": torch.randn(4096)}, folder / "not-rwkv.pth")
    whole = (folder / "not-rwkv.pth").read_bytes()
    (folder / "truncated.pth").write_bytes(whole[:len(whole) // 2])
    os.makedirs(folder / "shards")
    with open(folder / "shards" / "00.jsonl", "w") as f:
        f.writelines(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(40))
    write_binidx(str(folder / "tokens"), [np.arange(1, 5000, dtype=np.uint16)])
    for name, index in (("cut", (folder / "tokens.idx").read_bytes()[:20]), ("readme", README.read_bytes())):
        shutil.copy(folder / "tokens.bin", folder / f"{name}.bin")
        (folder / f"{name}.idx").write_bytes(index)
    return {"missing": folder / "missing.pth", "truncated": folder / "truncated.pth", "readme": "README.md",
            "not_rwkv": folder / "not-rwkv.pth", "rwkv": folder / "rwkv.pth", "shards": folder / "shards",
            "folder": folder}


CHECKPOINT_FIXES = {"missing": "does not exist; pass the path of a .pth that train.py wrote",
                    "truncated": "is cut short.*copy it again",
                    "readme": "is not a PyTorch checkpoint.*pass a .pth that train.py wrote",
                    "not_rwkv": "is not an RWKV-7 model.*pass a .pth that train.py wrote"}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_FIXES))
def test_generate_bad_checkpoint(files, case):
    result = run_tool("tools/generate.py", "--model", files[case], "--device", "cpu", "--length", "1")
    assert_one_error_line(result, files[case], CHECKPOINT_FIXES[case])


@pytest.mark.parametrize("case", ["missing", "truncated", "readme"])
def test_eval_bad_checkpoint(files, case):
    result = run_tool("tools/eval.py", "--model", files[case], "--data", files["shards"], "--device", "cpu")
    assert_one_error_line(result, files[case], CHECKPOINT_FIXES[case])


@pytest.mark.parametrize("case", ["missing", "truncated", "readme"])
def test_train_bad_load_model(files, case, tmp_path):
    result = run_tool("train.py", "--proj_dir", tmp_path, "--data_file", files["shards"], "--load_model", files[case],
                      "--accelerator", "cpu", *TINY)
    assert_one_error_line(result, files[case], CHECKPOINT_FIXES[case])


def test_bad_data_files(files):
    folder = files["folder"]
    cases = [
        (["tools/eval.py", "--model", files["rwkv"], "--lambada", folder / "lambada.jsonl", "--device", "cpu"],
         folder / "lambada.jsonl", "not found: pass the LAMBADA test set"),
        (["tools/eval.py", "--model", files["rwkv"], "--data", "README.md", "--device", "cpu"], "README.md",
         "expected .jsonl"),
        (["tools/generate.py", "--model", files["rwkv"], "--vocab", "README.md", "--device", "cpu"], "README.md:1",
         "is not a vocab line.*rwkv_vocab_v20230424.txt"),
        (["tools/plot.py", folder / "missing.txt", "--out", folder / "curve.png"], folder / "missing.txt",
         "cannot read.*pass the train_log.txt"),
        (["tools/plot.py", files["truncated"], "--out", folder / "curve.png"], files["truncated"],
         "is not a train_log.txt"),
        (["tools/plot.py", "README.md", "--out", folder / "curve.png"], "README.md", "is not a train_log.txt"),
        (["tools/plot.py", folder / "train_log.txt", "--out", folder / "no-folder" / "curve.png"], folder / "no-folder",
         "cannot write.*pass --out"),
        (["tools/make_data.py", folder / "missing.jsonl", "--output", folder / "out"], folder / "missing.jsonl",
         "no such file"),
        (["tools/make_data.py", files["truncated"], "--output", folder / "out"], files["truncated"], "expected .jsonl"),
        (["tools/make_data.py", "README.md", "--output", folder / "out"], "README.md", "expected .jsonl"),
        (["tools/make_data.py", files["shards"], "--output", "README.md/out"], "README.md",
         "pass --output a PREFIX in a folder you can write to"),
        (["tools/magic_prime.py", folder / "missing"], folder / "missing.idx", "make one with tools/make_data.py"),
        (["tools/magic_prime.py", folder / "cut"], folder / "cut.idx", "rebuild it with tools/make_data.py"),
        (["tools/magic_prime.py", folder / "readme"], folder / "readme.idx", "not a binidx index"),
        (["tools/download.py", f"file://{folder}/missing.bin", folder / "got.bin"], folder / "got.bin",
         "fetch the file by hand"),
        (["tools/download.py", f"file://{ROOT}/README.md", "README.md/got.bin"], "README.md/got.bin",
         "fetch the file by hand"),
    ]
    for args, named, fix in cases:
        assert_one_error_line(run_tool(*args), named, fix)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_accelerator_gpu_without_a_gpu(files, tmp_path):
    result = run_tool("train.py", "--proj_dir", tmp_path, "--data_file", files["shards"], *TINY,
                      "--accelerator", "gpu", "--strategy", "deepspeed_stage_2")
    assert_one_error_line(result, "--accelerator gpu", r"no GPU was found.*--accelerator cpu --strategy auto")
    assert not os.listdir(tmp_path)   # refused before the init (and any model) was made


def help_entries(text):
    """{flag: its help text with whitespace collapsed} of an argparse --help output."""
    entries, current = {}, None
    for line in text.splitlines():
        start = re.match(r"^  (--\w+)", line)
        if start:
            current = start.group(1)
            entries[current] = ""
        elif not line.startswith("    "):   # a blank line or a group title ends the entry
            current = None
        if current:
            entries[current] = " ".join((entries[current] + " " + line.strip()).split())
    return entries


def test_train_help_describes_every_flag_with_its_default():
    result = run_tool("train.py", "--help")
    entries = help_entries(result.stdout)
    for f in flag_fields():
        assert f.metadata.get("help"), f"--{f.name} has no help"
        entry = entries[f"--{f.name}"]
        assert entry.endswith(f"(default: {shown_default(f.default)})"), entry
    titles = re.findall(r"^([^\s:][^:\n]*):$", result.stdout, re.M)
    assert titles == ["options", "model", "data", "optimizer and schedule", "checkpoints and logs", "hardware",
                      "performance"]


def test_no_warnings_a_user_cannot_act_on(files, tmp_path):
    for tool in ["train.py", *sorted(glob.glob("tools/*.py", root_dir=ROOT))]:
        result = run_tool(tool, "--help")
        assert result.returncode == 0 and "pkg_resources" not in result.stderr, (tool, result.stderr[-2000:])
    for stage in ("1", "3"):   # the init, then a short streamed run
        result = run_tool("train.py", "--proj_dir", tmp_path, "--data_file", files["shards"], "--accelerator", "cpu",
                          *TINY, "--train_stage", stage)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "pkg_resources" not in result.stderr and "IterableDataset" not in result.stderr, result.stderr
    assert os.path.exists(tmp_path / "rwkv-final.pth")


def script_vars(name):
    with open(os.path.join(ROOT, name)) as f:
        return dict(re.findall(r'^(\w+)="([^"]*)"', f.read(), re.M))


def train_argv(script, tmp_path):
    """The arguments each train.py call of a script gets: the script runs with a `python` that only records them."""
    log = tmp_path / f"{script}.argv"
    fake = tmp_path / "bin" / "python"
    os.makedirs(fake.parent, exist_ok=True)
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" --end-- >> "$ARGV_LOG"\n')
    fake.chmod(0o755)
    subprocess.run(["sh", script], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "ARGV_LOG": str(log)})
    calls = [call.strip("\n").split("\n") for call in log.read_text().split("--end--\n") if call]
    (argv,) = [call[1:] for call in calls if call[0] == "train.py"]
    return dict(zip(argv[::2], argv[1::2]))


def test_minipile_scripts_agree_with_each_other_and_magic_prime(tmp_path):
    prepare_vars, run_vars = script_vars("demo-training-prepare.sh"), script_vars("demo-training-run.sh")
    for name in ("DATA", "CTX_LEN", "N_LAYER", "N_EMBD", "MY_EXIT_TOKENS", "MAGIC_PRIME"):
        assert prepare_vars[name] == run_vars[name], name
    printed = recipe_flags(MINIPILE_TOKENS, MINIPILE_CTX_LEN)   # what tools/magic_prime.py prints for MiniPile
    assert printed == (f"--my_exit_tokens {MINIPILE_TOKENS} --magic_prime {MINIPILE_MAGIC_PRIME} "
                       f"--ctx_len {MINIPILE_CTX_LEN}")
    for script in ("demo-training-prepare.sh", "demo-training-run.sh"):
        flags = train_argv(script, tmp_path)
        assert flags["--data_file"] == prepare_vars["DATA"], script
        assert f"--my_exit_tokens {flags['--my_exit_tokens']} --magic_prime {flags['--magic_prime']} " \
               f"--ctx_len {flags['--ctx_len']}" == printed, script
