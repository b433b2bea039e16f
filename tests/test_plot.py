"""tools/plot.py: train_log.txt parsing (resumes, ctx_len per run) and the PNG it writes."""
import struct

import pytest

from src.data.dataset import MINI_EPOCH_SAMPLES
from tools import plot

RUN_A = """NEW RUN 2025-01-01-10-00-00
{'load_model': '', 'wandb': '', 'proj_dir': 'out/runA', 'ctx_len': 512, 'micro_bsz': 16, 'lr_init': 0.0006, 'enable_progress_bar': True}
0 4.900000 134.2898 0.00060000 2025-01-01 10:30:00.123456 0
1 4.100000 60.3403 0.00059000 2025-01-01 11:00:00.123456 1
2 3.900000 49.4024 0.00058000 2025-01-01 11:30:00.123456 2
3 3.8
NEW RUN 2025-01-01-12-00-00
{'load_model': 'out/runA/rwkv-2.pth', 'wandb': '', 'proj_dir': 'out/runA', 'ctx_len': 512, 'epoch_begin': 2}
2 3.850000 46.9931 0.00058000 2025-01-01 12:30:00.000001 0
3 3.700000 40.4473 0.00057000 2025-01-01 13:00:00.000001 1
"""
RUN_B = """NEW RUN 2025-02-01-10-00-00
{'load_model': '', 'proj_dir': 'out/runB', 'ctx_len': 1024}
0 5.250000 190.5663 0.00060000 2025-02-01 10:30:00.000000 0
1 4.500000 90.0171 0.00059000 2025-02-01 11:00:00.000000 1
"""


@pytest.fixture
def logs(tmp_path):
    paths = []
    for name, text in (("runA", RUN_A), ("runB", RUN_B)):
        (tmp_path / name).mkdir()
        paths.append(tmp_path / name / "train_log.txt")
        paths[-1].write_text(text)
    return [str(p) for p in paths]


def test_parse_log_resumes_replace_earlier_mini_epochs(logs):
    assert plot.MINI_EPOCH_SAMPLES == MINI_EPOCH_SAMPLES
    a = plot.parse_log(logs[0])
    assert a["mini_epoch"] == [0, 1, 2, 3]
    assert a["loss"] == [4.9, 4.1, 3.85, 3.7]   # the resume's 2 replaces 3.9; the cut-off "3 3.8" is no point
    assert a["tokens"] == [(e + 1) * 40320 * 512 for e in range(4)]
    b = plot.parse_log(logs[1])
    assert b == {"mini_epoch": [0, 1], "tokens": [40320 * 1024, 2 * 40320 * 1024], "loss": [5.25, 4.5]}


def test_parse_log_needs_a_ctx_len(tmp_path):
    path = tmp_path / "train_log.txt"
    path.write_text("NEW RUN 2025-01-01-10-00-00\n0 4.900000 134.2898 0.00060000 2025-01-01 10:30:00.1 0\n")
    with pytest.raises(plot.LogError, match="--ctx_len"):
        plot.parse_log(str(path))
    assert plot.parse_log(str(path), ctx_len=256)["tokens"] == [40320 * 256]


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_plot_writes_png_with_reference_and_one_curve_per_log(logs, tmp_path, capsys):
    out = tmp_path / "curve.png"
    curves = plot.plot(logs, str(out))
    assert [c["label"] for c in curves] == [plot.REFERENCE_LABEL, "runA", "runB"]
    reference = curves[0]
    assert reference["linestyle"] == "--" and reference["mini_epoch"] == list(range(12))
    assert reference["loss"][0] == 4.875856 and reference["loss"][-1] == 3.295895
    assert reference["tokens"][-1] == 12 * 40320 * 512
    assert curves[1]["loss"] == [4.9, 4.1, 3.85, 3.7] and curves[2]["loss"] == [5.25, 4.5]
    assert out.stat().st_size > 10_000
    assert png_size(out) == (900, 550)

    # the command line; two logs in folders of the same name get distinct labels
    (tmp_path / "other" / "runA").mkdir(parents=True)
    (tmp_path / "other" / "runA" / "train_log.txt").write_text(RUN_B)
    assert plot.main([logs[0], str(tmp_path / "other" / "runA" / "train_log.txt"), "--out", str(out)]) == 0
    assert "runA: 4 points, mini-epoch 3, loss 3.7000" in capsys.readouterr().out
    assert plot.log_label(str(tmp_path / "other" / "runA" / "train_log.txt"), {"runA"}) == "other/runA"
    assert png_size(out) == (900, 550)


def test_streamed_run_counts_its_own_mini_epoch(tmp_path):
    """A jsonl run's mini-epoch is epoch_steps x micro_bsz x devices x num_nodes samples, not 40320."""
    path = tmp_path / "train_log.txt"
    path.write_text("NEW RUN 2025-03-01-10-00-00\n"
                    "{'data_type': 'jsonl', 'ctx_len': 128, 'epoch_steps': 50, 'micro_bsz': 8, 'devices': 2, "
                    "'num_nodes': 1}\n"
                    "0 6.100000 445.8578 0.00100000 2025-03-01 10:30:00.1 0\n"
                    "1 5.200000 181.2722 0.00090000 2025-03-01 10:40:00.1 1\n")
    assert plot.parse_log(str(path))["tokens"] == [50 * 8 * 2 * 128, 2 * 50 * 8 * 2 * 128]


def test_short_run_is_readable_beside_the_reference(tmp_path, monkeypatch):
    """The offline demo's four mini-epochs (0.2 M tokens) span a readable stretch of the token axis beside the
    reference's 250 M, not a vertical line at 0."""
    path = tmp_path / "demo" / "train_log.txt"
    path.parent.mkdir()
    path.write_text("NEW RUN 2025-03-01-10-00-00\n"
                    "{'data_type': 'jsonl', 'ctx_len': 128, 'epoch_steps': 50, 'micro_bsz': 8}\n" +
                    "".join(f"{e} {loss:.6f} 1.0 0.00100000 2025-03-01 10:3{e}:00.1 {e}\n"
                            for e, loss in enumerate((7.6, 5.6, 5.3, 5.1))))
    monkeypatch.setattr(plot.plt, "close", lambda fig: None)   # keep the figure to measure where the curves lie
    curves = plot.plot([str(path)], str(tmp_path / "curve.png"))
    ax = plot.plt.gcf().axes[0]
    for curve in curves:
        x = ax.transData.transform(list(zip(curve["tokens"], curve["loss"])))[:, 0] - ax.bbox.x0
        assert x.min() >= 0 and x.max() <= ax.bbox.width, curve["label"]
        assert x.max() - x.min() > 0.1 * ax.bbox.width, curve["label"]
    plot.plt.close("all")
