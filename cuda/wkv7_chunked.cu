// WKV7 fast kernels (RECIPE.md section 2), fp32 state and fp32 arithmetic throughout.
//
// Within a chunk of CHUNK steps, with P_t = d_0 * ... * d_t (per key column, P_{-1} = 1), the state
// in scaled form S~_t = S_t / P_t evolves without the decay multiply:
//     s_t = S~_{t-1} zh_t,  S~_t = S~_{t-1} + s_t bt_t^T + v_t kt_t^T,  y_t = S~_t rh_t,
// with zh_t = z_t P_{t-1}, bt_t = b_t / P_t, kt_t = k_t / P_t, rh_t = r_t P_t (d >= 0.3 keeps 1/P
// far from overflow over 16 steps). Rows of S are independent of each other, so:
//   fwd_rows_kernel   forward; each block owns ROWS state rows of one (batch, head), TPR threads per
//                     row (16 columns each). Writes y, s_t (sa) and the state at each chunk end.
//   bwd_rows_kernel   backward, same layout, walking t downwards with the scaled state gradient
//                     G^_t = P_t dL/dS_t: G^ += dy_t rh_t; dv_t = G^ kt_t; ds_t = G^ bt_t; G^ += ds_t zh_t.
//                     Writes dv, ds_t = dL/ds_t and the state gradient at each chunk end.
//   bwd_chunk_kernel  one block per chunk, no sequential dependence: with s_t and ds_t known, S and G
//                     are linear in the chunk's inputs, so dr = S_t^T dy, dz = S_{t-1}^T ds,
//                     dk = G_t^T v, db = G_t^T s are small matrix products against the chunk-start
//                     state and the chunk-end state gradient; dw follows from the identity
//                     dL/dlog d_t = sum_{t'>=t} (r.dr + z_{t'+1}.dz_{t'+1} - k.dk - b.db)_{t'}
//                     + [t'=CHUNK-1] sum_i S[i,:] G[i,:] at the chunk end.
// The same algorithm, in float64 PyTorch, is checked against the oracle in tests/test_wkv7.py.
#include "wkv7_common.cuh"

namespace wkv7 {
namespace {

constexpr int TPR = N / 16;         // threads per state row in the row kernels (16 columns each)
constexpr int ROWS = 32;            // state rows per block in the row kernels
constexpr int NT_ROW = ROWS * TPR;  // = 2N
constexpr int NT_CH = 4 * N;        // threads of the chunk kernel
constexpr int LDA = N + 4;          // row stride (floats) of the chunk kernel's left operands
constexpr int LDI = 2 * CHUNK + 4;  // row stride of its intra-chunk coefficient matrix
constexpr int LDM = 2 * CHUNK + 1;  // row stride of its Gram matrix
static_assert(N == 32 || N == 64 || N == 128, "head size must be 32, 64 or 128");
static_assert(NT_ROW == 2 * N && NT_CH >= 2 * N, "one 8-element load per thread per chunk vector");

// Chunk vectors in shared memory: vec[0..3] = kt, bt, rh, zh ([CHUNK][N] each); cum = log P_t.
struct ChunkVecs {
    float *vec;
    float *cum;
    float *P15;
    __device__ float *kt() const { return vec; }
    __device__ float *bt() const { return vec + CHUNK * N; }
    __device__ float *rh() const { return vec + 2 * CHUNK * N; }
    __device__ float *zh() const { return vec + 3 * CHUNK * N; }
};

// The 16 x N raw values of r, w, k, z, b of one chunk: thread tid < 2N holds 8 of each.
struct RawChunk {
    uint4 r, w, k, z, b;
    __device__ void load(const bf16 *r_, const bf16 *w_, const bf16 *k_, const bf16 *z_, const bf16 *b_,
                         int bb, int c, int h, int T, int H, int tid) {
        if (tid >= 2 * N) return;
        const size_t o = row_offset(bb, c * CHUNK + tid / (N / 8), h, T, H) + (tid % (N / 8)) * 8;
        r = *reinterpret_cast<const uint4 *>(r_ + o);
        w = *reinterpret_cast<const uint4 *>(w_ + o);
        k = *reinterpret_cast<const uint4 *>(k_ + o);
        z = *reinterpret_cast<const uint4 *>(z_ + o);
        b = *reinterpret_cast<const uint4 *>(b_ + o);
    }
    // Raw k, b, r, z into vec[0..3]; log d = -exp(w) into cum (and into lw when given).
    __device__ void store(const ChunkVecs &cv, float *lw, int tid) const {
        if (tid >= 2 * N) return;
        const int e0 = tid * 8;  // = t * N + column
        float f[8];
        unpack8(k, f);
#pragma unroll
        for (int e = 0; e < 8; ++e) cv.kt()[e0 + e] = f[e];
        unpack8(b, f);
#pragma unroll
        for (int e = 0; e < 8; ++e) cv.bt()[e0 + e] = f[e];
        unpack8(r, f);
#pragma unroll
        for (int e = 0; e < 8; ++e) cv.rh()[e0 + e] = f[e];
        unpack8(z, f);
#pragma unroll
        for (int e = 0; e < 8; ++e) cv.zh()[e0 + e] = f[e];
        unpack8(w, f);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float l = -__expf(f[e]);
            cv.cum[e0 + e] = l;
            if (lw) lw[e0 + e] = l;
        }
    }
};

// Turns the raw chunk vectors into the scaled ones (see the top of the file). Call after a barrier
// that follows RawChunk::store; returns after a barrier.
template <int NT>
__device__ void prep_chunk(const ChunkVecs &cv) {
    const int tid = threadIdx.x;
    if (tid < N) {
        float a = 0.f;
#pragma unroll
        for (int t = 0; t < CHUNK; ++t) {
            a += cv.cum[t * N + tid];
            cv.cum[t * N + tid] = a;
        }
        cv.P15[tid] = __expf(a);
    }
    __syncthreads();
    for (int e = tid; e < CHUNK * N; e += NT) {
        const float a = cv.cum[e], p = __expf(a), ip = __expf(-a);
        const float pm1 = e >= N ? __expf(cv.cum[e - N]) : 1.f;
        cv.kt()[e] *= ip;
        cv.bt()[e] *= ip;
        cv.rh()[e] *= p;
        cv.zh()[e] *= pm1;
    }
    __syncthreads();
}

// Row kernels: thread (row rl, part q) owns columns 4 * (q + TPR * m) + e, m, e = 0..3.
__device__ __forceinline__ int own_col(int q, int m) { return 4 * (q + TPR * m); }

__device__ __forceinline__ float4 ld4(const float *p) { return *reinterpret_cast<const float4 *>(p); }
__device__ __forceinline__ void st4(float *p, float4 x) { *reinterpret_cast<float4 *>(p) = x; }

// sum_j X[j] * u[col(j)] over the thread's 16 columns, then over the TPR threads of the row.
__device__ __forceinline__ float row_dot(const float (&X)[16], const float *u, int q) {
    float p[4];
#pragma unroll
    for (int m = 0; m < 4; ++m) {
        const float4 a = ld4(u + own_col(q, m));
        p[m] = X[4 * m] * a.x;
        p[m] = fmaf(X[4 * m + 1], a.y, p[m]);
        p[m] = fmaf(X[4 * m + 2], a.z, p[m]);
        p[m] = fmaf(X[4 * m + 3], a.w, p[m]);
    }
    float s = (p[0] + p[1]) + (p[2] + p[3]);
#pragma unroll
    for (int off = 1; off < TPR; off <<= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    return s;
}

// X[j] += a * u[col(j)].
__device__ __forceinline__ void row_axpy(float (&X)[16], float a, const float *u, int q) {
#pragma unroll
    for (int m = 0; m < 4; ++m) {
        const float4 x = ld4(u + own_col(q, m));
        X[4 * m] = fmaf(a, x.x, X[4 * m]);
        X[4 * m + 1] = fmaf(a, x.y, X[4 * m + 1]);
        X[4 * m + 2] = fmaf(a, x.z, X[4 * m + 2]);
        X[4 * m + 3] = fmaf(a, x.w, X[4 * m + 3]);
    }
}

__device__ __forceinline__ void row_scale(float (&X)[16], const float *u, int q) {
#pragma unroll
    for (int m = 0; m < 4; ++m) {
        const float4 x = ld4(u + own_col(q, m));
        X[4 * m] *= x.x;
        X[4 * m + 1] *= x.y;
        X[4 * m + 2] *= x.z;
        X[4 * m + 3] *= x.w;
    }
}

__device__ __forceinline__ void row_store(const float (&X)[16], float *dst, int q) {
#pragma unroll
    for (int m = 0; m < 4; ++m)
        st4(dst + own_col(q, m), make_float4(X[4 * m], X[4 * m + 1], X[4 * m + 2], X[4 * m + 3]));
}

// Shared memory of the row kernels and the per-row input (v forward, dy backward) of the block.
struct RowSmem {
    float vec[4 * CHUNK * N];
    float cum[CHUNK * N];
    float xs[CHUNK * ROWS];
    float P15[N];
};

__device__ __forceinline__ uint4 load_rows_x(const bf16 *x_, int bb, int c, int h, int T, int H, int row0, int tid) {
    uint4 u = make_uint4(0, 0, 0, 0);
    if (tid < 2 * ROWS)
        u = *reinterpret_cast<const uint4 *>(x_ + row_offset(bb, c * CHUNK + tid / (ROWS / 8), h, T, H) + row0 +
                                             (tid % (ROWS / 8)) * 8);
    return u;
}

__device__ __forceinline__ void store_rows_x(const uint4 &u, float *xs, int tid) {
    if (tid >= 2 * ROWS) return;
    float f[8];
    unpack8(u, f);
#pragma unroll
    for (int e = 0; e < 8; ++e) xs[tid * 8 + e] = f[e];
}

// Row kernels, once per chunk: after a barrier, move the chunk held in registers (raw, xu) to
// shared memory, start loading chunk `next` (if 0 <= next < NC) into the registers, and prepare the
// scaled vectors. Returns after a barrier.
__device__ __forceinline__ void stage_chunk(RawChunk &raw, uint4 &xu, RowSmem &sm, const ChunkVecs &cv,
                                            const bf16 *r_, const bf16 *w_, const bf16 *k_, const bf16 *z_,
                                            const bf16 *b_, const bf16 *x_, int bb, int next, int h, int T, int H,
                                            int row0, int tid) {
    __syncthreads();
    raw.store(cv, nullptr, tid);
    store_rows_x(xu, sm.xs, tid);
    if (next >= 0 && next < T / CHUNK) {
        raw.load(r_, w_, k_, z_, b_, bb, next, h, T, H, tid);
        xu = load_rows_x(x_, bb, next, h, T, H, row0, tid);
    }
    __syncthreads();
    prep_chunk<NT_ROW>(cv);
}

__global__ void __launch_bounds__(NT_ROW) fwd_rows_kernel(int T, int H, const bf16 *__restrict__ r_,
                                                          const bf16 *__restrict__ w_, const bf16 *__restrict__ k_,
                                                          const bf16 *__restrict__ v_, const bf16 *__restrict__ z_,
                                                          const bf16 *__restrict__ b_, bf16 *__restrict__ y_,
                                                          float *__restrict__ sa_, float *__restrict__ states_) {
    const int row0 = blockIdx.x * ROWS, h = blockIdx.y, bb = blockIdx.z, tid = threadIdx.x;
    const int q = tid % TPR, rl = tid / TPR, i = row0 + rl, NC = T / CHUNK;
    __shared__ __align__(16) RowSmem sm;
    const ChunkVecs cv{sm.vec, sm.cum, sm.P15};
    float *states = states_ + ((size_t)bb * H + h) * NC * N * N + (size_t)i * N;

    float S[16];
#pragma unroll
    for (int x = 0; x < 16; ++x) S[x] = 0.f;
    RawChunk raw;
    raw.load(r_, w_, k_, z_, b_, bb, 0, h, T, H, tid);
    uint4 xv = load_rows_x(v_, bb, 0, h, T, H, row0, tid);

    for (int c = 0; c < NC; ++c) {
        stage_chunk(raw, xv, sm, cv, r_, w_, k_, z_, b_, v_, bb, c + 1, h, T, H, row0, tid);
#pragma unroll
        for (int t = 0; t < CHUNK; ++t) {
            const float sa = row_dot(S, cv.zh() + t * N, q);
            row_axpy(S, sm.xs[t * ROWS + rl], cv.kt() + t * N, q);
            row_axpy(S, sa, cv.bt() + t * N, q);
            const float y = row_dot(S, cv.rh() + t * N, q);
            if (q == 0) {
                const size_t o = row_offset(bb, c * CHUNK + t, h, T, H) + i;
                y_[o] = to_bf(y);
                sa_[o] = sa;
            }
        }
        row_scale(S, sm.P15, q);  // S~ -> S at the chunk end
        row_store(S, states + (size_t)c * N * N, q);
    }
}

__global__ void __launch_bounds__(NT_ROW) bwd_rows_kernel(int T, int H, const bf16 *__restrict__ r_,
                                                          const bf16 *__restrict__ w_, const bf16 *__restrict__ k_,
                                                          const bf16 *__restrict__ z_, const bf16 *__restrict__ b_,
                                                          const bf16 *__restrict__ dy_, bf16 *__restrict__ dv_,
                                                          float *__restrict__ ds_, float *__restrict__ hstates_) {
    const int row0 = blockIdx.x * ROWS, h = blockIdx.y, bb = blockIdx.z, tid = threadIdx.x;
    const int q = tid % TPR, rl = tid / TPR, i = row0 + rl, NC = T / CHUNK;
    __shared__ __align__(16) RowSmem sm;
    const ChunkVecs cv{sm.vec, sm.cum, sm.P15};
    float *hstates = hstates_ + ((size_t)bb * H + h) * NC * N * N + (size_t)i * N;

    float G[16];  // dL/dS (from steps after the current chunk) at the chunk end; scaled G^ inside
#pragma unroll
    for (int x = 0; x < 16; ++x) G[x] = 0.f;
    RawChunk raw;
    raw.load(r_, w_, k_, z_, b_, bb, NC - 1, h, T, H, tid);
    uint4 xdy = load_rows_x(dy_, bb, NC - 1, h, T, H, row0, tid);

    for (int c = NC - 1; c >= 0; --c) {
        row_store(G, hstates + (size_t)c * N * N, q);
        stage_chunk(raw, xdy, sm, cv, r_, w_, k_, z_, b_, dy_, bb, c - 1, h, T, H, row0, tid);
        row_scale(G, sm.P15, q);
#pragma unroll
        for (int t = CHUNK - 1; t >= 0; --t) {
            row_axpy(G, sm.xs[t * ROWS + rl], cv.rh() + t * N, q);
            const float dv = row_dot(G, cv.kt() + t * N, q);
            const float ds = row_dot(G, cv.bt() + t * N, q);
            row_axpy(G, ds, cv.zh() + t * N, q);
            if (q == 0) {
                const size_t o = row_offset(bb, c * CHUNK + t, h, T, H) + i;
                dv_[o] = to_bf(dv);
                ds_[o] = ds;
            }
        }
    }
}

// acc[x][e] += sum_k a[x * lda + k] * b[k * N + e], x, e < 4: a 4x4 output tile, both operands in
// shared memory, K a multiple of 4.
template <int K>
__device__ __forceinline__ void tile_product(float (&acc)[4][4], const float *a, int lda, const float *b) {
#pragma unroll 4
    for (int kk = 0; kk < K; kk += 4) {
        float4 av[4];
#pragma unroll
        for (int x = 0; x < 4; ++x) av[x] = ld4(a + x * lda + kk);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const float4 bv = ld4(b + (kk + u) * N);
#pragma unroll
            for (int x = 0; x < 4; ++x) {
                const float s = u == 0 ? av[x].x : u == 1 ? av[x].y : u == 2 ? av[x].z : av[x].w;
                acc[x][0] = fmaf(s, bv.x, acc[x][0]);
                acc[x][1] = fmaf(s, bv.y, acc[x][1]);
                acc[x][2] = fmaf(s, bv.z, acc[x][2]);
                acc[x][3] = fmaf(s, bv.w, acc[x][3]);
            }
        }
    }
}

// Shared memory of the chunk kernel, in floats.
struct ChunkLayout {
    static constexpr int Sc = 0;                    // [N][N] state before the chunk
    static constexpr int Hs = Sc + N * N;           // [N][N] P_15 * (state gradient at the chunk end)
    static constexpr int vec = Hs + N * N;          // kt, bt, rh, zh
    static constexpr int cum = vec + 4 * CHUNK * N;
    static constexpr int lw = cum + CHUNK * N;      // log d_t = -exp(w_t)
    static constexpr int A = lw + CHUNK * N;        // [64][LDA]: rows dy, ds, v, s; later the outputs
    static constexpr int Ai = A + 64 * LDA;         // [64][LDI] intra-chunk coefficients
    static constexpr int M = Ai + 64 * LDI;         // [32][LDM] Gram matrix [dy; ds] [v; s]^T
    static constexpr int part = Ai;                 // [16][N] partial column sums (steps 1-2 only)
    static constexpr int P15 = (M + 2 * CHUNK * LDM + 3) / 4 * 4;
    static constexpr int bnd = P15 + N;
    static constexpr int total = bnd + N;
    static_assert(16 * N <= 64 * LDI + 2 * CHUNK * LDM, "partial sums fit in Ai and M");
    static_assert(total * sizeof(float) <= 227 * 1024, "shared memory of one block");
};

__global__ void __launch_bounds__(NT_CH) bwd_chunk_kernel(
    int T, int H, const bf16 *__restrict__ r_, const bf16 *__restrict__ w_, const bf16 *__restrict__ k_,
    const bf16 *__restrict__ v_, const bf16 *__restrict__ z_, const bf16 *__restrict__ b_,
    const bf16 *__restrict__ dy_, const float *__restrict__ sa_, const float *__restrict__ ds_,
    const float *__restrict__ states_, const float *__restrict__ hstates_, bf16 *__restrict__ dr_,
    bf16 *__restrict__ dw_, bf16 *__restrict__ dk_, bf16 *__restrict__ dz_, bf16 *__restrict__ db_) {
    typedef ChunkLayout L;
    const int c = blockIdx.x, h = blockIdx.y, bb = blockIdx.z, tid = threadIdx.x, NC = T / CHUNK;
    extern __shared__ float4 smem4[];
    float *sm = reinterpret_cast<float *>(smem4);
    const ChunkVecs cv{sm + L::vec, sm + L::cum, sm + L::P15};
    float *A = sm + L::A;
    const size_t bh = (size_t)bb * H + h;

    // 1. Load. Rows of A: 0..15 dy, 16..31 ds, 32..47 v, 48..63 s.
    {
        RawChunk raw;
        raw.load(r_, w_, k_, z_, b_, bb, c, h, T, H, tid);
        raw.store(cv, sm + L::lw, tid);
        if (tid < 2 * N) {
            const int t = tid / (N / 8), j = (tid % (N / 8)) * 8;
            const size_t o = row_offset(bb, c * CHUNK + t, h, T, H) + j;
            float f[8];
            unpack8(*reinterpret_cast<const uint4 *>(dy_ + o), f);
#pragma unroll
            for (int e = 0; e < 8; ++e) A[t * LDA + j + e] = f[e];
            unpack8(*reinterpret_cast<const uint4 *>(v_ + o), f);
#pragma unroll
            for (int e = 0; e < 8; ++e) A[(2 * CHUNK + t) * LDA + j + e] = f[e];
        }
        for (int e = tid; e < CHUNK * N / 4; e += NT_CH) {
            const int t = e / (N / 4), j = (e % (N / 4)) * 4;
            const size_t o = row_offset(bb, c * CHUNK + t, h, T, H) + j;
            st4(A + (CHUNK + t) * LDA + j, ld4(ds_ + o));
            st4(A + (3 * CHUNK + t) * LDA + j, ld4(sa_ + o));
        }
        const float *Sprev = states_ + (bh * NC + (c > 0 ? c - 1 : 0)) * N * N;
        const float *Send = states_ + (bh * NC + c) * N * N;
        const float *He = hstates_ + (bh * NC + c) * N * N;
        const int cg = tid % (N / 4), rg = tid / (N / 4);  // rg = 0..15
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int m = 0; m < N / 16; ++m) {
            const int idx = (rg + 16 * m) * N + 4 * cg;
            st4(sm + L::Sc + idx, c > 0 ? ld4(Sprev + idx) : make_float4(0.f, 0.f, 0.f, 0.f));
            const float4 g = ld4(He + idx);
            st4(sm + L::Hs + idx, g);
            if (c + 1 < NC) {
                const float4 s = ld4(Send + idx);
                acc.x = fmaf(s.x, g.x, acc.x);
                acc.y = fmaf(s.y, g.y, acc.y);
                acc.z = fmaf(s.z, g.z, acc.z);
                acc.w = fmaf(s.w, g.w, acc.w);
            }
        }
        st4(sm + L::part + rg * N + 4 * cg, acc);
    }
    __syncthreads();

    // 2. Scaled chunk vectors, H^ = P_15 * He, boundary term sum_i S_end[i,j] He[i,j].
    prep_chunk<NT_CH>(cv);
    for (int e = tid; e < N * N; e += NT_CH) sm[L::Hs + e] *= cv.P15[e % N];
    if (tid < N) {
        float s = 0.f;
#pragma unroll
        for (int g = 0; g < 16; ++g) s += sm[L::part + g * N + tid];
        sm[L::bnd + tid] = s;
    }

    // 3. Gram matrix M[a][b] = A[a] . A[32 + b], a, b < 32.
    float *M = sm + L::M;
    for (int e = tid; e < 4 * CHUNK * CHUNK; e += NT_CH) {
        const int a = e / (2 * CHUNK), bcol = e % (2 * CHUNK);
        const float *pa = A + a * LDA, *pb = A + (2 * CHUNK + bcol) * LDA;
        float s0 = 0.f, s1 = 0.f;
#pragma unroll
        for (int j = 0; j < N; j += 4) {
            const float4 x = ld4(pa + j), y = ld4(pb + j);
            s0 = fmaf(x.x, y.x, s0);
            s1 = fmaf(x.y, y.y, s1);
            s0 = fmaf(x.z, y.z, s0);
            s1 = fmaf(x.w, y.w, s1);
        }
        M[a * LDM + bcol] = s0 + s1;
    }
    __syncthreads();

    // 4. Intra-chunk coefficients. Output rows: 0..15 X_R (dr), 16..31 X_Z (dz), 32..47 X_K (dk),
    //    48..63 X_B (db); columns index the right operand rows [kt; bt] (X_R, X_Z) or [rh; zh] (X_K, X_B).
    float *Ai = sm + L::Ai;
    for (int e = tid; e < 4 * CHUNK * 2 * CHUNK; e += NT_CH) {
        const int row = e / (2 * CHUNK), col = e % (2 * CHUNK);
        const int typ = row / CHUNK, t = row % CHUNK, half = col / CHUNK, u = col % CHUNK;
        float val;
        if (typ == 0) val = u <= t ? M[t * LDM + half * CHUNK + u] : 0.f;                  // dy_t.v_u, dy_t.s_u
        else if (typ == 1) val = u < t ? M[(CHUNK + t) * LDM + half * CHUNK + u] : 0.f;    // ds_t.v_u, ds_t.s_u
        else {
            const int bc = (typ - 2) * CHUNK + t;                                          // v_t or s_t
            val = half == 0 ? (u >= t ? M[u * LDM + bc] : 0.f)                              // dy_u . (v|s)_t
                            : (u > t ? M[(CHUNK + u) * LDM + bc] : 0.f);                    // ds_u . (v|s)_t
        }
        Ai[row * LDI + col] = val;
    }
    __syncthreads();

    // 5. X = A * (Sc | H^) + Ai * ([kt; bt] | [rh; zh]); thread: rows 4rg..4rg+3, columns 4cg..4cg+3.
    const int cg = tid % (N / 4), rg = tid / (N / 4);
    const float *Bst = sm + (rg < 8 ? L::Sc : L::Hs);
    const float *Bin = cv.vec + (rg < 8 ? 0 : 2 * CHUNK * N);
    float acc[4][4];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[a][e] = 0.f;
    tile_product<N>(acc, A + 4 * rg * LDA, LDA, Bst + 4 * cg);
    tile_product<2 * CHUNK>(acc, sm + L::Ai + 4 * rg * LDI, LDI, Bin + 4 * cg);

    // 6. dr = P_t X_R, dz = P_{t-1} X_Z, dk = X_K / P_t, db = X_B / P_t.
#pragma unroll
    for (int x = 0; x < 4; ++x) {
        const int row = 4 * rg + x, typ = row / CHUNK, t = row % CHUNK, j = 4 * cg;
        bf16 *out = typ == 0 ? dr_ : typ == 1 ? dz_ : typ == 2 ? dk_ : db_;
        __align__(8) bf16 o4[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float sc;
            if (typ == 0) sc = __expf(cv.cum[t * N + j + e]);
            else if (typ == 1) sc = t ? __expf(cv.cum[(t - 1) * N + j + e]) : 1.f;
            else sc = __expf(-cv.cum[t * N + j + e]);
            o4[e] = to_bf(acc[x][e] * sc);
        }
        *reinterpret_cast<uint2 *>(out + row_offset(bb, c * CHUNK + t, h, T, H) + j) = *reinterpret_cast<uint2 *>(o4);
    }
    __syncthreads();  // everyone is done reading A
#pragma unroll
    for (int x = 0; x < 4; ++x) st4(A + (4 * rg + x) * LDA + 4 * cg, make_float4(acc[x][0], acc[x][1], acc[x][2], acc[x][3]));
    __syncthreads();

    // 7. dw_t = log d_t * sum_{t' >= t} dA_t'.
    if (tid < N) {
        const int j = tid;
        float s = sm[L::bnd + j];
        for (int t = CHUNK - 1; t >= 0; --t) {
            s = fmaf(cv.rh()[t * N + j], A[t * LDA + j], s);
            s = fmaf(-cv.kt()[t * N + j], A[(2 * CHUNK + t) * LDA + j], s);
            s = fmaf(-cv.bt()[t * N + j], A[(3 * CHUNK + t) * LDA + j], s);
            if (t + 1 < CHUNK) s = fmaf(cv.zh()[(t + 1) * N + j], A[(CHUNK + t + 1) * LDA + j], s);
            dw_[row_offset(bb, c * CHUNK + t, h, T, H) + j] = to_bf(sm[L::lw + t * N + j] * s);
        }
    }
}

}  // namespace
}  // namespace wkv7

using namespace wkv7;

extern "C" int wkv7_chunked_forward(int B, int T, int H, const void *r, const void *w, const void *k, const void *v,
                                    const void *z, const void *b, void *y, float *sa, float *states, void *stream) {
    if (T % CHUNK) return (int)cudaErrorInvalidValue;
    fwd_rows_kernel<<<dim3(N / ROWS, H, B), NT_ROW, 0, (cudaStream_t)stream>>>(
        T, H, (const bf16 *)r, (const bf16 *)w, (const bf16 *)k, (const bf16 *)v, (const bf16 *)z,
        (const bf16 *)b, (bf16 *)y, sa, states);
    return (int)cudaGetLastError();
}

extern "C" int wkv7_chunked_backward(int B, int T, int H, const void *r, const void *w, const void *k, const void *v,
                                     const void *z, const void *b, const void *dy, const float *sa,
                                     const float *states, float *ds, float *hstates, void *dr, void *dw, void *dk,
                                     void *dv, void *dz, void *db, void *stream) {
    if (T % CHUNK) return (int)cudaErrorInvalidValue;
    cudaStream_t st = (cudaStream_t)stream;
    bwd_rows_kernel<<<dim3(N / ROWS, H, B), NT_ROW, 0, st>>>(T, H, (const bf16 *)r, (const bf16 *)w, (const bf16 *)k,
                                                              (const bf16 *)z, (const bf16 *)b, (const bf16 *)dy,
                                                              (bf16 *)dv, ds, hstates);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return (int)err;
    const int smem = ChunkLayout::total * (int)sizeof(float);
    err = cudaFuncSetAttribute(bwd_chunk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return (int)err;
    bwd_chunk_kernel<<<dim3(T / CHUNK, H, B), NT_CH, smem, st>>>(
        T, H, (const bf16 *)r, (const bf16 *)w, (const bf16 *)k, (const bf16 *)v, (const bf16 *)z, (const bf16 *)b,
        (const bf16 *)dy, sa, ds, states, hstates, (bf16 *)dr, (bf16 *)dw, (bf16 *)dk, (bf16 *)dz, (bf16 *)db);
    return (int)cudaGetLastError();
}
