// candle-ot Metal kernels: kernel sums (MMD / energy-distance family), f32 only.
// Faithful twin of kernels/cuda/kernel_sums.cu; entry-point names are the CUDA *_f32 names.
//
//   kernel_product_{kernel}_f32(x, y, b, out, B, N, M, D, sigma)
//       out[b,i] = sum_j k(x_i, y_j) b_j              x (B,N,D), y (B,M,D), b (B,M), out (B,N)
//   kernel_sums_grad_{kernel}_f32(rows, cols, out, B, N, M, D, sigma)
//       rows (B,N,D) = p_i, cols (B,M,D+1) = [q_j, w_j]:
//       out[b,i,0..D] = sum_j w_j grad_p k(p_i, q_j),  out[b,i,D] = sum_j w_j k(p_i, q_j)
//                                                                                out (B,N,D+1)
// kernel = gaussian (exp(-|p-q|^2/(2 sigma^2))) | laplacian (exp(-|p-q|/sigma)) |
//          energy (-|p-q|, sigma unused); grad_p k is taken as 0 at p = q for the last two.
// The kernel product's backward runs kernel_sums_grad twice: rows x against [y_j, b_j] (x-side),
// rows y against [x_i, grad_u_i] (y-side).
//
// Buffer indices: the arguments in the order listed, from [[buffer(0)]]; kernel_product:
// x 0, y 1, b 2, out 3, B 4, N 5, M 6, D 7, sigma 8; kernel_sums_grad: rows 0, cols 1, out 2,
// B 3, N 4, M 5, D 6, sigma 7.
// Dispatch (see common.metal): threadsPerThreadgroup (LANES, ROWS, 1), LANES*ROWS <= 256;
// threadgroups (ceil(N/ROWS), B, 1). Static threadgroup memory only.
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
    const OtArgs a = {x, 0, y, b, 0, out, N, M, D, 0u, D, D, 1u, sigma, 0, 0};               \
    ot_dispatch<OT_OP_KPROD, KER>(a, &sh, ltid, tgid, tptg);                                 \
  }

#define OT_KSUMS_GRAD_ENTRY(NAME, KER)                                                             \
  kernel void NAME(device const float* rows [[buffer(0)]], device const float* cols [[buffer(1)]], \
                   device float* out [[buffer(2)]], constant uint& B [[buffer(3)]],                \
                   constant uint& N [[buffer(4)]], constant uint& M [[buffer(5)]],                 \
                   constant uint& D [[buffer(6)]], constant float& sigma [[buffer(7)]],            \
                   OT_TG_PARAMS) {                                                                 \
    (void)B;                                                                                       \
    threadgroup OtShared<OT_OP_KSUMS_GRAD> sh;                                                     \
    const OtArgs a = {rows, 0, cols, cols + D, 0, out, N, M, D, 0u, D, D + 1, D + 1, sigma, 0, 0}; \
    ot_dispatch<OT_OP_KSUMS_GRAD, KER>(a, &sh, ltid, tgid, tptg);                                  \
  }

OT_KPROD_ENTRY(kernel_product_gaussian_f32, OT_KER_GAUSS)
OT_KPROD_ENTRY(kernel_product_laplacian_f32, OT_KER_LAP)
OT_KPROD_ENTRY(kernel_product_energy_f32, OT_KER_ENERGY)

OT_KSUMS_GRAD_ENTRY(kernel_sums_grad_gaussian_f32, OT_KER_GAUSS)
OT_KSUMS_GRAD_ENTRY(kernel_sums_grad_laplacian_f32, OT_KER_LAP)
OT_KSUMS_GRAD_ENTRY(kernel_sums_grad_energy_f32, OT_KER_ENERGY)
