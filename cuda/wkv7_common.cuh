// Shared definitions for the WKV7 kernels (docs/RECIPE.md section 2). Pure CUDA: no torch headers.
// Tensors are bf16 [B,T,H,N] contiguous; the state is fp32. N (head size) is the compile-time
// constant _N_ and T is a multiple of CHUNK (the caller pads at the end).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "wkv7_launch.h"

#ifndef _N_
#define _N_ 64
#endif

namespace wkv7 {

constexpr int N = _N_;
constexpr int CHUNK = 16;
typedef __nv_bfloat16 bf16;

// Offset of element (b, t, h, 0) in a [B,T,H,N] tensor.
__device__ __forceinline__ size_t row_offset(int b, int t, int h, int T, int H) {
    return ((size_t)b * T + t) * (size_t)H * N + (size_t)h * N;
}

__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16 to_bf(float x) { return __float2bfloat16_rn(x); }

// 8 bf16 packed in a uint4 -> 8 floats.
__device__ __forceinline__ void unpack8(const uint4 &u, float *f) {
    const __nv_bfloat162 *p = reinterpret_cast<const __nv_bfloat162 *>(&u);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        float2 x = __bfloat1622float2(p[e]);
        f[2 * e] = x.x;
        f[2 * e + 1] = x.y;
    }
}

}  // namespace wkv7
