// Torch binding of the WKV7 kernels (wkv7_sequential.cu, wkv7_chunked.cu). Checks the tensors,
// allocates the outputs and the saved buffers, and launches on the stream the caller passes
// (torch.cuda.current_stream().cuda_stream), so that no CUDA header is needed here.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "wkv7_launch.h"

#ifndef _N_
#define _N_ 64
#endif
#ifndef WKV7_NS
#define WKV7_NS wkv7  // the op namespace: torch.ops.<WKV7_NS>; one per build (head size, flags)
#endif

namespace {

constexpr int kN = _N_;
constexpr int kChunk = 16;

void check_input(const at::Tensor &x, const at::Tensor &like, const char *name) {
    TORCH_CHECK(x.is_cuda(), "wkv7: ", name, " must be a CUDA tensor");
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "wkv7: ", name, " must be bfloat16");
    TORCH_CHECK(x.is_contiguous(), "wkv7: ", name, " must be contiguous");
    TORCH_CHECK(x.sizes() == like.sizes(), "wkv7: ", name, " has shape ", x.sizes(), ", expected ", like.sizes());
    TORCH_CHECK(x.device() == like.device(), "wkv7: ", name, " is on another device");
}

void check_shape(const at::Tensor &r) {
    TORCH_CHECK(r.dim() == 4, "wkv7: inputs must be [B,T,H,N]");
    TORCH_CHECK(r.size(3) == kN, "wkv7: head size ", r.size(3), " but the kernel was built for ", kN);
    TORCH_CHECK(r.size(1) % kChunk == 0, "wkv7: T = ", r.size(1), " must be a multiple of ", kChunk);
}

// The launch status as a 1-element int64 CPU tensor (0 = success): the caller raises on it, so that
// no C++ exception has to cross into Python for a failed launch.
at::Tensor status(int err) {
    at::Tensor t = at::empty({1}, at::TensorOptions().dtype(at::kLong));
    t.data_ptr<int64_t>()[0] = err;
    return t;
}

// Returns {y, sa, states, status}: y bf16 [B,T,H,N]; sa = S_{t-1} z_t fp32 [B,T,H,N]; states = S at the end of
// each chunk, fp32 [B,H,T/16,N,N].
std::vector<at::Tensor> forward(bool chunked, at::Tensor r, at::Tensor w, at::Tensor k, at::Tensor v,
                                at::Tensor z, at::Tensor b, int64_t stream_ptr) {
    check_shape(r);
    const char *names[] = {"r", "w", "k", "v", "z", "b"};
    const at::Tensor *xs[] = {&r, &w, &k, &v, &z, &b};
    for (int n = 0; n < 6; ++n) check_input(*xs[n], r, names[n]);
    const c10::DeviceGuard guard(r.device());
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    auto f32 = r.options().dtype(at::kFloat);
    at::Tensor y = at::empty_like(r);
    at::Tensor sa = at::empty(r.sizes(), f32);
    at::Tensor states = at::empty({B, H, T / kChunk, kN, kN}, f32);
    if (r.numel() == 0) return {y, sa, states, status(0)};
    void *stream = reinterpret_cast<void *>(stream_ptr);
    auto fn = chunked ? wkv7_chunked_forward : wkv7_seq_forward;
    const int err = fn(B, T, H, r.data_ptr(), w.data_ptr(), k.data_ptr(), v.data_ptr(), z.data_ptr(), b.data_ptr(),
                       y.data_ptr(), sa.data_ptr<float>(), states.data_ptr<float>(), stream);
    return {y, sa, states, status(err)};
}

// Returns {dr, dw, dk, dv, dz, db, status} (bf16 gradients) from the forward's inputs, saved buffers and dy.
std::vector<at::Tensor> backward(bool chunked, at::Tensor r, at::Tensor w, at::Tensor k, at::Tensor v, at::Tensor z,
                                 at::Tensor b, at::Tensor dy, at::Tensor sa, at::Tensor states,
                                 int64_t stream_ptr) {
    check_shape(r);
    const char *names[] = {"r", "w", "k", "v", "z", "b", "dy"};
    const at::Tensor *xs[] = {&r, &w, &k, &v, &z, &b, &dy};
    for (int n = 0; n < 7; ++n) check_input(*xs[n], r, names[n]);
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    TORCH_CHECK(sa.scalar_type() == at::kFloat && sa.is_contiguous() && sa.sizes() == r.sizes(), "wkv7: bad sa");
    TORCH_CHECK(states.scalar_type() == at::kFloat && states.is_contiguous() &&
                    states.sizes() == at::IntArrayRef({B, H, T / kChunk, kN, kN}),
                "wkv7: bad states");
    const c10::DeviceGuard guard(r.device());
    std::vector<at::Tensor> g;
    for (int n = 0; n < 6; ++n) g.push_back(at::empty_like(r));
    if (r.numel() == 0) {
        g.push_back(status(0));
        return g;
    }
    void *stream = reinterpret_cast<void *>(stream_ptr);
    int err;
    if (chunked) {
        at::Tensor ds = at::empty_like(sa);
        at::Tensor hstates = at::empty_like(states);
        err = wkv7_chunked_backward(B, T, H, r.data_ptr(), w.data_ptr(), k.data_ptr(), v.data_ptr(), z.data_ptr(),
                                    b.data_ptr(), dy.data_ptr(), sa.data_ptr<float>(), states.data_ptr<float>(),
                                    ds.data_ptr<float>(), hstates.data_ptr<float>(), g[0].data_ptr(),
                                    g[1].data_ptr(), g[2].data_ptr(), g[3].data_ptr(), g[4].data_ptr(),
                                    g[5].data_ptr(), stream);
    } else {
        err = wkv7_seq_backward(B, T, H, r.data_ptr(), w.data_ptr(), k.data_ptr(), v.data_ptr(), z.data_ptr(),
                                b.data_ptr(), dy.data_ptr(), sa.data_ptr<float>(), states.data_ptr<float>(),
                                g[0].data_ptr(), g[1].data_ptr(), g[2].data_ptr(), g[3].data_ptr(), g[4].data_ptr(),
                                g[5].data_ptr(), stream);
    }
    g.push_back(status(err));
    return g;
}

}  // namespace

TORCH_LIBRARY(WKV7_NS, m) {
    // forward(chunked, r, w, k, v, z, b, stream) -> [y, sa, states, status]
    m.def("forward(bool chunked, Tensor r, Tensor w, Tensor k, Tensor v, Tensor z, Tensor b, int stream) -> Tensor[]",
          &forward);
    // backward(chunked, r, w, k, v, z, b, dy, sa, states, stream) -> [dr, dw, dk, dv, dz, db, status]
    m.def("backward(bool chunked, Tensor r, Tensor w, Tensor k, Tensor v, Tensor z, Tensor b, Tensor dy, "
          "Tensor sa, Tensor states, int stream) -> Tensor[]",
          &backward);
    m.def("error_string(int err) -> str", [](int64_t err) { return std::string(wkv7_error_string((int)err)); });
}
