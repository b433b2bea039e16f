// WKV7 sequential kernels: the reference recipe's design, kept as the baseline and as a fallback.
// One block of N threads per (batch, head); thread i holds state row i in registers and walks
// t = 0..T-1; the step's vectors are staged in shared memory. The forward stores the state every
// CHUNK steps and the s_t = S_{t-1} z_t values; the backward walks t = T-1..0, restarts from the
// stored state every CHUNK steps and rebuilds earlier states in between by dividing by the decay.
#include "wkv7_common.cuh"

namespace wkv7 {
namespace {

__global__ void __launch_bounds__(N) seq_forward_kernel(int T, int H, const bf16 *__restrict__ r_,
                                                        const bf16 *__restrict__ w_, const bf16 *__restrict__ k_,
                                                        const bf16 *__restrict__ v_, const bf16 *__restrict__ z_,
                                                        const bf16 *__restrict__ b_, bf16 *__restrict__ y_,
                                                        float *__restrict__ sa_, float *__restrict__ states_) {
    const int h = blockIdx.x, bb = blockIdx.y, i = threadIdx.x;
    __shared__ float r[N], d[N], k[N], z[N], b[N];
    float S[N];
#pragma unroll
    for (int j = 0; j < N; ++j) S[j] = 0.f;
    float *states = states_ + ((size_t)bb * H + h) * (T / CHUNK) * N * N;

    for (int t = 0; t < T; ++t) {
        const size_t o = row_offset(bb, t, h, T, H) + i;
        __syncthreads();
        r[i] = to_f(r_[o]);
        d[i] = __expf(-__expf(to_f(w_[o])));
        k[i] = to_f(k_[o]);
        z[i] = to_f(z_[o]);
        b[i] = to_f(b_[o]);
        const float vi = to_f(v_[o]);
        __syncthreads();
        float sa = 0.f;
#pragma unroll
        for (int j = 0; j < N; ++j) sa += S[j] * z[j];
        float y = 0.f;
#pragma unroll
        for (int j = 0; j < N; ++j) {
            S[j] = S[j] * d[j] + sa * b[j] + vi * k[j];
            y += S[j] * r[j];
        }
        y_[o] = to_bf(y);
        sa_[o] = sa;
        if ((t + 1) % CHUNK == 0) {
            float *dst = states + (size_t)(t / CHUNK) * N * N + (size_t)i * N;
#pragma unroll
            for (int j = 0; j < N; j += 4) *reinterpret_cast<float4 *>(dst + j) = make_float4(S[j], S[j + 1], S[j + 2], S[j + 3]);
        }
    }
}

// Thread i holds column i of S (S[j][i], j = 0..N-1), row i of the state gradient G and column i of G.
__global__ void __launch_bounds__(N) seq_backward_kernel(
    int T, int H, const bf16 *__restrict__ r_, const bf16 *__restrict__ w_, const bf16 *__restrict__ k_,
    const bf16 *__restrict__ v_, const bf16 *__restrict__ z_, const bf16 *__restrict__ b_,
    const bf16 *__restrict__ dy_, const float *__restrict__ sa_, const float *__restrict__ states_,
    bf16 *__restrict__ dr_, bf16 *__restrict__ dw_, bf16 *__restrict__ dk_, bf16 *__restrict__ dv_,
    bf16 *__restrict__ dz_, bf16 *__restrict__ db_) {
    const int h = blockIdx.x, bb = blockIdx.y, i = threadIdx.x;
    __shared__ float r[N], d[N], k[N], v[N], z[N], b[N], dy[N], sa[N], ds[N];
    float Scol[N], Grow[N], Gcol[N];
#pragma unroll
    for (int j = 0; j < N; ++j) Scol[j] = Grow[j] = Gcol[j] = 0.f;
    const float *states = states_ + ((size_t)bb * H + h) * (T / CHUNK) * N * N;

    for (int t = T - 1; t >= 0; --t) {
        const size_t o = row_offset(bb, t, h, T, H) + i;
        __syncthreads();
        const float ri = to_f(r_[o]), ew = __expf(to_f(w_[o])), di = __expf(-ew), ki = to_f(k_[o]);
        const float zi = to_f(z_[o]), bi = to_f(b_[o]), dyi = to_f(dy_[o]);
        r[i] = ri; d[i] = di; k[i] = ki; z[i] = zi; b[i] = bi; dy[i] = dyi;
        v[i] = to_f(v_[o]);
        sa[i] = sa_[o];
        if ((t + 1) % CHUNK == 0) {
            const float *src = states + (size_t)(t / CHUNK) * N * N + i;
#pragma unroll
            for (int j = 0; j < N; ++j) Scol[j] = src[(size_t)j * N];
        }
        __syncthreads();

        float dr = 0.f;  // (S_t^T dy_t)_i
#pragma unroll
        for (int j = 0; j < N; ++j) dr += Scol[j] * dy[j];
        const float inv_d = 1.f / di;
        float dd = 0.f, dk = 0.f, db = 0.f, dv = 0.f, dsi = 0.f;
#pragma unroll
        for (int j = 0; j < N; ++j) {
            Scol[j] = (Scol[j] - v[j] * ki - sa[j] * bi) * inv_d;  // S_{t-1}[j][i]
            Grow[j] += dyi * r[j];                                 // G_t[i][j]
            Gcol[j] += dy[j] * ri;                                 // G_t[j][i]
            dd += Gcol[j] * Scol[j];
            dk += Gcol[j] * v[j];
            db += Gcol[j] * sa[j];
            dv += Grow[j] * k[j];
            dsi += Grow[j] * b[j];
        }
        ds[i] = dsi;
        __syncthreads();
        float dz = 0.f;  // (S_{t-1}^T ds_t)_i
#pragma unroll
        for (int j = 0; j < N; ++j) {
            dz += Scol[j] * ds[j];
            Grow[j] = Grow[j] * d[j] + dsi * z[j];
            Gcol[j] = Gcol[j] * di + ds[j] * zi;
        }
        dr_[o] = to_bf(dr);
        dw_[o] = to_bf(-dd * di * ew);
        dk_[o] = to_bf(dk);
        dv_[o] = to_bf(dv);
        dz_[o] = to_bf(dz);
        db_[o] = to_bf(db);
    }
}

}  // namespace
}  // namespace wkv7

using namespace wkv7;

extern "C" int wkv7_seq_forward(int B, int T, int H, const void *r, const void *w, const void *k, const void *v,
                                const void *z, const void *b, void *y, float *sa, float *states, void *stream) {
    if (T % CHUNK) return (int)cudaErrorInvalidValue;
    seq_forward_kernel<<<dim3(H, B), N, 0, (cudaStream_t)stream>>>(
        T, H, (const bf16 *)r, (const bf16 *)w, (const bf16 *)k, (const bf16 *)v, (const bf16 *)z,
        (const bf16 *)b, (bf16 *)y, sa, states);
    return (int)cudaGetLastError();
}

extern "C" int wkv7_seq_backward(int B, int T, int H, const void *r, const void *w, const void *k, const void *v,
                                 const void *z, const void *b, const void *dy, const float *sa, const float *states,
                                 void *dr, void *dw, void *dk, void *dv, void *dz, void *db, void *stream) {
    if (T % CHUNK) return (int)cudaErrorInvalidValue;
    seq_backward_kernel<<<dim3(H, B), N, 0, (cudaStream_t)stream>>>(
        T, H, (const bf16 *)r, (const bf16 *)w, (const bf16 *)k, (const bf16 *)v, (const bf16 *)z,
        (const bf16 *)b, (const bf16 *)dy, sa, states, (bf16 *)dr, (bf16 *)dw, (bf16 *)dk, (bf16 *)dv,
        (bf16 *)dz, (bf16 *)db);
    return (int)cudaGetLastError();
}

extern "C" const char *wkv7_error_string(int err) { return cudaGetErrorString((cudaError_t)err); }
