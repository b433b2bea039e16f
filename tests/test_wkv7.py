"""CPU tests of the WKV7 recurrence (docs/RECIPE.md section 2): the PyTorch loop against an independent
float64 loop, its gradients, chunked evaluation and end-padding; the algorithm of the chunked CUDA
kernel (cuda/wkv7_chunked.cu) in float64 against the oracle; the CUDA sources compile; the kernel
loader clears a stale build lock."""
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from src.kernels import wkv7 as W
from src.kernels.wkv7 import CHUNK_LEN
from src.model.rwkv7 import TimeMix
from src.model.rwkv7 import wkv7_recurrence

DT = torch.float64


def model_inputs(B, T, H, N, dtype=DT, seed=0):
    """Inputs shaped like the model's (see docs/RECIPE.md section 1): w <= -0.5, z = -kk, b = kk * a."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda: torch.randn(B, T, H, N, generator=g, dtype=DT)
    a = torch.sigmoid(rn())
    kk = F.normalize(rn(), dim=-1)
    w0 = -7 + 5 * torch.linspace(0, 1, H * N, dtype=DT).view(H, N) ** 0.9 + 0.5
    w = -F.softplus(-(w0 + 0.5 * rn())) - 0.5
    r, k, v = 0.5 * rn(), 0.5 * rn() * a, 0.5 * rn()
    return [x.to(dtype) for x in (r, w, k, v, -kk, kk * a)]


def spec_loop(r, w, k, v, z, b):
    """The spec's equations element by element in float64, one (batch, head) at a time."""
    B, T, H, N = r.shape
    y = torch.zeros(B, T, H, N, dtype=DT)
    for bi in range(B):
        for h in range(H):
            S = [[0.0] * N for _ in range(N)]
            for t in range(T):
                d = [torch.exp(-torch.exp(w[bi, t, h, j].double())).item() for j in range(N)]
                zz, bb, kk, vv, rr = (x[bi, t, h].double().tolist() for x in (z, b, k, v, r))
                s = [sum(S[i][j] * zz[j] for j in range(N)) for i in range(N)]
                S = [[S[i][j] * d[j] + s[i] * bb[j] + vv[i] * kk[j] for j in range(N)] for i in range(N)]
                for i in range(N):
                    y[bi, t, h, i] = sum(S[i][j] * rr[j] for j in range(N))
    return y


def test_oracle_matches_spec_loop():
    xs = model_inputs(2, 9, 2, 5)
    y, S = wkv7_recurrence(*xs)
    assert y.dtype == DT and S.shape == (2, 2, 5, 5)
    torch.testing.assert_close(y, spec_loop(*xs), rtol=1e-12, atol=1e-12)


def test_oracle_float32_and_wkv7_cpu_dtype():
    xs = model_inputs(1, 12, 2, 8)
    ref, _ = wkv7_recurrence(*xs)
    y32 = TimeMix.wkv(*[x.float() for x in xs])
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), ref, rtol=1e-4, atol=1e-5)


def test_oracle_gradcheck_all_inputs():
    xs = [x.clone().requires_grad_() for x in model_inputs(1, 5, 1, 3, seed=1)]
    assert torch.autograd.gradcheck(lambda *a: wkv7_recurrence(*a)[0], xs, eps=1e-6, atol=1e-7)


def test_chunked_evaluation_carries_state():
    xs = model_inputs(2, 20, 2, 4, seed=2)
    y, S = wkv7_recurrence(*xs)
    y1, S1 = wkv7_recurrence(*[x[:, :7] for x in xs])
    y2, S2 = wkv7_recurrence(*[x[:, 7:] for x in xs], state=S1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S2, S, rtol=1e-12, atol=1e-12)


def test_end_padding_is_exact():
    xs = [x.requires_grad_() for x in model_inputs(1, 13, 2, 4, seed=3)]
    T, pad = 13, 3
    y, _ = wkv7_recurrence(*xs)
    yp, _ = wkv7_recurrence(*[F.pad(x, (0, 0, 0, 0, 0, pad)) for x in xs])
    torch.testing.assert_close(yp[:, :T], y, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, xs, dy)
    gp = torch.autograd.grad(yp[:, :T], xs, dy)
    for a, b in zip(gp, g):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def chunked_algorithm(r, w, k, v, z, b, dy):
    """What cuda/wkv7_chunked.cu computes (fwd_rows, bwd_rows, bwd_chunk kernels), vectorised in
    PyTorch: returns y, dr, dw, dk, dv, dz, db."""
    B, T, H, N = r.shape
    C, NC = CHUNK_LEN, T // CHUNK_LEN
    ch = lambda x: x.reshape(B, NC, C, H, N).permute(0, 3, 1, 2, 4)  # [B,H,NC,C,N]
    r, w, k, v, z, b, dy = map(ch, (r, w, k, v, z, b, dy))
    lw = -torch.exp(w)
    cum = lw.cumsum(3)
    P = torch.exp(cum)
    Pm1 = torch.cat([torch.ones_like(P[..., :1, :]), P[..., :-1, :]], 3)
    rh, zh, kt, bt, P15 = r * P, z * Pm1, k / P, b / P, P[..., -1, :]
    col = lambda x: x[..., None, :]  # a vector over key columns, broadcast over rows
    # fwd_rows: scaled state S~ per chunk
    S = torch.zeros(B, H, N, N, dtype=r.dtype)
    y, sa, states = torch.zeros_like(r), torch.zeros_like(r), []
    for c in range(NC):
        for t in range(C):
            s = S @ zh[:, :, c, t, :, None]
            S = S + s * col(bt[:, :, c, t]) + v[:, :, c, t, :, None] * col(kt[:, :, c, t])
            y[:, :, c, t] = (S @ rh[:, :, c, t, :, None])[..., 0]
            sa[:, :, c, t] = s[..., 0]
        S = S * col(P15[:, :, c])
        states.append(S)
    # bwd_rows: scaled state gradient G^
    G = torch.zeros(B, H, N, N, dtype=r.dtype)
    hstates, ds, dv = [None] * NC, torch.zeros_like(r), torch.zeros_like(r)
    for c in reversed(range(NC)):
        hstates[c] = G
        G = G * col(P15[:, :, c])
        for t in reversed(range(C)):
            G = G + dy[:, :, c, t, :, None] * col(rh[:, :, c, t])
            dv[:, :, c, t] = (G @ kt[:, :, c, t, :, None])[..., 0]
            ds[:, :, c, t] = (G @ bt[:, :, c, t, :, None])[..., 0]
            G = G + ds[:, :, c, t, :, None] * col(zh[:, :, c, t])
    # bwd_chunk: every chunk at once
    Send = torch.stack(states, 2)
    Sc = torch.cat([torch.zeros_like(Send[:, :, :1]), Send[:, :, :-1]], 2)
    He = torch.stack(hstates, 2)
    Hh = He * P15[..., None, :]
    M = torch.cat([dy, ds], 3) @ torch.cat([v, sa], 3).transpose(-1, -2)
    M1, M2, M3, M4 = M[..., :C, :C], M[..., :C, C:], M[..., C:, :C], M[..., C:, C:]
    lo, lo_s = torch.tril(torch.ones(C, C, dtype=r.dtype)), torch.tril(torch.ones(C, C, dtype=r.dtype), -1)
    tr = lambda x: x.transpose(-1, -2)
    KB, RZ = torch.cat([kt, bt], 3), torch.cat([rh, zh], 3)
    XR = dy @ Sc + torch.cat([M1 * lo, M2 * lo], -1) @ KB
    XZ = ds @ Sc + torch.cat([M3 * lo_s, M4 * lo_s], -1) @ KB
    XK = v @ Hh + torch.cat([tr(M1) * lo.T, tr(M3) * lo_s.T], -1) @ RZ
    XB = sa @ Hh + torch.cat([tr(M2) * lo.T, tr(M4) * lo_s.T], -1) @ RZ
    dA = rh * XR - kt * XK - bt * XB
    dA[..., :-1, :] += zh[..., 1:, :] * XZ[..., 1:, :]
    dA[..., -1, :] += (Send * He).sum(-2)
    dw = lw * dA.flip(3).cumsum(3).flip(3)
    unch = lambda x: x.permute(0, 2, 3, 1, 4).reshape(B, T, H, N)
    return tuple(map(unch, (y, P * XR, dw, XK / P, dv, Pm1 * XZ, XB / P)))


@pytest.mark.parametrize("decay", ["model", "fast", "slow"])
def test_chunked_algorithm_matches_oracle(decay):
    xs = model_inputs(2, 3 * CHUNK_LEN, 2, 8, seed=4)
    if decay == "fast":  # w near its bound -0.5: d ~ 0.545, the fastest forgetting
        xs[1] = -0.5 - 0.01 * torch.rand_like(xs[1])
    elif decay == "slow":  # w very negative: d near 1
        xs[1] = -9.0 + 0.5 * torch.rand_like(xs[1])
    xs = [x.requires_grad_() for x in xs]
    dy = torch.randn_like(xs[0])
    y, _ = wkv7_recurrence(*xs)
    ref = (y,) + torch.autograd.grad(y, xs, dy)
    got = chunked_algorithm(*[x.detach() for x in xs], dy)
    for name, a, b in zip(["y", "dr", "dw", "dk", "dv", "dz", "db"], got, ref):
        assert ((a - b).norm() / b.norm()).item() < 1e-12, name


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else None


def test_cuda_sources_compile(tmp_path):
    """nvcc compiles the kernels for sm_90 and the binding compiles against torch's headers."""
    nvcc = _nvcc()
    if nvcc is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nvcc not found on CI (set CUDA_HOME)")
        pytest.skip("nvcc not found")
    from torch.utils.cpp_extension import include_paths
    cuda = W._CUDA_DIR
    jobs = [[nvcc, "-arch=sm_90", "--use_fast_math", "-D_N_=64", "-ptx", os.path.join(cuda, src),
             "-o", str(tmp_path / (src + ".ptx"))] for src in ("wkv7_sequential.cu", "wkv7_chunked.cu")]
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    jobs.append([cxx, "-std=c++20", "-fsyntax-only", "-D_N_=64", "-DWKV7_NS=wkv7_check",
                 *("-I" + p for p in include_paths()),
                 os.path.join(cuda, "wkv7_op.cpp")])
    procs = [subprocess.Popen(j, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for j in jobs]
    for j, p in zip(jobs, procs):
        out = p.communicate()[0]
        assert p.returncode == 0, f"{' '.join(j)}\n{out}"


def test_stale_build_lock_is_removed(tmp_path, capsys):
    d = tmp_path / "build"
    d.mkdir()
    (d / "lock").write_text("")  # left by a builder that was killed
    fd = W._acquire_build_dir(str(d))
    os.close(fd)
    assert not (d / "lock").exists()
    assert "stale build lock" in capsys.readouterr().err


def test_live_builder_is_waited_for(tmp_path):
    d = tmp_path / "build"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"d = {str(d)!r}; os.makedirs(d)\n"
        "fd = os.open(os.path.join(d, 'builder.flock'), os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); open(os.path.join(d, 'lock'), 'w').close()\n"
        "print('held', flush=True); time.sleep(0.5)\n"
        "os.remove(os.path.join(d, 'lock'))\n")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    t0 = time.time()
    fd = W._acquire_build_dir(str(d))  # must wait for the live builder, not delete its lock
    os.close(fd)
    holder.wait()
    assert time.time() - t0 > 0.2 and not (d / "lock").exists()


def test_build_dirs_differ_by_head_size_and_flags():
    k64 = W._build_key(64, W.build_flags(64, (9, 0)))
    assert k64 == W._build_key(64, W.build_flags(64, (9, 0)))
    assert k64 != W._build_key(32, W.build_flags(32, (9, 0)))
    assert k64 != W._build_key(64, W.build_flags(64, (8, 0)))
    assert not W._ops  # importing and CPU use never built anything
