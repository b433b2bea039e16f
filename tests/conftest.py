import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

CTX, VOCAB = 16, 256


def run(*args, timeout=1200, env=None):
    """Run a Python script from the repo root (with `env` added to the environment); fail the test with its
    output's tail if it fails."""
    import subprocess
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, env=None if env is None else {**os.environ, **env})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def run_steps(tmp_path, name, steps, flags, batches_out=None, timeout=1200):
    """Per-step losses (mean over ranks) of `steps` steps of train.py's path with `flags` (tests/run_steps.py);
    with batches_out, each rank also writes the batches it trained on there."""
    import json
    out = os.path.join(tmp_path, f"{name}.json")
    run("tests/run_steps.py", "--steps", steps, "--out", out, *(["--batches_out", batches_out] if batches_out else []),
        "--", *flags, timeout=timeout)
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory):
    """Real English text as byte tokens (vocab 256): the Gutenberg fixture, each book ended by 0. At ctx 16 it holds
    about half a mini-epoch's samples, so each mini-epoch visits every window about twice."""
    from tests.data_helpers import gutenberg_texts
    data = b"".join(text.encode("utf-8") + b"\0" for text in gutenberg_texts())
    tokens = np.frombuffer(data, dtype=np.uint8).astype(np.uint16)
    prefix = str(tmp_path_factory.mktemp("bytes") / "bytes")
    from src.data.binidx import write_binidx
    from src.data.dataset import find_magic_prime
    write_binidx(prefix, [tokens])
    return prefix, find_magic_prime(len(tokens), CTX)


