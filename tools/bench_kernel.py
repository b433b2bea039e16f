"""Times the WKV7 CUDA kernels (forward + backward, one call each, bf16, replayed as a CUDA graph) at the
recipe shapes and reports the relative RMS error ||out - ref|| / ||ref|| of y and of every input gradient
against the float64 PyTorch oracle run on the same bf16 inputs (upcast), for the chunked kernel and the
sequential baseline (the reference recipe's design), in one run.

    python tools/bench_kernel.py            # both recipe shapes, three decay regimes
    python tools/bench_kernel.py --shapes 16,512,12,64

The oracle runs on the whole problem at the small shape and on a slice (batch 0, heads 0-1; the
same slice of the kernel's outputs) at the large one: heads and batch elements are independent.
Prints a table, then one JSON line per row."""
import argparse
import json
import os
import re
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from src.kernels.wkv7 import KERNELS, wkv7_kernel, _load_ops  # noqa: E402
from src.model.rwkv7 import wkv7_recurrence  # noqa: E402

SHAPES = [(16, 512, 12, 64), (24, 4096, 16, 64)]
DECAYS = ["model", "fast", "slow"]
NAMES = ["y", "dr", "dw", "dk", "dv", "dz", "db"]
TARGET_SPEEDUP = {SHAPES[0]: 3.0, SHAPES[1]: 2.0}
TARGET_ERR_RATIO = 1.5


def make_inputs(B, T, H, N, decay="model", seed=0, device="cuda"):
    """bf16 inputs distributed like the model's, and a bf16 output gradient dy.

    decay: 'model' (w = -softplus(-(w0 + noise)) - 0.5 with the init's per-channel w0, so w in about
    [-7.5, -0.5]), 'fast' (w near its bound -0.5: d ~ 0.545) or 'slow' (w ~ -9: d ~ 1 - 1e-4)."""
    g = torch.Generator(device=device).manual_seed(seed)
    rn = lambda: torch.randn(B, T, H, N, generator=g, device=device)
    a = torch.sigmoid(rn())                    # in-context learning rate in (0, 1)
    kk = F.normalize(rn(), dim=-1)             # per-head L2-normalised key
    if decay == "model":
        w0 = -7 + 5 * torch.linspace(0, 1, H * N, device=device).view(H, N) ** 0.9 + 0.5
        w = -F.softplus(-(w0 + 0.5 * rn())) - 0.5
    elif decay == "fast":
        w = -0.5 - 0.01 * torch.rand(B, T, H, N, generator=g, device=device)
    elif decay == "slow":
        w = -F.softplus(-(-8.5 + 0.5 * rn())) - 0.5
    else:
        raise ValueError(decay)
    r, k, v = 0.5 * rn(), 0.5 * rn() * a, 0.5 * rn()  # k as after the k_a mixing (k_a = 1)
    xs = [x.to(torch.bfloat16).contiguous() for x in (r, w, k, v, -kk, kk * a)]
    return xs, rn().to(torch.bfloat16)


def rel_err(a, b):
    """||a - b|| / ||b|| (the absolute norm where b is exactly zero)."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def oracle(xs, dy):
    xs64 = [x.double().requires_grad_() for x in xs]
    y, _ = wkv7_recurrence(*xs64)
    return [y.detach()] + list(torch.autograd.grad(y, xs64, dy.double()))


def kernel_outputs(xs, dy, kernel):
    leaves = [x.detach().requires_grad_() for x in xs]
    y = wkv7_kernel(*leaves, kernel)
    return [y.detach()] + list(torch.autograd.grad(y, leaves, dy))


def graph_ms(fn):
    """Median ms of fn's GPU work, replayed as a CUDA graph (as training replays the blocks): the kernels' time
    without the host's launch time, which made eager timings at the small shape jitter by up to 0.4 ms."""
    from triton.testing import do_bench
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=50, rep=300, return_mode="median")


def timings(xs, dy, kernel):
    """Median ms of forward+backward (one call each, as in training) and of the forward alone."""
    leaves = [x.detach().requires_grad_() for x in xs]

    def fwd_bwd():
        torch.autograd.grad(wkv7_kernel(*leaves, kernel), leaves, dy)

    def fwd():
        with torch.no_grad():
            wkv7_kernel(*xs, kernel)

    return graph_ms(fwd_bwd), graph_ms(fwd)


def kernel_breakdown(xs, dy, kernel):
    """Per-CUDA-kernel device time (us) of one forward+backward, from the profiler."""
    from torch.profiler import ProfilerActivity, profile
    leaves = [x.detach().requires_grad_() for x in xs]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.autograd.grad(wkv7_kernel(*leaves, kernel), leaves, dy)
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        m = re.search(r"(\w+_kernel)", ev.key)
        if m and "wkv7" in ev.key:
            out[m.group(1)] = round(getattr(ev, "device_time_total", getattr(ev, "cuda_time_total", 0.0)), 1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="*", default=None, help="B,T,H,N (default: the two recipe shapes)")
    ap.add_argument("--decays", nargs="*", default=DECAYS)
    ap.add_argument("--json", default=None, help="also write the JSON lines to this file")
    ap.add_argument("--once", action="store_true", help="just one forward+backward per kernel (for ncu)")
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    if args.once:
        for shape in shapes:
            xs, dy = make_inputs(*shape)
            for kernel in KERNELS:
                kernel_outputs(xs, dy, kernel)
        torch.cuda.synchronize()
        return
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    _load_ops(shapes[0][3])

    rows = []
    for shape in shapes:
        B, T, H, N = shape
        for decay in args.decays:
            xs, dy = make_inputs(*shape, decay=decay, seed=1)
            sl = (slice(None), slice(None), slice(None)) if B * H <= 16 * 12 else (slice(0, 1), slice(None), slice(0, 2))
            ref = oracle([x[sl] for x in xs], dy[sl])
            oracle_on = "full" if sl[0] == slice(None) else "b0,h0:2"
            base_ms = None
            for kernel in ("sequential", "chunked"):
                outs = kernel_outputs(xs, dy, kernel)
                errs = {n: rel_err(o[sl], r) for n, o, r in zip(NAMES, outs, ref)}
                del outs
                row = dict(device=dev, shape=list(shape), decay=decay, kernel=kernel, oracle=oracle_on,
                           err=errs)
                if decay == "model":
                    ms, fwd_ms = timings(xs, dy, kernel)
                    base_ms = ms if kernel == "sequential" else base_ms
                    row.update(ms_fwd_bwd=ms, ms_fwd=fwd_ms, speedup=base_ms / ms,
                               kernels_us=kernel_breakdown(xs, dy, kernel))
                rows.append(row)
                print(json.dumps(row), flush=True)
            del xs, dy, ref
            torch.cuda.empty_cache()

    # error ratios against the sequential baseline on the same inputs
    base = {(tuple(r["shape"]), r["decay"]): r["err"] for r in rows if r["kernel"] == "sequential"}
    for r in rows:
        b = base[(tuple(r["shape"]), r["decay"])]
        r["err_ratio_max"] = max(r["err"][n] / b[n] for n in NAMES)

    print(f"\nWKV7 fwd+bwd on {dev} (bf16 in/out, fp32 state); errors vs fp64 oracle on the same bf16 inputs")
    head = f"{'shape':>16} {'decay':>5} {'kernel':>10} {'ms':>8} {'fwd ms':>7} {'speedup':>7} " + \
        " ".join(f"{n:>7}" for n in NAMES) + f" {'err/base':>8}"
    print(head)
    for r in rows:
        ms = f"{r['ms_fwd_bwd']:8.3f} {r['ms_fwd']:7.3f} {r['speedup']:6.2f}x" if "ms_fwd_bwd" in r else " " * 24
        print(f"{'x'.join(map(str, r['shape'])):>16} {r['decay']:>5} {r['kernel']:>10} {ms} " +
              " ".join(f"{r['err'][n]:7.1e}" for n in NAMES) + f" {r['err_ratio_max']:8.2f}")
    ok = True
    for r in rows:
        if r["kernel"] != "chunked":
            continue
        if r["err_ratio_max"] > TARGET_ERR_RATIO:
            ok = False
            print(f"MISS accuracy: {r['shape']} {r['decay']}: error ratio {r['err_ratio_max']:.2f}")
        t = TARGET_SPEEDUP.get(tuple(r["shape"]))
        if t and "speedup" in r and r["speedup"] < t:
            ok = False
            print(f"MISS speed: {r['shape']}: {r['speedup']:.2f}x < {t}x")
    print("targets: " + ("all met" if ok else "NOT all met"))
    for r in rows:
        if "kernels_us" in r:
            print(f"kernel us {r['kernel']:>10} {'x'.join(map(str, r['shape']))}: {r['kernels_us']}")
    if args.json:
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
