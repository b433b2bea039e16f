// Host launchers of the WKV7 kernels, shared by the .cu files and the torch binding (plain C++,
// no CUDA headers needed to include it).
#pragma once
// Host launchers (defined in the .cu files). Pointers to bf16 data are passed as void* and the
// stream as void* so that the torch binding needs no CUDA headers of its own. Each returns a
// cudaError_t as int (0 = success).
extern "C" {
int wkv7_seq_forward(int B, int T, int H, const void *r, const void *w, const void *k, const void *v,
                     const void *z, const void *b, void *y, float *sa, float *states, void *stream);
int wkv7_seq_backward(int B, int T, int H, const void *r, const void *w, const void *k, const void *v,
                      const void *z, const void *b, const void *dy, const float *sa, const float *states,
                      void *dr, void *dw, void *dk, void *dv, void *dz, void *db, void *stream);
int wkv7_chunked_forward(int B, int T, int H, const void *r, const void *w, const void *k, const void *v,
                         const void *z, const void *b, void *y, float *sa, float *states, void *stream);
int wkv7_chunked_backward(int B, int T, int H, const void *r, const void *w, const void *k, const void *v,
                          const void *z, const void *b, const void *dy, const float *sa, const float *states,
                          float *ds, float *hstates, void *dr, void *dw, void *dk, void *dv, void *dz, void *db,
                          void *stream);
const char *wkv7_error_string(int err);
}
