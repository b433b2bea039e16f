"""Plot loss against tokens seen (log scale) for one or more train_log.txt files, with the reference MiniPile curve.

    python tools/plot.py out/L12-D768-x070/train_log.txt [more/train_log.txt ...] --out curve.png

Mini-epoch e of a run covers tokens up to (e + 1) * samples * ctx_len, read from the run-arguments
line written after each "NEW RUN" line: samples = epoch_steps x micro_bsz x devices x num_nodes
(40320 for binidx runs, whatever --epoch_steps made it for streamed ones; 40320 if not given). When a log holds several runs (resumes), a
later line for the same mini-epoch replaces the earlier one. Each log is labelled by its folder.
"""
import argparse
import ast
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from src.config import MINI_EPOCH_SAMPLES  # noqa: E402  (src.config imports no torch)

# docs/RECIPE.md section 9: the reference trainer's MiniPile run (L12-D768, ctx 512), mini-epochs 0..11
REFERENCE_CTX_LEN = 512
REFERENCE_LOSSES = [4.875856, 4.028621, 3.801625, 3.663070, 3.578974, 3.510906, 3.462345, 3.412196, 3.376724,
                    3.336911, 3.313411, 3.295895]
REFERENCE_LABEL = "MiniPile reference (L12-D768, ctx 512)"
FIGSIZE, DPI = (9, 5.5), 100
LOG_FIX = "pass the train_log.txt that train.py writes in a run's --proj_dir"


class LogError(ValueError):
    pass


def tokens_seen(mini_epoch, ctx_len, samples=MINI_EPOCH_SAMPLES):
    return (mini_epoch + 1) * samples * ctx_len


def run_arg(line, key):
    """An integer of a run-arguments line (a dict repr), or None if it has none."""
    try:
        args = ast.literal_eval(line)
        return int(args[key]) if isinstance(args, dict) and key in args else None
    except (ValueError, SyntaxError, TypeError):   # a value that is not a literal: find the key itself
        found = re.search(rf"['\"]{key}['\"]\s*:\s*(\d+)", line)
        return int(found.group(1)) if found else None


def run_epoch_samples(line):
    """Samples per mini-epoch of a run-arguments line: epoch_steps x real batch, else the binidx 40320."""
    steps, micro_bsz = run_arg(line, "epoch_steps"), run_arg(line, "micro_bsz")
    if steps is None or micro_bsz is None:
        return MINI_EPOCH_SAMPLES
    return steps * micro_bsz * (run_arg(line, "devices") or 1) * (run_arg(line, "num_nodes") or 1)


def parse_log(path, ctx_len=None):
    """{"mini_epoch": [...], "tokens": [...], "loss": [...]} of a train_log.txt, sorted by mini-epoch.
    ctx_len: used for lines of a run whose arguments line gives none."""
    points, run_ctx, run_samples, after_new_run, runs = {}, None, MINI_EPOCH_SAMPLES, False, 0
    try:
        f = open(path, errors="replace")
    except OSError as e:
        raise LogError(f"cannot read {path}: {e.strerror}; {LOG_FIX}") from e
    with f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if line.startswith("NEW RUN"):
                run_ctx, run_samples, after_new_run, runs = None, MINI_EPOCH_SAMPLES, True, runs + 1
                continue
            if after_new_run and line.startswith("{"):
                run_ctx, run_samples = run_arg(line, "ctx_len"), run_epoch_samples(line)
            after_new_run = False
            fields = line.split()
            # <mini-epoch> <loss> <exp(loss)> <lr> <date> <time> <epoch in run>; a shorter line is cut off
            if len(fields) < 7 or not fields[0].isdigit():
                continue
            try:
                loss = float(fields[1])
            except ValueError:
                continue
            if (run_ctx or ctx_len) is None:
                raise LogError(f"{path}:{line_no}: no ctx_len for this mini-epoch (no run-arguments line with "
                               f"'ctx_len' after the NEW RUN line before it); pass --ctx_len")
            epoch = int(fields[0])
            points[epoch] = (tokens_seen(epoch, run_ctx or ctx_len, run_samples), loss)
    if not runs and not points:
        raise LogError(f"{path} is not a train_log.txt (no NEW RUN line and no mini-epoch lines); {LOG_FIX}")
    epochs = sorted(points)
    return {"mini_epoch": epochs, "tokens": [points[e][0] for e in epochs], "loss": [points[e][1] for e in epochs]}


def reference_curve():
    return {"label": REFERENCE_LABEL, "mini_epoch": list(range(len(REFERENCE_LOSSES))),
            "tokens": [tokens_seen(e, REFERENCE_CTX_LEN) for e in range(len(REFERENCE_LOSSES))],
            "loss": list(REFERENCE_LOSSES), "linestyle": "--"}


def token_count(value, _=None):
    """Axis tick text: 500K, 20M, 1.5B."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:g}{unit}"
    return f"{value:g}"


def log_label(path, taken):
    """The log's folder name, made unique among `taken` by its parent folders."""
    parts = os.path.abspath(path).split(os.sep)[:-1]
    for depth in range(1, len(parts) + 1):
        label = "/".join(parts[-depth:])
        if label not in taken:
            return label
    return f"{path} ({len(taken)})"


def plot(logs, out, ctx_len=None, title=None):
    """Write the PNG `out`; returns the curves drawn: [{"label", "mini_epoch", "tokens", "loss", "linestyle"}],
    the reference first, then one per log in order."""
    curves = [reference_curve()]
    for path in logs:
        curve = parse_log(path, ctx_len)
        curve.update(label=log_label(path, {c["label"] for c in curves}), linestyle="-")
        curves.append(curve)
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for curve in curves:
        ax.plot(curve["tokens"], curve["loss"], curve["linestyle"], marker=".", label=curve["label"],
                color="gray" if curve["linestyle"] == "--" else None)
    # tokens on a log scale: a short run (the offline demo's 0.2 M tokens) shows its own curve beside the
    # reference's 20 M to 250 M instead of a vertical line at 0
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(FuncFormatter(token_count))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("tokens seen (log scale)")
    ax.set_ylabel("mean training loss per mini-epoch")
    ax.set_title(title or "loss against tokens")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return curves


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", metavar="LOG", help="train_log.txt files")
    parser.add_argument("--out", default="curve.png", help="PNG to write")
    parser.add_argument("--ctx_len", type=int, default=None, help="for runs whose log gives no ctx_len")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        curves = plot(args.logs, args.out, args.ctx_len, args.title)
    except LogError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # parse_log reports unreadable logs: this is the PNG
        print(f"error: cannot write {args.out}: {e.strerror}; pass --out a .png path in a writable folder",
              file=sys.stderr)
        return 2
    for curve in curves[1:]:
        last = f"mini-epoch {curve['mini_epoch'][-1]}, loss {curve['loss'][-1]:.4f}" if curve["loss"] else "no mini-epochs"
        print(f"{curve['label']}: {len(curve['loss'])} points, {last}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
