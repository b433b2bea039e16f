"""The offline demo, shortened: stdlib sources -> init -> streamed training -> a sample, on CPU."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_offline_demo_trains_and_samples(tmp_path):
    proj = tmp_path / "demo"
    # one layer at ctx 64: the CPU's step-by-step wkv7 makes the demo's default size take minutes
    result = subprocess.run([sys.executable, "tools/demo.py", "--proj_dir", str(proj), "--epoch_steps", "8",
                             "--epoch_count", "2", "--data_mb", "1", "--length", "30", "--n_layer", "1",
                             "--ctx_len", "64"],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = [float(m.group(1)) for m in re.finditer(r"^\d+ (\d+\.\d{6}) ", result.stdout, re.M)]
    assert len(losses) == 2 and losses[1] < losses[0] - 0.5, result.stdout[-2000:]   # the loss visibly falls
    assert (proj / "rwkv-final.pth").exists()
    sample = result.stdout.split("--prompt def ")[-1]
    assert "# 30 tokens in" in result.stderr and sample.strip(), result.stdout[-1000:]
