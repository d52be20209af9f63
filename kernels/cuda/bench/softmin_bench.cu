// Stand-alone micro-benchmark and check of the softmin kernels (no Rust, no Candle): times
// softmin_{sqeuclidean,euclidean}_{f32,f64} on uniform points in the unit cube with the launch
// configuration of `candle_ot_kernels::launch_config`, reports pairs per second, and compares 64
// rows against a float64 CPU reference.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -o softmin_bench kernels/cuda/bench/softmin_bench.cu
//   ./softmin_bench [N] [M] [D] [reps]
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <vector>
#include <random>
#include <cuda_runtime.h>
#include "../common.cuh"
#include "../softmin.cu"

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { \
  std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); std::exit(1); } } while (0)

// Mirror of candle_ot_kernels::launch_config (BLOCK_THREADS = 256, MAX_LANES = 32).
static void launch_config(unsigned rows, unsigned batch, dim3& grid, dim3& block) {
  unsigned long long work = (unsigned long long)(rows ? rows : 1) * (batch ? batch : 1);
  unsigned lanes = 1;
  while (lanes < 32 && work * lanes < (1ull << 16)) lanes *= 2;
  unsigned rpb = 256 / lanes;
  block = dim3(lanes, rpb, 1);
  grid = dim3((rows + rpb - 1) / rpb, batch, 1);
}

template <typename T>
static void run(const char* name, void (*kern)(const T*, const T*, const T*, T*, unsigned, unsigned,
                                               unsigned, unsigned, T),
                int cost, unsigned N, unsigned M, unsigned D, int reps, const std::vector<double>& x,
                const std::vector<double>& y, const std::vector<double>& h, double eps) {
  std::vector<T> xt(x.begin(), x.end()), yt(y.begin(), y.end()), ht(h.begin(), h.end());
  T *dx, *dy, *dh, *dout;
  CK(cudaMalloc(&dx, xt.size() * sizeof(T)));
  CK(cudaMalloc(&dy, yt.size() * sizeof(T)));
  CK(cudaMalloc(&dh, ht.size() * sizeof(T)));
  CK(cudaMalloc(&dout, N * sizeof(T)));
  CK(cudaMemcpy(dx, xt.data(), xt.size() * sizeof(T), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dy, yt.data(), yt.size() * sizeof(T), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dh, ht.data(), ht.size() * sizeof(T), cudaMemcpyHostToDevice));
  dim3 grid, block;
  launch_config(N, 1, grid, block);
  kern<<<grid, block>>>(dx, dy, dh, dout, 1, N, M, D, (T)eps);  // warm-up
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0); cudaEventCreate(&e1);
  cudaEventRecord(e0);
  for (int r = 0; r < reps; ++r) kern<<<grid, block>>>(dx, dy, dh, dout, 1, N, M, D, (T)eps);
  cudaEventRecord(e1);
  CK(cudaEventSynchronize(e1));
  float ms = 0; cudaEventElapsedTime(&ms, e0, e1);
  std::vector<T> out(N);
  CK(cudaMemcpy(out.data(), dout, N * sizeof(T), cudaMemcpyDeviceToHost));
  // Reference on 64 rows.
  double maxerr = 0;
  for (int k = 0; k < 64; ++k) {
    unsigned i = (unsigned)((k * 2654435761ull) % N);
    double mx = -INFINITY, s = 0;
    std::vector<double> z(M);
    for (unsigned j = 0; j < M; ++j) {
      double sq = 0;
      for (unsigned d = 0; d < D; ++d) { double t = x[i * D + d] - y[j * D + d]; sq += t * t; }
      double c = cost == 0 ? 0.5 * sq : std::sqrt(sq);
      z[j] = h[j] - c / eps; if (z[j] > mx) mx = z[j];
    }
    for (unsigned j = 0; j < M; ++j) s += std::exp(z[j] - mx);
    double ref = -eps * (mx + std::log(s));
    double err = std::fabs((double)out[i] - ref) / (std::fabs(ref) + eps);
    if (err > maxerr) maxerr = err;
  }
  double secs = ms / 1e3 / reps;
  std::printf("%-28s N=%u M=%u D=%u block=(%u,%u) grid=%u  %.3f ms  %.3e pairs/s  max rel err %.2e\n",
              name, N, M, D, block.x, block.y, grid.x, secs * 1e3, (double)N * M / secs, maxerr);
  cudaFree(dx); cudaFree(dy); cudaFree(dh); cudaFree(dout);
}

int main(int argc, char** argv) {
  unsigned N = argc > 1 ? atoi(argv[1]) : 100000, M = argc > 2 ? atoi(argv[2]) : N;
  unsigned D = argc > 3 ? atoi(argv[3]) : 3;
  int reps = argc > 4 ? atoi(argv[4]) : 10;
  double eps = 0.05 * 0.05;
  std::mt19937_64 g(0);
  std::uniform_real_distribution<double> U(0, 1);
  std::vector<double> x(N * D), y(M * D), h(M);
  for (auto& v : x) v = (float)U(g);
  for (auto& v : y) v = (float)U(g);
  for (unsigned j = 0; j < M; ++j) h[j] = -std::log((double)M) + (j % 7 == 3 ? -INFINITY : 0.0) + 0.01 * U(g) / eps;
  run<float>("softmin_sqeuclidean_f32", softmin_sqeuclidean_f32, 0, N, M, D, reps, x, y, h, eps);
  run<float>("softmin_euclidean_f32", softmin_euclidean_f32, 1, N, M, D, reps, x, y, h, eps);
  run<double>("softmin_sqeuclidean_f64", softmin_sqeuclidean_f64, 0, N, M, D, reps > 3 ? reps / 3 : 1, x, y, h, eps);
  return 0;
}
