// candle-ot Metal kernels: kernel sums (MMD / energy-distance family), f32 only.
// Faithful twin of kernels/cuda/kernel_sums.cu; entry-point names are the CUDA *_f32 names.
//
//   kernel_product_{kernel}_f32(x, y, b, out, B, N, M, D, sigma)
//       out[b,i] = sum_j k(x_i, y_j) b_j                                          out (B,N)
//   kernel_grad_x_{kernel}_f32(x, y, b, g, out, B, N, M, D, sigma)
//       out[b,i,:] = g_i sum_j b_j grad_x k(x_i, y_j)                             out (B,N,D)
//   kernel_grad_y_{kernel}_f32(x, y, b, g, out, B, N, M, D, sigma)
//       out[b,j,0..D] = b_j sum_i g_i grad_y k(x_i, y_j),
//       out[b,j,D]    = sum_i g_i k(x_i, y_j)                                     out (B,M,D+1)
// kernel = gaussian (exp(-|x-y|^2/(2 sigma^2))) | laplacian (exp(-|x-y|/sigma)) |
//          energy (-|x-y|, sigma unused); the gradient of |x-y| at x = y is 0.
//
// Buffer indices: the arguments in the order listed, from [[buffer(0)]]; e.g. kernel_product:
// x 0, y 1, b 2, out 3, B 4, N 5, M 6, D 7, sigma 8; kernel_grad_x / kernel_grad_y: x 0, y 1,
// b 2, g 3, out 4, B 5, N 6, M 7, D 8, sigma 9.
// Dispatch (see common.metal): threadsPerThreadgroup (LANES, ROWS, 1), LANES*ROWS <= 256;
// threadgroups (ceil(N/ROWS), B, 1), or (ceil(M/ROWS), B, 1) for kernel_grad_y.
#ifndef CANDLE_OT_COMMON_METAL
#include "common.metal"
#endif

#define OT_KPROD_ENTRY(NAME, KER)                                                            \
  kernel void NAME(device const float* x [[buffer(0)]], device const float* y [[buffer(1)]], \
                   device const float* b [[buffer(2)]], device float* out [[buffer(3)]],     \
                   constant uint& B [[buffer(4)]], constant uint& N [[buffer(5)]],           \
                   constant uint& M [[buffer(6)]], constant uint& D [[buffer(7)]],           \
                   constant float& sigma [[buffer(8)]], OT_TG_PARAMS) {                      \
    (void)B;                                                                                 \
    threadgroup OtShared<OT_OP_KPROD> sh;                                                    \
    const OtArgs a = {x, y, 0, 0, b, 0, 0, out, N, M, D, 0u, sigma};                         \
    ot_dispatch<OT_OP_KPROD, KER>(a, &sh, ltid, tgid, tptg);                                 \
  }

#define OT_KGRAD_X_ENTRY(NAME, KER)                                                          \
  kernel void NAME(device const float* x [[buffer(0)]], device const float* y [[buffer(1)]], \
                   device const float* b [[buffer(2)]], device const float* g [[buffer(3)]], \
                   device float* out [[buffer(4)]], constant uint& B [[buffer(5)]],          \
                   constant uint& N [[buffer(6)]], constant uint& M [[buffer(7)]],           \
                   constant uint& D [[buffer(8)]], constant float& sigma [[buffer(9)]],      \
                   OT_TG_PARAMS) {                                                           \
    (void)B;                                                                                 \
    threadgroup OtShared<OT_OP_KGRAD_X> sh;                                                  \
    const OtArgs a = {x, y, 0, g, b, 0, 0, out, N, M, D, 0u, sigma};                         \
    ot_dispatch<OT_OP_KGRAD_X, KER>(a, &sh, ltid, tgid, tptg);                               \
  }

// Rows are the y_j (row scalar: b_j), the reduced set is x_i (scalar g_i).
#define OT_KGRAD_Y_ENTRY(NAME, KER)                                                          \
  kernel void NAME(device const float* x [[buffer(0)]], device const float* y [[buffer(1)]], \
                   device const float* b [[buffer(2)]], device const float* g [[buffer(3)]], \
                   device float* out [[buffer(4)]], constant uint& B [[buffer(5)]],          \
                   constant uint& N [[buffer(6)]], constant uint& M [[buffer(7)]],           \
                   constant uint& D [[buffer(8)]], constant float& sigma [[buffer(9)]],      \
                   OT_TG_PARAMS) {                                                           \
    (void)B;                                                                                 \
    threadgroup OtShared<OT_OP_KGRAD_Y> sh;                                                  \
    const OtArgs a = {y, x, 0, b, g, 0, 0, out, M, N, D, 0u, sigma};                         \
    ot_dispatch<OT_OP_KGRAD_Y, KER>(a, &sh, ltid, tgid, tptg);                               \
  }

OT_KPROD_ENTRY(kernel_product_gaussian_f32, OT_KER_GAUSS)
OT_KPROD_ENTRY(kernel_product_laplacian_f32, OT_KER_LAP)
OT_KPROD_ENTRY(kernel_product_energy_f32, OT_KER_ENERGY)

OT_KGRAD_X_ENTRY(kernel_grad_x_gaussian_f32, OT_KER_GAUSS)
OT_KGRAD_X_ENTRY(kernel_grad_x_laplacian_f32, OT_KER_LAP)
OT_KGRAD_X_ENTRY(kernel_grad_x_energy_f32, OT_KER_ENERGY)

OT_KGRAD_Y_ENTRY(kernel_grad_y_gaussian_f32, OT_KER_GAUSS)
OT_KGRAD_Y_ENTRY(kernel_grad_y_laplacian_f32, OT_KER_LAP)
OT_KGRAD_Y_ENTRY(kernel_grad_y_energy_f32, OT_KER_ENERGY)
