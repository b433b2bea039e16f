"""tools/benchmark.py runs the real training path and prints one JSON line (smoke test on CPU)."""
import json
import subprocess
import sys

from tests.conftest import ROOT


def test_benchmark_prints_one_json_line():
    result = subprocess.run([sys.executable, "tools/benchmark.py", "--preset", "tiny", "--accelerator", "cpu",
                             "--strategy", "auto", "--precision", "32", "--steps", "6", "--warmup", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert row["preset"] == "tiny" and row["device"] == "cpu" and row["steps"] == 6
    assert row["tokens_per_s"] > 0 and row["step_ms"] > 0
    # MFU counts every matmul weight but the embedding: 2 layers of L2-D128 plus the head
    per_layer = 4 * 128 * 128 + 2 * 128 * 512 + 128 * (32 + 32 + 32 + 32) * 2
    expected = 6 * (2 * per_layer + 65536 * 128) * row["tokens_per_s"] / 989e12
    assert abs(row["mfu"] - expected) <= 1e-4
