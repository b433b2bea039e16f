// WKV7 fast kernels (docs/RECIPE.md section 2), fp32 state; the recurrences in fp32, the chunk kernel's products
// on TF32 tensor cores.
//
// Within a chunk of CHUNK steps, with P_t = d_0 * ... * d_t (per key column, P_{-1} = 1), the state
// in scaled form S~_t = S_t / P_t evolves without the decay multiply:
//     s_t = S~_{t-1} zh_t,  S~_t = S~_{t-1} + v_t kt_t^T + s_t bt_t^T,  y_t = S~_t rh_t,
// with zh_t = z_t P_{t-1}, bt_t = b_t / P_t, kt_t = k_t / P_t, rh_t = r_t P_t (d >= 0.3 keeps 1/P
// far from overflow over 16 steps). Rows of S are independent of each other, so:
//   fwd_rows_kernel   forward; one block per (batch, head), each thread owns RPT state rows x CPT
//                     columns in registers (TPR threads share a row). Writes y, s_t (sa) and the
//                     state at each chunk end.
//   bwd_rows_kernel   backward, same layout, walking t downwards with the scaled state gradient
//                     G^_t = P_t dL/dS_t: G^ += dy_t rh_t; dv_t = G^ kt_t; ds_t = G^ bt_t; G^ += ds_t zh_t.
//                     Writes dv, ds_t = dL/ds_t and the state gradient at each chunk end.
//   bwd_chunk_kernel  one block per chunk, no sequential dependence: with s_t and ds_t known, S and G
//                     are linear in the chunk's inputs, so dr = S_t^T dy, dz = S_{t-1}^T ds,
//                     dk = G_t^T v, db = G_t^T s are small matrix products against the chunk-start
//                     state and the chunk-end state gradient (TF32 tensor cores; see step 4);
//                     dw follows from the identity
//                     dL/dlog d_t = sum_{t'>=t} (r.dr + z_{t'+1}.dz_{t'+1} - k.dk - b.db)_{t'}
//                     + [t'=CHUNK-1] sum_i S[i,:] G[i,:] at the chunk end.
// The row kernels' chunk inputs arrive by cp.async, one chunk ahead. The same algorithm, in float64
// PyTorch, is checked against the oracle in tests/test_wkv7.py.
#include <type_traits>

#include "wkv7_common.cuh"

#if _N_ == 32 || _N_ == 64
#define WKV7_CHUNKED_SUPPORTED 1

namespace wkv7 {
namespace {

// ---------------------------------------------------------------------------------------------
// Helpers

__device__ __forceinline__ float4 ld4(const float *p) { return *reinterpret_cast<const float4 *>(p); }
__device__ __forceinline__ void st4(float *p, float4 x) { *reinterpret_cast<float4 *>(p) = x; }
// 16-byte store to global memory, kept in L2 only (plain float4 stores compile to four 4-byte stores here)
__device__ __forceinline__ void stg4(float *p, float4 x) { __stcg(reinterpret_cast<float4 *>(p), x); }

__device__ __forceinline__ void cp_async16(void *smem, const void *gmem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Raw chunk tensors in shared memory (bf16 [CHUNK][N] each), in this order.
enum { RAW_R, RAW_W, RAW_K, RAW_Z, RAW_B, NRAW };
// Scaled chunk vectors (fp32 [CHUNK][ld] each), in this order: kt, bt, rh, zh.
enum { V_KT, V_BT, V_RH, V_ZH };

// Copy the 16 x N values of r, w, k, z, b (and x, if given) of chunk c into raw (and rawx).
template <int NT>
__device__ __forceinline__ void issue_chunk(bf16 *raw, bf16 *rawx, const bf16 *const (&src)[NRAW], const bf16 *x,
                                            int bb, int c, int h, int T, int H, int tid) {
    constexpr int PER_T = N / 8, PIECES = CHUNK * PER_T;  // 16-byte pieces per time step, per chunk
#pragma unroll
    for (int i = 0; i < (PIECES + NT - 1) / NT; ++i) {  // a fixed trip count: no remainder loop
        const int e = tid + i * NT;
        if (PIECES % NT && e >= PIECES) break;
        const int t = e / PER_T, p = (e % PER_T) * 8;
        const size_t o = row_offset(bb, c * CHUNK + t, h, T, H) + p;
#pragma unroll
        for (int s = 0; s < NRAW; ++s) cp_async16(raw + s * CHUNK * N + t * N + p, src[s] + o);
        if (x) cp_async16(rawx + t * N + p, x + o);
    }
    cp_async_commit();
}

// Scaled chunk vectors from the raw ones: vec[(s * CHUNK + t) * LD + j]; P15[j] = P_{CHUNK-1};
// optionally the tables Pt = P_t, iPt = 1 / P_t and lw = log d_t ([CHUNK][N]). PARTS adjacent
// threads share a key column, CHUNK / PARTS steps each, with a shuffle scan of log P across them.
template <int NT, int LD>
__device__ __forceinline__ void prep_columns(const bf16 *raw, float *vec, float *P15, float *Pt, float *iPt, float *lw,
                                             int tid) {
    constexpr int PARTS = NT >= 4 * N ? 4 : NT >= 2 * N ? 2 : 1;
    constexpr int TS = CHUNK / PARTS;
    static_assert(N * PARTS % 32 == 0 && NT >= N, "whole warps per column group");
    const int j = tid / PARTS, part = tid % PARTS;
    if (j >= N) return;  // whole warps
    // Every load first: the compiler keeps them above the stores into vec (which may alias raw), so they
    // would otherwise wait one by one.
    float l[TS], a[TS], x[NRAW][TS], run = 0.f;
#pragma unroll
    for (int s = 0; s < NRAW; ++s)
#pragma unroll
        for (int u = 0; u < TS; ++u) x[s][u] = to_f(raw[s * CHUNK * N + (part * TS + u) * N + j]);
#pragma unroll
    for (int u = 0; u < TS; ++u) {
        l[u] = -__expf(x[RAW_W][u]);
        run += l[u];
        a[u] = run;
    }
    float incl = run;
#pragma unroll
    for (int off = 1; off < PARTS; off <<= 1) {
        const float o = __shfl_up_sync(0xffffffffu, incl, off, PARTS);
        if (part >= off) incl += o;
    }
    const float base = incl - run;  // log P just before this thread's first step
    float pm1 = __expf(base);
#pragma unroll
    for (int u = 0; u < TS; ++u) {
        const int t = part * TS + u, e = t * N + j;
        const float aa = base + a[u], p = __expf(aa), ip = __expf(-aa);
        vec[(V_KT * CHUNK + t) * LD + j] = x[RAW_K][u] * ip;
        vec[(V_BT * CHUNK + t) * LD + j] = x[RAW_B][u] * ip;
        vec[(V_RH * CHUNK + t) * LD + j] = x[RAW_R][u] * p;
        vec[(V_ZH * CHUNK + t) * LD + j] = x[RAW_Z][u] * pm1;
        if (Pt) Pt[e] = p;
        if (iPt) iPt[e] = ip;
        if (lw) lw[e] = l[u];
        pm1 = p;
    }
    if (part == PARTS - 1) P15[j] = pm1;
}

// ---------------------------------------------------------------------------------------------
// Row kernels

constexpr int RPT = 4;                   // state rows per thread
constexpr int CPT = N / 4;               // state columns per thread: 4 threads share a row
constexpr int NQ = CPT / 4;              // float4 groups per thread and row
constexpr int TPR = N / CPT;             // threads sharing a row
constexpr int NT_ROW = (N / RPT) * TPR;  // threads per block
static_assert(NT_ROW % 32 == 0 && (RPT == 2 || RPT == 4 || RPT == 8) && RPT <= TPR && TPR <= 32 &&
                  N * N / 4 % NT_ROW == 0, "row kernel layout");  // RPT: see load_rows

struct RowSmem {
    bf16 raw[2][NRAW * CHUNK * N];  // double-buffered chunk inputs
    bf16 rawx[2][CHUNK * N];        // v (forward) or dy (backward)
    float vec[4 * CHUNK * N];       // kt, bt, rh, zh
    float P15[N];
};

// Thread (row group rg, part q) owns rows RPT * rg + x and columns own_col(q, m) + e, m < NQ, e < 4.
__device__ __forceinline__ int own_col(int q, int m) { return 4 * (q + TPR * m); }

typedef float RowTile[RPT][CPT];

// p[x] = sum over the thread's CPT columns of X[x][.] * u[.] (one FMA chain per row: the RPT rows, and the
// two dots each step takes, keep enough chains in flight)
__device__ __forceinline__ void tile_dot(const RowTile &X, const float *u, int q, float (&p)[RPT]) {
    float4 a[NQ];
#pragma unroll
    for (int m = 0; m < NQ; ++m) a[m] = ld4(u + own_col(q, m));
#pragma unroll
    for (int x = 0; x < RPT; ++x) {
        float acc = 0.f;
#pragma unroll
        for (int m = 0; m < NQ; ++m) {
            acc = fmaf(X[x][4 * m], a[m].x, acc);
            acc = fmaf(X[x][4 * m + 1], a[m].y, acc);
            acc = fmaf(X[x][4 * m + 2], a[m].z, acc);
            acc = fmaf(X[x][4 * m + 3], a[m].w, acc);
        }
        p[x] = acc;
    }
}

// X[x][.] += c[x] * u[.]
__device__ __forceinline__ void tile_axpy(RowTile &X, const float (&c)[RPT], const float *u, int q) {
#pragma unroll
    for (int m = 0; m < NQ; ++m) {
        const float4 a = ld4(u + own_col(q, m));
#pragma unroll
        for (int x = 0; x < RPT; ++x) {
            X[x][4 * m] = fmaf(c[x], a.x, X[x][4 * m]);
            X[x][4 * m + 1] = fmaf(c[x], a.y, X[x][4 * m + 1]);
            X[x][4 * m + 2] = fmaf(c[x], a.z, X[x][4 * m + 2]);
            X[x][4 * m + 3] = fmaf(c[x], a.w, X[x][4 * m + 3]);
        }
    }
}

// X[x][.] = X[x][.] + c1[x] * u1[.] + c2[x] * u2[.] (c2 last: it is the one on the critical path)
__device__ __forceinline__ void tile_axpy2(RowTile &X, const float (&c1)[RPT], const float *u1, const float (&c2)[RPT],
                                           const float *u2, int q) {
#pragma unroll
    for (int m = 0; m < NQ; ++m) {
        const float4 a = ld4(u1 + own_col(q, m)), b = ld4(u2 + own_col(q, m));
#pragma unroll
        for (int x = 0; x < RPT; ++x) {
            X[x][4 * m] = fmaf(c2[x], b.x, fmaf(c1[x], a.x, X[x][4 * m]));
            X[x][4 * m + 1] = fmaf(c2[x], b.y, fmaf(c1[x], a.y, X[x][4 * m + 1]));
            X[x][4 * m + 2] = fmaf(c2[x], b.z, fmaf(c1[x], a.z, X[x][4 * m + 2]));
            X[x][4 * m + 3] = fmaf(c2[x], b.w, fmaf(c1[x], a.w, X[x][4 * m + 3]));
        }
    }
}

__device__ __forceinline__ void tile_scale(RowTile &X, const float *u, int q) {
#pragma unroll
    for (int m = 0; m < NQ; ++m) {
        const float4 a = ld4(u + own_col(q, m));
#pragma unroll
        for (int x = 0; x < RPT; ++x) {
            X[x][4 * m] *= a.x;
            X[x][4 * m + 1] *= a.y;
            X[x][4 * m + 2] *= a.z;
            X[x][4 * m + 3] *= a.w;
        }
    }
}

// Rows RPT * rg + x of a row-major [N][N] matrix in global memory at dst.
__device__ __forceinline__ void tile_store(const RowTile &X, float *dst, int rg, int q) {
#pragma unroll
    for (int x = 0; x < RPT; ++x)
#pragma unroll
        for (int m = 0; m < NQ; ++m)
            stg4(dst + (size_t)(RPT * rg + x) * N + own_col(q, m),
                 make_float4(X[x][4 * m], X[x][4 * m + 1], X[x][4 * m + 2], X[x][4 * m + 3]));
}

__device__ __forceinline__ float pick(const float (&p)[RPT], int x) {  // p[x], x < RPT
    float v = p[0];
#pragma unroll
    for (int i = 1; i < RPT; ++i) v = x == i ? p[i] : v;
    return v;
}

// Sums p[x] over the TPR threads of the row group, into every thread (butterfly: log2(TPR) rounds).
__device__ __forceinline__ void row_allreduce(float (&p)[RPT]) {
#pragma unroll
    for (int off = 1; off < TPR; off <<= 1)
#pragma unroll
        for (int x = 0; x < RPT; ++x) p[x] += __shfl_xor_sync(0xffffffffu, p[x], off);
}

// The full sum of row (q & (RPT - 1)) of the row group (meaningful for q < RPT); p is clobbered.
__device__ __forceinline__ float row_scatter(float (&p)[RPT], int q) {
    // reduce-scatter within aligned groups of RPT threads (RPT - 1 shuffles): at offset o each thread keeps
    // the rows whose bit o matches its own and sends the others; then a butterfly across the groups
#pragma unroll
    for (int o = 1, n = RPT; o < RPT; o <<= 1, n >>= 1) {
        const bool hi = q & o;
#pragma unroll
        for (int i = 0; i < n / 2; ++i)
            p[i] = (hi ? p[2 * i + 1] : p[2 * i]) + __shfl_xor_sync(0xffffffffu, hi ? p[2 * i] : p[2 * i + 1], o);
    }
    float mine = p[0];
#pragma unroll
    for (int off = RPT; off < TPR; off <<= 1) mine += __shfl_xor_sync(0xffffffffu, mine, off);
    return mine;
}

// RPT consecutive bf16 of shared memory (2 RPT-byte aligned) as floats, in one load.
__device__ __forceinline__ void load_rows(const bf16 *src, float (&out)[RPT]) {
    using Word = std::conditional_t<RPT == 2, unsigned, std::conditional_t<RPT == 4, uint2, uint4>>;
    const Word u = *reinterpret_cast<const Word *>(src);
    const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&u);
#pragma unroll
    for (int i = 0; i < RPT / 2; ++i) {
        const float2 a = __bfloat1622float2(h[i]);
        out[2 * i] = a.x;
        out[2 * i + 1] = a.y;
    }
}

// One forward step t of the row kernel: S~ += v_t kt_t + s_t bt_t; y_t = S~ rh_t; s_{t+1} = S~ zh_{t+1}.
// y_row and sa_row point at this thread's row (RPT * rg + q) at the chunk's first step; steps are HN apart.
template <bool NEXT>
__device__ __forceinline__ void fwd_step(RowTile &S, float (&sa)[RPT], const RowSmem &sm, int buf, int t, int rg, int q,
                                         bf16 *y_row, float *sa_row, int HN) {
    float v[RPT], py[RPT], pn[RPT];
    load_rows(sm.rawx[buf] + t * N + RPT * rg, v);
    tile_axpy2(S, v, sm.vec + (V_KT * CHUNK + t) * N, sa, sm.vec + (V_BT * CHUNK + t) * N, q);
    tile_dot(S, sm.vec + (V_RH * CHUNK + t) * N, q, py);
    if (NEXT) {
        tile_dot(S, sm.vec + (V_ZH * CHUNK + t + 1) * N, q, pn);
        row_allreduce(pn);
    }
    const float sa_mine = pick(sa, q & (RPT - 1)), y = row_scatter(py, q);
    if (q < RPT) {
        y_row[t * HN] = to_bf(y);
        sa_row[t * HN] = sa_mine;
    }
    if (NEXT)
#pragma unroll
        for (int x = 0; x < RPT; ++x) sa[x] = pn[x];
}

// One backward step t of the row kernel: G^ += dy_t rh_t (+ ds_{t+1} zh_{t+1} pending from step t+1);
// dv_t = G^ kt_t; ds_t = G^ bt_t (left in ds, its zh_t term pending). dv_row, ds_row: as fwd_step's outputs.
template <bool PENDING>
__device__ __forceinline__ void bwd_step(RowTile &G, float (&ds)[RPT], const RowSmem &sm, int buf, int t, int rg, int q,
                                         bf16 *dv_row, float *ds_row, int HN) {
    float dy[RPT], pv[RPT];
    load_rows(sm.rawx[buf] + t * N + RPT * rg, dy);
    if (PENDING) tile_axpy2(G, dy, sm.vec + (V_RH * CHUNK + t) * N, ds, sm.vec + (V_ZH * CHUNK + t + 1) * N, q);
    else tile_axpy(G, dy, sm.vec + (V_RH * CHUNK + t) * N, q);
    tile_dot(G, sm.vec + (V_BT * CHUNK + t) * N, q, ds);
    tile_dot(G, sm.vec + (V_KT * CHUNK + t) * N, q, pv);
    row_allreduce(ds);
    const float dv = row_scatter(pv, q), ds_mine = pick(ds, q & (RPT - 1));
    if (q < RPT) {
        dv_row[t * HN] = to_bf(dv);
        ds_row[t * HN] = ds_mine;
    }
}

struct RowArgs {
    int T, H;
    const bf16 *src[NRAW];  // r, w, k, z, b
    const bf16 *x;          // v (forward) or dy (backward)
};

__global__ void __launch_bounds__(NT_ROW) fwd_rows_kernel(const RowArgs args, bf16 *__restrict__ y_,
                                                          float *__restrict__ sa_, float *__restrict__ states_) {
    const int T = args.T, H = args.H, h = blockIdx.x, bb = blockIdx.y, tid = threadIdx.x;
    const int q = tid % TPR, rg = tid / TPR, NC = T / CHUNK;
    extern __shared__ float4 smem_rows[];
    RowSmem &sm = *reinterpret_cast<RowSmem *>(smem_rows);
    float *states = states_ + ((size_t)bb * H + h) * NC * N * N;

    RowTile S;
#pragma unroll
    for (int x = 0; x < RPT; ++x)
#pragma unroll
        for (int c = 0; c < CPT; ++c) S[x][c] = 0.f;
    issue_chunk<NT_ROW>(sm.raw[0], sm.rawx[0], args.src, args.x, bb, 0, h, T, H, tid);

    for (int c = 0; c < NC; ++c) {
        const int buf = c & 1;
        cp_async_wait_all();
        __syncthreads();
        if (c + 1 < NC) issue_chunk<NT_ROW>(sm.raw[buf ^ 1], sm.rawx[buf ^ 1], args.src, args.x, bb, c + 1, h, T, H, tid);
        prep_columns<NT_ROW, N>(sm.raw[buf], sm.vec, sm.P15, nullptr, nullptr, nullptr, tid);
        __syncthreads();
        // s_0 from the chunk-start state, then per step: update, y_t and s_{t+1} from the new state.
        float sa[RPT];
        tile_dot(S, sm.vec + V_ZH * CHUNK * N, q, sa);
        row_allreduce(sa);
        const size_t o = row_offset(bb, c * CHUNK, h, T, H) + RPT * rg + q;
        bf16 *y_row = y_ + o;
        float *sa_row = sa_ + o;
#pragma unroll 3
        for (int t = 0; t < CHUNK - 1; ++t) fwd_step<true>(S, sa, sm, buf, t, rg, q, y_row, sa_row, H * N);
        fwd_step<false>(S, sa, sm, buf, CHUNK - 1, rg, q, y_row, sa_row, H * N);
        tile_scale(S, sm.P15, q);  // S~ -> S at the chunk end
        tile_store(S, states + (size_t)c * N * N, rg, q);
    }
}

__global__ void __launch_bounds__(NT_ROW) bwd_rows_kernel(const RowArgs args, bf16 *__restrict__ dv_,
                                                          float *__restrict__ ds_, float *__restrict__ hstates_) {
    const int T = args.T, H = args.H, h = blockIdx.x, bb = blockIdx.y, tid = threadIdx.x;
    const int q = tid % TPR, rg = tid / TPR, NC = T / CHUNK;
    extern __shared__ float4 smem_rows[];
    RowSmem &sm = *reinterpret_cast<RowSmem *>(smem_rows);
    float *hstates = hstates_ + ((size_t)bb * H + h) * NC * N * N;

    RowTile G;  // dL/dS at the chunk end from later steps; scaled G^ inside the chunk
#pragma unroll
    for (int x = 0; x < RPT; ++x)
#pragma unroll
        for (int c = 0; c < CPT; ++c) G[x][c] = 0.f;
    issue_chunk<NT_ROW>(sm.raw[0], sm.rawx[0], args.src, args.x, bb, NC - 1, h, T, H, tid);

    for (int c = NC - 1, n = 0; c >= 0; --c, ++n) {
        const int buf = n & 1;
        tile_store(G, hstates + (size_t)c * N * N, rg, q);
        cp_async_wait_all();
        __syncthreads();
        if (c > 0) issue_chunk<NT_ROW>(sm.raw[buf ^ 1], sm.rawx[buf ^ 1], args.src, args.x, bb, c - 1, h, T, H, tid);
        prep_columns<NT_ROW, N>(sm.raw[buf], sm.vec, sm.P15, nullptr, nullptr, nullptr, tid);
        __syncthreads();
        tile_scale(G, sm.P15, q);
        const size_t o = row_offset(bb, c * CHUNK, h, T, H) + RPT * rg + q;
        bf16 *dv_row = dv_ + o;
        float *ds_row = ds_ + o;
        float ds[RPT];
        bwd_step<false>(G, ds, sm, buf, CHUNK - 1, rg, q, dv_row, ds_row, H * N);
#pragma unroll 3
        for (int t = CHUNK - 2; t >= 0; --t) bwd_step<true>(G, ds, sm, buf, t, rg, q, dv_row, ds_row, H * N);
        tile_axpy(G, ds, sm.vec + V_ZH * CHUNK * N, q);  // G_{-1} = G_0 + ds_0 z_0^T: the next chunk's He
    }
}

// ---------------------------------------------------------------------------------------------
// Chunk kernel

constexpr int NT_CH = 256;         // 8 warps
// Row strides of the mma operands in shared memory, for conflict-free fragment loads (see warp_gemm): left operands
// (row-major, k contiguous) are read as float2 at 8 g + 2 t4, right ones (row-major, n contiguous) at 8 t4 + g.
constexpr int LDA = N + 8;
constexpr int LDB = N + 4;
constexpr int LDI = 2 * CHUNK + 8;

// Shared memory of the chunk kernel, in floats.
struct ChunkLayout {
    static constexpr int Sc = 0;                       // [N][LDB] state before the chunk
    static constexpr int Hs = Sc + N * LDB;            // [N][LDB] state gradient at the chunk end (He)
    static constexpr int vec = Hs + N * LDB;           // [4 * CHUNK][LDB] kt, bt, rh, zh
    static constexpr int A = vec + 4 * CHUNK * LDB;    // [64][LDA] rows dy, ds, v, s; later the outputs
    static constexpr int Ai = A + 64 * LDA;            // [64][LDI] intra-chunk coefficients
    static constexpr int Pt = Ai + 64 * LDI;           // [CHUNK][N] P_t
    static constexpr int iPt = Pt + CHUNK * N;         // [CHUNK][N] 1 / P_t
    static constexpr int lw = iPt + CHUNK * N;         // [CHUNK][N] log d_t
    static constexpr int raw = lw + CHUNK * N;         // bf16 [NRAW][CHUNK][N]
    static constexpr int rawx = raw + NRAW * CHUNK * N / 2;  // bf16 [2][CHUNK][N] dy, v
    static constexpr int P15 = rawx + CHUNK * N;
    static constexpr int bnd = P15 + N;                // [NT_CH / N][N] partial sums of the boundary term
    static constexpr int total = bnd + NT_CH;
    static_assert(total * sizeof(float) <= 113 * 1024, "two blocks per SM");
};

__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t to_tf32(float x) {
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
}

// x = hi + lo with both rounded to TF32: the remainder keeps the bits hi drops
__device__ __forceinline__ void split_tf32(float x, uint32_t &hi, uint32_t &lo) {
    hi = to_tf32(x);
    lo = to_tf32(x - __uint_as_float(hi));
}

// acc[nt] (a 16 x 8 tile, mma layout) += a[16 x K] * b[K x 8 NTILES] on TF32 tensor cores (fp32 sums). The
// operands are rounded to TF32 (10-bit mantissas), except that SPLIT_B adds the product with the rounding
// remainder of b: a_hi b_hi + a_hi b_lo (tools/KERNEL_NOTES.md's TF32 table says why b only). a is row-major
// (lda); b is row-major (ldb), or given transposed (element (k, n) at b[n * ldb + k]) when TB. The k slots t4 and
// t4 + 4 of each 8-step carry k = 2 t4 and 2 t4 + 1 (any order of k gives the same sum), so that a row-major
// left operand, and a transposed right one, load as one float2.
template <int K, int NTILES, bool TB, bool SPLIT_B>
__device__ __forceinline__ void warp_gemm(float (&acc)[NTILES][4], const float *a, int lda, const float *b, int ldb,
                                          int lane) {
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll 2
    for (int k0 = 0; k0 < K; k0 += 8) {
        const float2 a0 = *reinterpret_cast<const float2 *>(a + g * lda + k0 + 2 * t4);
        const float2 a1 = *reinterpret_cast<const float2 *>(a + (g + 8) * lda + k0 + 2 * t4);
        const float af[4] = {a0.x, a1.x, a0.y, a1.y};
        uint32_t ah[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) ah[e] = to_tf32(af[e]);
#pragma unroll
        for (int nt = 0; nt < NTILES; ++nt) {
            const int n = 8 * nt + g;
            const float2 b2 = TB ? *reinterpret_cast<const float2 *>(b + n * ldb + k0 + 2 * t4)
                                 : make_float2(b[(k0 + 2 * t4) * ldb + n], b[(k0 + 2 * t4 + 1) * ldb + n]);
            const float bf[2] = {b2.x, b2.y};
            uint32_t bh[2], bl[2];
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                if constexpr (SPLIT_B) split_tf32(bf[e], bh[e], bl[e]);
                else bh[e] = to_tf32(bf[e]);
            }
            if constexpr (SPLIT_B) mma_tf32(acc[nt], ah, bl);
            mma_tf32(acc[nt], ah, bh);
        }
    }
}

__global__ void __launch_bounds__(NT_CH, 2) bwd_chunk_kernel(
    const RowArgs args, const bf16 *__restrict__ v_, const bf16 *__restrict__ dy_, const float *__restrict__ sa_,
    const float *__restrict__ ds_, const float *__restrict__ states_, const float *__restrict__ hstates_,
    bf16 *__restrict__ dr_, bf16 *__restrict__ dw_, bf16 *__restrict__ dk_,
    bf16 *__restrict__ dz_, bf16 *__restrict__ db_) {
    typedef ChunkLayout L;
    const int T = args.T, H = args.H, c = blockIdx.x, h = blockIdx.y, bb = blockIdx.z, tid = threadIdx.x;
    const int NC = T / CHUNK, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
    extern __shared__ float4 smem4[];
    float *sm = reinterpret_cast<float *>(smem4);
    float *A = sm + L::A;
    const size_t bh = (size_t)bb * H + h;

    // 1. Load. Rows of A: 0..15 dy, 16..31 ds, 32..47 v, 48..63 s (dy and v through rawx, as bf16).
    bf16 *raw = reinterpret_cast<bf16 *>(sm + L::raw), *rawx = reinterpret_cast<bf16 *>(sm + L::rawx);
    issue_chunk<NT_CH>(raw, nullptr, args.src, nullptr, bb, c, h, T, H, tid);
    for (int e = tid; e < CHUNK * N / 4; e += NT_CH) {
        const int t = e / (N / 4), j = (e % (N / 4)) * 4;
        const size_t o = row_offset(bb, c * CHUNK + t, h, T, H) + j;
        cp_async16(A + (CHUNK + t) * LDA + j, ds_ + o);
        cp_async16(A + (3 * CHUNK + t) * LDA + j, sa_ + o);
    }
    for (int e = tid; e < CHUNK * N / 8; e += NT_CH) {
        const int t = e / (N / 8), j = (e % (N / 8)) * 8;
        const size_t o = row_offset(bb, c * CHUNK + t, h, T, H) + j;
        cp_async16(rawx + t * N + j, dy_ + o);
        cp_async16(rawx + (CHUNK + t) * N + j, v_ + o);
    }
    const float *Sprev = states_ + (bh * NC + (c > 0 ? c - 1 : 0)) * N * N;
    const float *He = hstates_ + (bh * NC + c) * N * N;
    for (int e = tid; e < N * N / 4; e += NT_CH) {
        const int i = e / (N / 4), j = (e % (N / 4)) * 4;
        if (c > 0) cp_async16(sm + L::Sc + i * LDB + j, Sprev + i * N + j);
        else st4(sm + L::Sc + i * LDB + j, make_float4(0.f, 0.f, 0.f, 0.f));
        cp_async16(sm + L::Hs + i * LDB + j, He + i * N + j);
    }
    cp_async_commit();
    // The chunk-end state S_end, for dw's boundary term sum_i S_end[i][j] He[i][j] (0 in the last chunk, whose He
    // is 0): this thread's column j and rows BR k + br, loaded while the copies above are in flight.
    constexpr int BR = NT_CH / N;
    const int bj = tid % N, br = tid / N;
    float send[N / BR];
#pragma unroll
    for (int k = 0; k < N / BR; ++k) send[k] = states_[(bh * NC + c) * N * N + (BR * k + br) * N + bj];
    cp_async_wait_all();
    __syncthreads();
    {
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < N / BR; ++k) s = fmaf(send[k], sm[L::Hs + (BR * k + br) * LDB + bj], s);
        sm[L::bnd + br * N + bj] = s;  // read in step 6, after several barriers
    }

    // 2. dy and v to fp32 rows of A; the scaled chunk vectors and the P_t tables.
    for (int e = tid; e < 2 * CHUNK * N / 8; e += NT_CH) {
        const int r = e / (N / 8), j = (e % (N / 8)) * 8, row = r < CHUNK ? r : r + CHUNK;
        float f[8];
        unpack8(*reinterpret_cast<const uint4 *>(rawx + r * N + j), f);
        st4(A + row * LDA + j, make_float4(f[0], f[1], f[2], f[3]));
        st4(A + row * LDA + j + 4, make_float4(f[4], f[5], f[6], f[7]));
    }
    prep_columns<NT_CH, LDB>(raw, sm + L::vec, sm + L::P15, sm + L::Pt, sm + L::iPt, sm + L::lw, tid);
    __syncthreads();

    // 3. Gram matrix M[a][b] = A[a] . A[32 + b] (a: dy, ds rows; b: v, s rows), one 16 x 8 tile per
    //    warp, written straight into the intra-chunk coefficients Ai (64 x 32). Output rows of X:
    //    0..15 X_R (dr), 16..31 X_Z (dz), 32..47 X_K (dk), 48..63 X_B (db); columns index the right
    //    operand rows [kt; bt] (X_R, X_Z) or [rh; zh] (X_K, X_B). M[a][b] lands at Ai[a][b] and at
    //    Ai[32 + b][a], both kept where (b mod 16) <= (a mod 16) for dy rows, < for ds rows.
    {
        float acc[1][4] = {};
        const int m0 = 16 * (warp & 1), n0 = 8 * (warp >> 1);
        warp_gemm<N, 1, true, false>(acc, A + m0 * LDA, LDA, A + (2 * CHUNK + n0) * LDA, LDA, lane);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int a = m0 + g + 8 * (i >> 1), b = n0 + 2 * t4 + (i & 1);
            const int ta = a % CHUNK, tb = b % CHUNK;
            const bool keep = a < CHUNK ? tb <= ta : tb < ta;
            const float val = keep ? acc[0][i] : 0.f;
            sm[L::Ai + a * LDI + b] = val;
            sm[L::Ai + (2 * CHUNK + b) * LDI + a] = val;
        }
    }
    __syncthreads();

    // 4. X = A * (Sc | He P_15) + Ai * ([kt; bt] | [rh; zh]); warp w: rows 16 mt.., columns n0..n0+N/2-1.
    constexpr int NTW = N / 16;  // n-tiles per warp
    const int mt = warp & 3, n0 = (N / 2) * (warp >> 2);
    const bool top = mt < 2;
    float acc[NTW][4] = {};
    // One TF32 pass everywhere except the right operand of the intra-chunk product ([kt; bt] or [rh; zh]):
    // rounding it too raised dw's error at the fastest decays by 26% (tools/KERNEL_NOTES.md)
    warp_gemm<N, NTW, false, false>(acc, A + 16 * mt * LDA, LDA, sm + (top ? L::Sc : L::Hs) + n0, LDB, lane);
    if (!top)
#pragma unroll
        for (int nt = 0; nt < NTW; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[nt][i] *= sm[L::P15 + n0 + 8 * nt + 2 * t4 + (i & 1)];
    warp_gemm<2 * CHUNK, NTW, false, true>(acc, sm + L::Ai + 16 * mt * LDI, LDI,
                                           sm + L::vec + (top ? 0 : 2 * CHUNK) * LDB + n0, LDB, lane);
    __syncthreads();  // everyone is done reading A

    // 5. dr = P_t X_R, dz = P_{t-1} X_Z, dk = X_K / P_t, db = X_B / P_t; X staged in A for step 6.
    {
        bf16 *out = mt == 0 ? dr_ : mt == 1 ? dz_ : mt == 2 ? dk_ : db_;
#pragma unroll
        for (int nt = 0; nt < NTW; ++nt)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int t = g + 8 * hh, j = n0 + 8 * nt + 2 * t4;
                const float x0 = acc[nt][2 * hh], x1 = acc[nt][2 * hh + 1];
                A[(16 * mt + t) * LDA + j] = x0;
                A[(16 * mt + t) * LDA + j + 1] = x1;
                float s0 = 1.f, s1 = 1.f;
                if (mt == 0) s0 = sm[L::Pt + t * N + j], s1 = sm[L::Pt + t * N + j + 1];
                else if (mt == 1) {
                    if (t) s0 = sm[L::Pt + (t - 1) * N + j], s1 = sm[L::Pt + (t - 1) * N + j + 1];
                } else s0 = sm[L::iPt + t * N + j], s1 = sm[L::iPt + t * N + j + 1];
                *reinterpret_cast<__nv_bfloat162 *>(out + row_offset(bb, c * CHUNK + t, h, T, H) + j) =
                    __floats2bfloat162_rn(x0 * s0, x1 * s1);
            }
    }
    __syncthreads();

    // 6. dw_t = log d_t * sum_{t' >= t} dA_t': 4 threads per column, a shuffle suffix scan across them.
    {
        const int j = tid / 4, part = tid % 4;
        if (j < N) {  // whole warps
            const float *vec = sm + L::vec;
            float dA[4], tot = 0.f;
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int t = 4 * part + u;
                float s = vec[(V_RH * CHUNK + t) * LDB + j] * A[t * LDA + j];
                s = fmaf(-vec[(V_KT * CHUNK + t) * LDB + j], A[(2 * CHUNK + t) * LDA + j], s);
                s = fmaf(-vec[(V_BT * CHUNK + t) * LDB + j], A[(3 * CHUNK + t) * LDA + j], s);
                if (t + 1 < CHUNK) s = fmaf(vec[(V_ZH * CHUNK + t + 1) * LDB + j], A[(CHUNK + t + 1) * LDA + j], s);
                dA[u] = s;
                tot += s;
            }
            float incl = tot;
#pragma unroll
            for (int off = 1; off < 4; off <<= 1) {
                const float o = __shfl_down_sync(0xffffffffu, incl, off, 4);
                if (part + off < 4) incl += o;
            }
            float s = incl - tot;
#pragma unroll
            for (int i = 0; i < BR; ++i) s += sm[L::bnd + i * N + j];
#pragma unroll
            for (int u = 3; u >= 0; --u) {
                const int t = 4 * part + u;
                s += dA[u];
                dw_[row_offset(bb, c * CHUNK + t, h, T, H) + j] = to_bf(sm[L::lw + t * N + j] * s);
            }
        }
    }
}

}  // namespace
}  // namespace wkv7
#endif  // _N_ == 32 || _N_ == 64

using namespace wkv7;

#ifdef WKV7_CHUNKED_SUPPORTED
namespace {
RowArgs row_args(int T, int H, const void *r, const void *w, const void *k, const void *z, const void *b,
                 const void *x) {
    RowArgs a;
    a.T = T;
    a.H = H;
    a.src[RAW_R] = (const bf16 *)r;
    a.src[RAW_W] = (const bf16 *)w;
    a.src[RAW_K] = (const bf16 *)k;
    a.src[RAW_Z] = (const bf16 *)z;
    a.src[RAW_B] = (const bf16 *)b;
    a.x = (const bf16 *)x;
    return a;
}

template <typename K>
cudaError_t set_smem(K kernel, int bytes) {
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}
}  // namespace
#endif

extern "C" int wkv7_chunked_forward(int B, int T, int H, const void *r, const void *w, const void *k, const void *v,
                                    const void *z, const void *b, void *y, float *sa, float *states, void *stream) {
#ifdef WKV7_CHUNKED_SUPPORTED
    if (T % CHUNK) return (int)cudaErrorInvalidValue;
    const int smem = (int)sizeof(RowSmem);
    cudaError_t err = set_smem(fwd_rows_kernel, smem);
    if (err != cudaSuccess) return (int)err;
    fwd_rows_kernel<<<dim3(H, B), NT_ROW, smem, (cudaStream_t)stream>>>(row_args(T, H, r, w, k, z, b, v), (bf16 *)y,
                                                                         sa, states);
    return (int)cudaGetLastError();
#else
    return (int)cudaErrorNotSupported;
#endif
}

extern "C" int wkv7_chunked_backward(int B, int T, int H, const void *r, const void *w, const void *k, const void *v,
                                     const void *z, const void *b, const void *dy, const float *sa,
                                     const float *states, float *ds, float *hstates, void *dr, void *dw,
                                     void *dk, void *dv, void *dz, void *db, void *stream) {
#ifdef WKV7_CHUNKED_SUPPORTED
    if (T % CHUNK) return (int)cudaErrorInvalidValue;
    cudaStream_t st = (cudaStream_t)stream;
    const int smem_rows = (int)sizeof(RowSmem);
    cudaError_t err = set_smem(bwd_rows_kernel, smem_rows);
    if (err != cudaSuccess) return (int)err;
    bwd_rows_kernel<<<dim3(H, B), NT_ROW, smem_rows, st>>>(row_args(T, H, r, w, k, z, b, dy), (bf16 *)dv, ds,
                                                            hstates);
    err = cudaGetLastError();
    if (err != cudaSuccess) return (int)err;
    const int smem = ChunkLayout::total * (int)sizeof(float);
    err = set_smem(bwd_chunk_kernel, smem);
    if (err != cudaSuccess) return (int)err;
    bwd_chunk_kernel<<<dim3(T / CHUNK, H, B), NT_CH, smem, st>>>(
        row_args(T, H, r, w, k, z, b, nullptr), (const bf16 *)v, (const bf16 *)dy, sa, ds, states, hstates,
        (bf16 *)dr, (bf16 *)dw, (bf16 *)dk, (bf16 *)dz, (bf16 *)db);
    return (int)cudaGetLastError();
#else
    return (int)cudaErrorNotSupported;
#endif
}
