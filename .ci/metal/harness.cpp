// CPU execution harness for the candle-ot Metal kernels (see README.md in this directory).
//
// Includes kernels/metal/*.metal against the MSL shim with METAL_SHIM_EMULATE, runs every kernel
// on the CPU with one std::thread per Metal thread (threadgroups one after another, threadgroup
// memory = the kernels' static storage, threadgroup_barrier = std::barrier), and compares the
// output with a straightforward float64 reference. Exit status 1 on any mismatch.
//
// Build: clang++ -std=c++20 -O1 -pthread -DMETAL_SHIM_EMULATE -I.ci/metal -Ikernels/metal
//        .ci/metal/harness.cpp   [-DOT_TILE=8u -DOT_TILE_ELEMS=64u to force many small tiles]
//        [-fsanitize=thread: a missing threadgroup_barrier shows up as a data race]
// Env: HARNESS_VERBOSE=1 prints every check; HARNESS_QUICK=1 runs a reduced set.
//
// Entry points: softmin_{c}, lse_grad_{c}, lse_values_{c} (c = sqeuclidean, euclidean),
// kernel_product_{k}, kernel_sums_grad_{k} (k = gaussian, laplacian, energy). The packed ones run
// on the layouts the online backward builds, both sides: lse_grad on rows [x_i, f_i/eps] x cols
// [y_j, h_j, w_j] (x-side, w random with zeros) and on rows [y_j, h_j] x cols [x_i, f_i/eps, g_i]
// (y-side, N and M swapped); lse_values on [x_i, f_i/eps] x [y_j, h_j, v_j (K)];
// kernel_sums_grad on x x [y_j, b_j] and y x [x_i, g_i]. The float64 reference reads the same
// packed arrays, so a wrong stride or offset shows up as a mismatch.
//
// Cases: B = 3 (batch 1 has every h = -inf: softmin = +inf, x-side lse sums = 0, y-side rows
// alpha = -inf = 0), N = 17, M = 29 (and 13 x 300, 5 x 7 at D = 1024), D in
// {1,2,3,4,5,8,9,1024}, K in {1,2,3,8,9,11}, eps in {0.1, 1}, sigma = 3 eps, ~20% masked h_j and
// ~20% zero weights, one coincident pair x_i = y_j (gradient of |x - y| at 0), threadgroups
// (LANES, ROWS) in {(1,32), (4,8), (32,2), (8,2), (16,16)}.
// Tolerance: |got - ref| <= 1e-5 (|ref| + sum of |terms|) (f32 vs float64).
//
// Block-sparse entry points block_softmin_{c} and block_lse_grad_{c} (x-side and y-side layouts)
// run on random patterns (run_block_case): per batch item, row clusters of 1..9 rows, each with
// 1..3 column spans (the first cluster: one span; some spans empty; the x-side pattern and the
// y-side pattern drawn independently), tasks of at most ROWS rows inside one cluster, against a
// float64 reference restricted to the kept pairs. Batch 1 has every h = -inf (+inf / zeros).
//
// The grid kernel grid_lse_axis_f32 (run_grid_cases) runs one axis pass on (outer, n, inner)
// arrays of odd sizes (n in {1, 17, 29, 300}, inner 1 and > 1), ~20% -inf entries and one fully
// masked line, p = 1 / p = 2 kernel tables, scale 1 and -eps, with the recommended threadgroup of
// grid_launch_config and seven other shapes; the small-tile build shrinks OT_GRID_TILE to 16 so
// that lines stream several tiles and LX > OT_GRID_TILE must give NaN.
#include <barrier>
#include <chrono>
#include <cstdlib>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <thread>
#include <vector>

// The small-tile build (-DOT_TILE=8u) also shrinks the grid kernel's tile, so that a line streams
// several j tiles and a threadgroup with LX > OT_GRID_TILE hits the NaN path.
#if defined(OT_TILE) && !defined(OT_GRID_TILE)
#define OT_GRID_TILE (2u * OT_TILE)
#endif

#include "softmin.metal"
#include "kernel_sums.metal"
#include "grid.metal"
#undef kernel
#undef device
#undef threadgroup
#undef constant
#undef thread

using metal::uint2;
typedef unsigned int u32;
typedef std::function<void(uint2, uint2, uint2)> KernelFn;

// ------------------------------------------------------------------------------------ launch
// One std::thread per Metal thread of a threadgroup; the same threads run the threadgroups one
// after another, separated by a barrier (so the kernels' static threadgroup storage is reused
// only once every thread of the previous threadgroup is done).
static void launch(u32 gx, u32 gy, u32 lx, u32 ly, const KernelFn& f) {
  std::barrier<> bar((std::ptrdiff_t)(lx * ly));
  std::vector<std::thread> ts;
  ts.reserve(lx * ly);
  for (u32 ty = 0; ty < ly; ++ty)
    for (u32 tx = 0; tx < lx; ++tx)
      ts.emplace_back([&f, &bar, tx, ty, gx, gy, lx, ly] {
        metal::__tg_barrier = &bar;
        for (u32 by = 0; by < gy; ++by)
          for (u32 bx = 0; bx < gx; ++bx) {
            f(uint2{tx, ty}, uint2{bx, by}, uint2{lx, ly});
            bar.arrive_and_wait();
          }
        metal::__tg_barrier = nullptr;
      });
  for (auto& t : ts) t.join();
}

// ------------------------------------------------------------------------------------ data
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 6364136223846793005ull + 1442695040888963407ull) {}
  double uni() {  // [0, 1)
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(s >> 11) * (1.0 / 9007199254740992.0);
  }
  float sym(double scale) { return (float)((2.0 * uni() - 1.0) * scale); }
};

static const double NINF = -std::numeric_limits<double>::infinity();
static const double PINF = std::numeric_limits<double>::infinity();

struct Case {
  u32 B, N, M, D, K;
  float eps, sigma;
  std::vector<float> x, y, h, f, g, v, bw;  // bw: kernel-sum weights b (B,M); g also (B,N)
};

static double sqdist(const Case& c, u32 b, u32 i, u32 j) {
  double s = 0;
  for (u32 d = 0; d < c.D; ++d) {
    double t = (double)c.x[((size_t)b * c.N + i) * c.D + d] - (double)c.y[((size_t)b * c.M + j) * c.D + d];
    s += t * t;
  }
  return s;
}
static double cost(int p, double sq) { return p == 2 ? 0.5 * sq : std::sqrt(sq); }
static double gfac(int p, double sq) {  // grad_x C = gfac * (x - y)
  if (p == 2) return 1.0;
  double r = std::sqrt(sq);
  return r > 0 ? 1.0 / r : 0.0;
}

// float64 softmin: out[b,i] = -eps log sum_j exp(h_j - C_ij/eps); mag = a scale for the tolerance.
static double ref_softmin(const Case& c, int p, u32 b, u32 i, double* mag) {
  double m = NINF;
  std::vector<double> z(c.M);
  for (u32 j = 0; j < c.M; ++j) {
    double hj = c.h[(size_t)b * c.M + j];
    z[j] = hj == NINF ? NINF : hj - cost(p, sqdist(c, b, i, j)) / c.eps;
    if (z[j] > m) m = z[j];
  }
  if (m == NINF) { *mag = 1; return PINF; }
  double s = 0;
  for (u32 j = 0; j < c.M; ++j) s += z[j] == NINF ? 0.0 : std::exp(z[j] - m);
  *mag = c.eps * (std::fabs(m) + std::fabs(std::log(s)) + 1.0);
  return -c.eps * (m + std::log(s));
}

static double kval(int ker, double sq, double sigma) {
  double r = std::sqrt(sq);
  if (ker == OT_KER_GAUSS) return std::exp(-sq / (2 * sigma * sigma));
  if (ker == OT_KER_LAP) return std::exp(-r / sigma);
  return -r;
}
static double kgfac(int ker, double sq, double sigma) {  // grad_p k = kgfac * (p - q)
  double r = std::sqrt(sq);
  if (ker == OT_KER_GAUSS) return -kval(ker, sq, sigma) / (sigma * sigma);
  if (ker == OT_KER_LAP) return r > 0 ? -kval(ker, sq, sigma) / (sigma * r) : 0.0;
  return r > 0 ? -1.0 / r : 0.0;
}

// ------------------------------------------------------------------------------------ packed
// A packed point set: n points per batch entry, each `w` floats: [p (D), extra (w - D)].
struct Packed {
  u32 B, n, D, w;
  std::vector<float> a;
  const float* at(u32 b, u32 i) const { return a.data() + ((size_t)b * n + i) * w; }
};
// [P (B,n,D) | S0 (B,n) * s0 | S1 (B,n)... | V (B,n,K)]: scalars and vectors appended per point.
static Packed pack(u32 B, u32 n, u32 D, const std::vector<float>& P, std::vector<const std::vector<float>*> scal,
                   std::vector<float> scale, const std::vector<float>* V = nullptr, u32 K = 0) {
  Packed r{B, n, D, D + (u32)scal.size() + K, {}};
  r.a.reserve((size_t)B * n * r.w);
  for (u32 b = 0; b < B; ++b)
    for (u32 i = 0; i < n; ++i) {
      const size_t k = (size_t)b * n + i;
      for (u32 d = 0; d < D; ++d) r.a.push_back(P[k * D + d]);
      for (size_t s = 0; s < scal.size(); ++s) r.a.push_back((*scal[s])[k] * scale[s]);
      for (u32 c = 0; c < K; ++c) r.a.push_back((*V)[k * K + c]);
    }
  return r;
}
static double psq(const Packed& R, u32 b, u32 i, const Packed& Q, u32 j) {
  const float *p = R.at(b, i), *q = Q.at(b, j);
  double s = 0;
  for (u32 d = 0; d < R.D; ++d) {
    double t = (double)p[d] - (double)q[d];
    s += t * t;
  }
  return s;
}

// lse_grad / lse_values reference on packed rows [p, alpha] and cols [q, h, w | v (K)]:
//   pi = exp(alpha + h - C/eps); grad: out = [sum pi w grad_p C (D), sum pi w]; values: sum pi v.
static void ref_lse(const Packed& R, const Packed& Q, int p, double eps, bool values, u32 K,
                    std::vector<double>& ref, std::vector<double>& mag) {
  const u32 D = R.D, W = values ? K : D + 1;
  ref.assign((size_t)R.B * R.n * W, 0.0);
  mag.assign(ref.size(), 0.0);
  for (u32 b = 0; b < R.B; ++b)
    for (u32 i = 0; i < R.n; ++i) {
      const double alpha = R.at(b, i)[D];
      const size_t o = ((size_t)b * R.n + i) * W;
      for (u32 j = 0; j < Q.n; ++j) {
        const float* q = Q.at(b, j);
        const double hq = q[D];
        if (hq == NINF || alpha == NINF) continue;
        const double sq = psq(R, b, i, Q, j);
        const double pi = std::exp(alpha + hq - cost(p, sq) / eps);
        if (values) {
          for (u32 k = 0; k < K; ++k) {
            double t = pi * q[D + 1 + k];
            ref[o + k] += t;
            mag[o + k] += std::fabs(t);
          }
        } else {
          const double pw = pi * q[D + 1], gf = gfac(p, sq);
          for (u32 d = 0; d < D; ++d) {
            double t = pw * gf * ((double)R.at(b, i)[d] - (double)q[d]);
            ref[o + d] += t;
            mag[o + d] += std::fabs(t);
          }
          ref[o + D] += pw;
          mag[o + D] += std::fabs(pw);
        }
      }
    }
}

// kernel_sums_grad reference: rows p (D), cols [q, w]: out = [sum w grad_p k (D), sum w k].
static void ref_ksums(const Packed& R, const Packed& Q, int ker, double sigma, std::vector<double>& ref,
                      std::vector<double>& mag) {
  const u32 D = R.D, W = D + 1;
  ref.assign((size_t)R.B * R.n * W, 0.0);
  mag.assign(ref.size(), 0.0);
  for (u32 b = 0; b < R.B; ++b)
    for (u32 i = 0; i < R.n; ++i) {
      const size_t o = ((size_t)b * R.n + i) * W;
      for (u32 j = 0; j < Q.n; ++j) {
        const float* q = Q.at(b, j);
        const double sq = psq(R, b, i, Q, j), w = q[D];
        const double gw = w * kgfac(ker, sq, sigma);
        for (u32 d = 0; d < D; ++d) {
          double t = gw * ((double)R.at(b, i)[d] - (double)q[d]);
          ref[o + d] += t;
          mag[o + d] += std::fabs(t);
        }
        double t = w * kval(ker, sq, sigma);
        ref[o + D] += t;
        mag[o + D] += std::fabs(t);
      }
    }
}

// ------------------------------------------------------------------------------------ compare
static int g_fail = 0, g_checks = 0;
static const double RTOL = 1e-5;

static bool close(double got, double ref, double mag) {
  if (std::isnan(ref)) return std::isnan(got);
  if (std::isinf(ref)) return got == ref;
  if (!std::isfinite(got)) return false;
  return std::fabs(got - ref) <= RTOL * (std::fabs(ref) + mag) + 1e-30;
}

static void check(const std::string& what, const std::vector<float>& got, const std::vector<double>& ref,
                  const std::vector<double>& mag) {
  ++g_checks;
  double worst = 0;
  size_t bad = 0, first = (size_t)-1;
  if (got.size() != ref.size()) {
    ++g_fail;
    std::printf("FAIL %s: size %zu, expected %zu\n", what.c_str(), got.size(), ref.size());
    return;
  }
  for (size_t k = 0; k < ref.size(); ++k) {
    if (!close(got[k], ref[k], mag[k])) {
      if (first == (size_t)-1) first = k;
      ++bad;
    } else if (std::isfinite(ref[k])) {
      double e = std::fabs(got[k] - ref[k]) / (std::fabs(ref[k]) + mag[k] + 1e-300);
      if (e > worst) worst = e;
    }
  }
  if (bad) {
    ++g_fail;
    std::printf("FAIL %s: %zu/%zu mismatches, first at %zu: got %.9g ref %.9g (mag %.3g)\n", what.c_str(), bad,
                ref.size(), first, (double)got[first], ref[first], mag[first]);
  } else if (std::getenv("HARNESS_VERBOSE")) {
    std::printf("ok   %s (max scaled err %.2e)\n", what.c_str(), worst);
  }
}

// ------------------------------------------------------------------------------------ cases
static Case make_case(u32 B, u32 N, u32 M, u32 D, u32 K, float eps, float sigma, uint64_t seed) {
  Rng r(seed);
  Case c{B, N, M, D, K, eps, sigma, {}, {}, {}, {}, {}, {}, {}};
  const double sc = 1.0 / std::sqrt((double)D);  // keeps |x - y| = O(1) for every D
  c.x.resize((size_t)B * N * D);
  c.y.resize((size_t)B * M * D);
  for (auto& t : c.x) t = r.sym(sc);
  for (auto& t : c.y) t = r.sym(sc);
  for (u32 b = 0; b < B; ++b)  // a coincident pair: gradient of |x - y| at 0
    for (u32 d = 0; d < D; ++d) c.y[((size_t)b * M + 1) * D + d] = c.x[((size_t)b * N + 2) * D + d];
  c.h.resize((size_t)B * M);
  c.bw.resize((size_t)B * M);
  for (u32 b = 0; b < B; ++b)
    for (u32 j = 0; j < M; ++j) {
      size_t k = (size_t)b * M + j;
      bool masked = (b == 1) || (r.uni() < 0.2);  // batch 1: every point masked
      c.h[k] = masked ? -INFINITY : (float)(std::log(1.0 / M) + r.sym(1.0));
      c.bw[k] = (r.uni() < 0.2) ? 0.0f : r.sym(1.0);  // some zero weights
    }
  c.f.resize((size_t)B * N);
  c.g.resize((size_t)B * N);
  for (u32 b = 0; b < B; ++b)
    for (u32 i = 0; i < N; ++i) {
      double mag;
      double fi = ref_softmin(c, 2, b, i, &mag);  // the softmin output (sqeuclidean)
      c.f[(size_t)b * N + i] = std::isfinite(fi) ? (float)fi : 0.0f;
      c.g[(size_t)b * N + i] = (r.uni() < 0.2) ? 0.0f : r.sym(1.0);
    }
  c.v.resize((size_t)B * M * K);
  for (auto& t : c.v) t = r.sym(1.0);
  return c;
}

static const char* cost_name(int p) { return p == 2 ? "sqeuclidean" : "euclidean"; }
static const char* ker_name(int k) {
  return k == OT_KER_GAUSS ? "gaussian" : k == OT_KER_LAP ? "laplacian" : "energy";
}

static void run_case(const Case& c, u32 lanes, u32 rows) {
  const u32 B = c.B, N = c.N, M = c.M, D = c.D, K = c.K;
  const bool unsupported = D > OT_TILE_ELEMS;  // kernels must fill the output with NaN
  const double nan = std::numeric_limits<double>::quiet_NaN();
  auto tag = [&](const std::string& name) {
    char buf[200];
    std::snprintf(buf, sizeof buf, "%s B=%u N=%u M=%u D=%u K=%u eps=%g lanes=%u rows=%u", name.c_str(), B, N, M,
                  D, K, (double)c.eps, lanes, rows);
    return std::string(buf);
  };
  auto grid = [&](u32 n) { return (n + rows - 1) / rows; };
  const float eps = c.eps, sigma = c.sigma;

  // The packed layouts of the online backward (see the header comment).
  const Packed x_f = pack(B, N, D, c.x, {&c.f}, {1.0f / eps});           // [x_i, f_i/eps]
  const Packed y_h_w = pack(B, M, D, c.y, {&c.h, &c.bw}, {1.0f, 1.0f});  // [y_j, h_j, w_j]
  const Packed y_h = pack(B, M, D, c.y, {&c.h}, {1.0f});                 // [y_j, h_j]
  const Packed x_f_g = pack(B, N, D, c.x, {&c.f, &c.g}, {1.0f / eps, 1.0f});  // [x_i, f_i/eps, g_i]
  const Packed y_h_v = pack(B, M, D, c.y, {&c.h}, {1.0f}, &c.v, K);      // [y_j, h_j, v_j]
  const Packed x_pts = pack(B, N, D, c.x, {}, {});
  const Packed y_pts = pack(B, M, D, c.y, {}, {});
  const Packed y_b = pack(B, M, D, c.y, {&c.bw}, {1.0f});                // [y_j, b_j]
  const Packed x_g = pack(B, N, D, c.x, {&c.g}, {1.0f});                 // [x_i, g_i]
  // (the 1/eps scaling above is applied in f32, as the Rust op does with (f / eps))

  for (int p : {2, 1}) {
    const bool sq = p == 2;
    // softmin
    {
      std::vector<float> out((size_t)B * N, -12345.f);
      std::vector<double> ref(out.size()), mag(out.size());
      launch(grid(N), B, lanes, rows, [&](uint2 lt, uint2 tg, uint2 tp) {
        (sq ? softmin_sqeuclidean_f32 : softmin_euclidean_f32)(c.x.data(), c.y.data(), c.h.data(), out.data(), B, N,
                                                               M, D, eps, lt, tg, tp);
      });
      for (u32 b = 0; b < B; ++b)
        for (u32 i = 0; i < N; ++i) {
          size_t k = (size_t)b * N + i;
          ref[k] = unsupported ? nan : ref_softmin(c, p, b, i, &mag[k]);
        }
      check(tag(std::string("softmin_") + cost_name(p)), out, ref, mag);
    }
    // lse_grad, both sides of the backward
    struct Side { const char* name; const Packed* R; const Packed* Q; };
    for (const Side& s : {Side{"x-side", &x_f, &y_h_w}, Side{"y-side", &y_h, &x_f_g}}) {
      const u32 R = s.R->n, Qn = s.Q->n;
      std::vector<float> out((size_t)B * R * (D + 1), -12345.f);
      std::vector<double> ref, mag;
      launch(grid(R), B, lanes, rows, [&](uint2 lt, uint2 tg, uint2 tp) {
        (sq ? lse_grad_sqeuclidean_f32 : lse_grad_euclidean_f32)(s.R->a.data(), s.Q->a.data(), out.data(), B, R, Qn,
                                                                 D, eps, lt, tg, tp);
      });
      ref_lse(*s.R, *s.Q, p, eps, false, 0, ref, mag);
      if (unsupported) ref.assign(ref.size(), nan);
      check(tag(std::string("lse_grad_") + cost_name(p) + " " + s.name), out, ref, mag);
    }
    // lse_values
    {
      std::vector<float> out((size_t)B * N * K, -12345.f);
      std::vector<double> ref, mag;
      launch(grid(N), B, lanes, rows, [&](uint2 lt, uint2 tg, uint2 tp) {
        (sq ? lse_values_sqeuclidean_f32 : lse_values_euclidean_f32)(x_f.a.data(), y_h_v.a.data(), out.data(), B, N,
                                                                     M, D, K, eps, lt, tg, tp);
      });
      ref_lse(x_f, y_h_v, p, eps, true, K, ref, mag);
      if (unsupported) ref.assign(ref.size(), nan);
      check(tag(std::string("lse_values_") + cost_name(p)), out, ref, mag);
    }
  }

  for (int ker : {OT_KER_GAUSS, OT_KER_LAP, OT_KER_ENERGY}) {
    auto pick = [&](auto gauss, auto lap, auto energy) {
      return ker == OT_KER_GAUSS ? gauss : ker == OT_KER_LAP ? lap : energy;
    };
    // kernel_product
    {
      std::vector<float> out((size_t)B * N, -12345.f);
      std::vector<double> ref(out.size(), 0.0), mag(out.size(), 0.0);
      auto fn = pick(kernel_product_gaussian_f32, kernel_product_laplacian_f32, kernel_product_energy_f32);
      launch(grid(N), B, lanes, rows, [&](uint2 lt, uint2 tg, uint2 tp) {
        fn(c.x.data(), c.y.data(), c.bw.data(), out.data(), B, N, M, D, sigma, lt, tg, tp);
      });
      for (u32 b = 0; b < B; ++b)
        for (u32 i = 0; i < N; ++i)
          for (u32 j = 0; j < M; ++j) {
            double t = kval(ker, sqdist(c, b, i, j), sigma) * c.bw[(size_t)b * M + j];
            ref[(size_t)b * N + i] += t;
            mag[(size_t)b * N + i] += std::fabs(t);
          }
      if (unsupported) ref.assign(ref.size(), nan);
      check(tag(std::string("kernel_product_") + ker_name(ker)), out, ref, mag);
    }
    // kernel_sums_grad, both sides of the backward
    struct Side { const char* name; const Packed* R; const Packed* Q; };
    for (const Side& s : {Side{"x-side", &x_pts, &y_b}, Side{"y-side", &y_pts, &x_g}}) {
      const u32 R = s.R->n, Qn = s.Q->n;
      std::vector<float> out((size_t)B * R * (D + 1), -12345.f);
      std::vector<double> ref, mag;
      auto fn = pick(kernel_sums_grad_gaussian_f32, kernel_sums_grad_laplacian_f32, kernel_sums_grad_energy_f32);
      launch(grid(R), B, lanes, rows, [&](uint2 lt, uint2 tg, uint2 tp) {
        fn(s.R->a.data(), s.Q->a.data(), out.data(), B, R, Qn, D, sigma, lt, tg, tp);
      });
      ref_ksums(*s.R, *s.Q, ker, sigma, ref, mag);
      if (unsupported) ref.assign(ref.size(), nan);
      check(tag(std::string("kernel_sums_grad_") + ker_name(ker) + " " + s.name), out, ref, mag);
    }
  }
}

// ------------------------------------------------------------------------------------ block-sparse
// A task table (5 u32 per task: b, row_start, row_end, span_begin, span_end) and spans (2 u32
// each), plus the dense keep mask (B, R, Q) of the same pattern for the reference.
struct Pattern {
  std::vector<u32> tasks, spans;
  std::vector<char> keep;
  u32 ntasks;
};

static Pattern make_pattern(u32 B, u32 R, u32 Q, u32 rows_per_task, uint64_t seed) {
  Rng r(seed);
  Pattern p{{}, {}, std::vector<char>((size_t)B * R * Q, 0), 0};
  for (u32 b = 0; b < B; ++b) {
    u32 i = 0, cl = 0;
    while (i < R) {
      const u32 size = 1 + (u32)(r.uni() * 9);
      const u32 e = std::min(R, i + size);
      const u32 s0 = (u32)(p.spans.size() / 2);
      const u32 nsp = cl == 0 ? 1u : 1 + (u32)(r.uni() * 3);
      u32 c = 0;
      for (u32 k = 0; k < nsp && c < Q; ++k) {
        u32 c0 = c + (u32)(r.uni() * (Q / 3 + 1));
        u32 len = r.uni() < 0.15 ? 0u : 1 + (u32)(r.uni() * (Q / 2));
        c0 = std::min(c0, Q);
        const u32 c1 = std::min(Q, c0 + len);
        p.spans.push_back(c0);
        p.spans.push_back(c1);
        for (u32 row = i; row < e; ++row)
          for (u32 j = c0; j < c1; ++j) p.keep[((size_t)b * R + row) * Q + j] = 1;
        c = c1;
      }
      const u32 s1 = (u32)(p.spans.size() / 2);
      for (u32 t = i; t < e; t += rows_per_task) {
        const u32 te = std::min(e, t + rows_per_task);
        for (u32 w : {b, t, te, s0, s1}) p.tasks.push_back(w);
      }
      i = e;
      ++cl;
    }
  }
  p.ntasks = (u32)(p.tasks.size() / 5);
  return p;
}

static void run_block_case(const Case& c, u32 lanes, u32 rows, uint64_t seed) {
  const u32 B = c.B, N = c.N, M = c.M, D = c.D;
  const float eps = c.eps;
  auto tag = [&](const std::string& name, const Pattern& pt) {
    char buf[220];
    std::snprintf(buf, sizeof buf, "%s B=%u N=%u M=%u D=%u eps=%g lanes=%u rows=%u tasks=%u", name.c_str(), B, N,
                  M, D, (double)eps, lanes, rows, pt.ntasks);
    return std::string(buf);
  };
  const Pattern pxy = make_pattern(B, N, M, rows, seed);
  const Pattern pyx = make_pattern(B, M, N, rows, seed + 1000);
  const Packed x_f = pack(B, N, D, c.x, {&c.f}, {1.0f / eps});
  const Packed y_h_w = pack(B, M, D, c.y, {&c.h, &c.bw}, {1.0f, 1.0f});
  const Packed y_h = pack(B, M, D, c.y, {&c.h}, {1.0f});
  const Packed x_f_g = pack(B, N, D, c.x, {&c.f, &c.g}, {1.0f / eps, 1.0f});
  for (int p : {2, 1}) {
    const bool sq = p == 2;
    // block softmin: the dense reference with the dropped columns masked.
    {
      std::vector<float> out((size_t)B * N, -12345.f);
      std::vector<double> ref(out.size()), mag(out.size());
      launch(pxy.ntasks, 1, lanes, rows, [&](uint2 lt, uint2 tg, uint2 tp) {
        (sq ? block_softmin_sqeuclidean_f32 : block_softmin_euclidean_f32)(
            c.x.data(), c.y.data(), c.h.data(), out.data(), B, N, M, D, eps, pxy.tasks.data(), pxy.spans.data(),
            pxy.ntasks, lt, tg, tp);
      });
      for (u32 b = 0; b < B; ++b)
        for (u32 i = 0; i < N; ++i) {
          Case ci = c;  // (small cases: a copy with the dropped columns masked)
          for (u32 j = 0; j < M; ++j)
            if (!pxy.keep[((size_t)b * N + i) * M + j]) ci.h[(size_t)b * M + j] = -INFINITY;
          const size_t k = (size_t)b * N + i;
          ref[k] = ref_softmin(ci, p, b, i, &mag[k]);
        }
      check(tag(std::string("block_softmin_") + cost_name(p), pxy), out, ref, mag);
    }
    // block lse_grad, x-side (pattern pxy) and y-side (pattern pyx).
    struct Side { const char* name; const Packed* R; const Packed* Q; const Pattern* P; };
    for (const Side& s : {Side{"x-side", &x_f, &y_h_w, &pxy}, Side{"y-side", &y_h, &x_f_g, &pyx}}) {
      const u32 R = s.R->n, Qn = s.Q->n, W = D + 1;
      std::vector<float> out((size_t)B * R * W, -12345.f);
      launch(s.P->ntasks, 1, lanes, rows, [&](uint2 lt, uint2 tg, uint2 tp) {
        (sq ? block_lse_grad_sqeuclidean_f32 : block_lse_grad_euclidean_f32)(
            s.R->a.data(), s.Q->a.data(), out.data(), B, R, Qn, D, eps, s.P->tasks.data(), s.P->spans.data(),
            s.P->ntasks, lt, tg, tp);
      });
      std::vector<double> ref((size_t)B * R * W, 0.0), mag(ref.size(), 0.0);
      for (u32 b = 0; b < B; ++b)
        for (u32 i = 0; i < R; ++i) {
          const double alpha = s.R->at(b, i)[D];
          const size_t o = ((size_t)b * R + i) * W;
          for (u32 j = 0; j < Qn; ++j) {
            if (!s.P->keep[((size_t)b * R + i) * Qn + j]) continue;
            const float* q = s.Q->at(b, j);
            const double hq = q[D];
            if (hq == NINF || alpha == NINF) continue;
            const double sqd = psq(*s.R, b, i, *s.Q, j);
            const double pw = std::exp(alpha + hq - cost(p, sqd) / eps) * q[D + 1], gf = gfac(p, sqd);
            for (u32 d = 0; d < D; ++d) {
              const double t = pw * gf * ((double)s.R->at(b, i)[d] - (double)q[d]);
              ref[o + d] += t;
              mag[o + d] += std::fabs(t);
            }
            ref[o + D] += pw;
            mag[o + D] += std::fabs(pw);
          }
        }
      check(tag(std::string("block_lse_grad_") + cost_name(p) + " " + s.name, *s.P), out, ref, mag);
    }
  }
}

// ------------------------------------------------------------------------------------ grid
// grid_lse_axis_f32(src, kern, dst, outer, n, inner, scale) against a float64 reference:
//   dst[o,i,l] = scale log sum_j exp(src[o,j,l] - kern[|i-j|]),
// on (outer, n, inner) arrays with ~20% -inf entries and one fully masked line (-inf * scale),
// p = 1 and p = 2 kernel tables (kern[d] = c(d / n) / eps, eps = 0.01: up to 50 / 100) and
// scale = 1 or -eps (the last pass of a softmin). The reference reads the same f32 src / kern.
// Tolerance: |got - ref| <= 1e-5 (|ref| + |scale| (max |src| + max kern + log n + 1)).

// The recommended threadgroup of candle_ot_kernels::grid_launch_config (LX capped at the tile).
static void grid_recommended(u32 n, u32 inner, u32* lx, u32* ly) {
  auto pow2 = [](u32 v) { u32 p = 1; while (p < v) p *= 2; return p; };
  const u32 lx0 = std::min(32u, pow2(inner));
  *ly = std::min(256u / lx0, pow2(n));
  *lx = std::min(256u / *ly, (u32)OT_GRID_TILE);
}

static void run_grid_case(u32 outer, u32 n, u32 inner, int p, float scale, u32 lx, u32 ly, uint64_t seed) {
  Rng r(seed);
  const size_t len = (size_t)outer * n * inner;
  std::vector<float> src(len), kern(n), dst(len, -12345.f);
  const double eps = 0.01;
  for (u32 d = 0; d < n; ++d) {
    const double t = (double)d / n;
    kern[d] = (float)(p == 1 ? t / eps : 0.5 * t * t / eps);
  }
  for (auto& v : src) v = r.uni() < 0.2 ? -INFINITY : r.sym(5.0);
  if (outer * inner > 1) {  // one fully masked line: (o, l) = (outer - 1, inner - 1)
    for (u32 j = 0; j < n; ++j) src[((size_t)(outer - 1) * n + j) * inner + inner - 1] = -INFINITY;
  }
  const bool unsupported = lx > OT_GRID_TILE || lx * ly > OT_MAX_BLOCK;
  std::vector<double> ref(len), mag(len);
  double kmax = 0;
  for (float k : kern) kmax = std::max(kmax, (double)k);
  for (u32 o = 0; o < outer; ++o)
    for (u32 l = 0; l < inner; ++l) {
      double smax = 0;
      for (u32 j = 0; j < n; ++j) {
        const double v = src[((size_t)o * n + j) * inner + l];
        if (v != NINF) smax = std::max(smax, std::fabs(v));
      }
      for (u32 i = 0; i < n; ++i) {
        const size_t k = ((size_t)o * n + i) * inner + l;
        double m = NINF;
        for (u32 j = 0; j < n; ++j) {
          const double z = (double)src[((size_t)o * n + j) * inner + l] - (double)kern[i > j ? i - j : j - i];
          if (z > m) m = z;
        }
        double s = 0;
        if (m != NINF)
          for (u32 j = 0; j < n; ++j) {
            const double z = (double)src[((size_t)o * n + j) * inner + l] - (double)kern[i > j ? i - j : j - i];
            s += z == NINF ? 0.0 : std::exp(z - m);
          }
        ref[k] = unsupported ? std::numeric_limits<double>::quiet_NaN()
                 : m == NINF ? NINF * (double)scale
                             : (double)scale * (m + std::log(s));
        mag[k] = std::fabs((double)scale) * (smax + kmax + std::log((double)n) + 1.0);
      }
    }
  const u32 gx = (u32)(((size_t)outer * inner + lx - 1) / lx), gy = (n + ly - 1) / ly;
  launch(gx, gy, lx, ly, [&](uint2 lt, uint2 tg, uint2 tp) {
    grid_lse_axis_f32(src.data(), kern.data(), dst.data(), outer, n, inner, scale, lt, tg, tp);
  });
  char buf[200];
  std::snprintf(buf, sizeof buf, "grid_lse_axis_f32 outer=%u n=%u inner=%u p=%d scale=%g lanes=(%u,%u)", outer, n,
                inner, p, (double)scale, lx, ly);
  check(buf, dst, ref, mag);
}

static void run_grid_cases(bool quick, uint64_t seed) {
  struct GShape { u32 outer, n, inner; };
  std::vector<GShape> shapes = {{3, 17, 1},  {2, 29, 1},  {1, 1, 1},  {5, 1, 7},   {2, 17, 29}, {1, 29, 17},
                                {2, 29, 5},  {29, 17, 1}, {1, 17, 58}, {3, 1, 1},  {2, 300, 3}, {1, 29, 300}};
  struct Cfg { u32 lx, ly; };
  std::vector<Cfg> cfgs = {{1, 32}, {4, 8}, {32, 2}, {8, 4}, {2, 16}, {64, 1}, {1, 4}};
  if (quick) {
    shapes = {{3, 17, 1}, {2, 17, 29}, {2, 29, 5}};
    cfgs = {{4, 8}, {1, 32}};
  }
  for (const GShape& g : shapes)
    for (int p : {2, 1})
      for (float scale : {1.0f, -0.01f}) {
        if (p == 1 && scale == 1.0f && !quick && g.n > 100) continue;  // (keep the slow shapes short)
        u32 lx, ly;
        grid_recommended(g.n, g.inner, &lx, &ly);
        std::vector<Cfg> cl = {{lx, ly}};
        if (g.n * g.outer * g.inner <= 2000 || quick) cl.insert(cl.end(), cfgs.begin(), cfgs.end());
        for (const Cfg& c : cl) run_grid_case(g.outer, g.n, g.inner, p, scale, c.lx, c.ly, seed++);
      }
  if (!quick) run_grid_case(2, 17, 29, 2, 1.0f, 16, 16, seed++);  // one full 256-thread threadgroup
}

int main() {
  struct Shape { u32 N, M, D, K; };
  std::vector<Shape> shapes = {{17, 29, 1, 3}, {17, 29, 2, 1}, {17, 29, 3, 8}, {17, 29, 4, 11},
                               {17, 29, 5, 3}, {17, 29, 8, 2}, {17, 29, 9, 9}, {13, 300, 3, 2},
                               {5, 7, 1024, 3}};
  const bool quick = std::getenv("HARNESS_QUICK") != nullptr;  // reduced set (ThreadSanitizer run)
  if (quick) shapes = {{17, 29, 3, 8}, {17, 29, 9, 9}, {13, 40, 5, 3}};
  if (OT_TILE_ELEMS < 100u) shapes.push_back({5, 7, 100, 2});  // small-tile build: D > max -> NaN
  struct Cfg { u32 lanes, rows; };
  const Cfg cfgs[] = {{1, 32}, {4, 8}, {32, 2}, {8, 2}};
  uint64_t seed = 1;
  for (const Shape& s : shapes) {
    for (float eps : {0.1f, 1.0f}) {
      Case c = make_case(3, s.N, s.M, s.D, s.K, eps, /*sigma=*/eps * 3.0f, seed++);
      // (every barrier costs a futex round on the CPU: keep the slow shapes to fewer configs)
      std::vector<Cfg> cl(std::begin(cfgs), std::end(cfgs));
      if (s.D > 64 || s.M > 100) cl = {{1, 32}, {4, 8}, {8, 2}};
      if (quick) cl = {{4, 8}, {32, 2}};
      if (s.D > 64 && eps != 1.0f) continue;
      if (s.D == 3 && s.M < 100 && !quick) cl.push_back({16, 16});  // one full 256-thread threadgroup
      for (const Cfg& cfg : cl) {
        auto t0 = std::chrono::steady_clock::now();
        run_case(c, cfg.lanes, cfg.rows);
        if (std::getenv("HARNESS_VERBOSE"))
          std::printf("  D=%u lanes=%u rows=%u: %.2fs\n", s.D, cfg.lanes, cfg.rows,
                      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
    }
  }
  // Block-sparse entry points: D in {1, 2, 3, 5}, several tiles per span with small tiles.
  {
    struct BShape { u32 N, M, D; };
    std::vector<BShape> bshapes = {{23, 37, 1}, {31, 29, 2}, {40, 300, 3}, {17, 29, 5}};
    if (quick) bshapes = {{23, 37, 3}};
    const Cfg bcfgs[] = {{1, 32}, {4, 8}, {32, 2}, {8, 4}};
    for (const BShape& s : bshapes)
      for (float eps : {0.1f, 1.0f}) {
        Case c = make_case(3, s.N, s.M, s.D, 1, eps, eps * 3.0f, seed++);
        for (const Cfg& cfg : bcfgs) {
          if (quick && cfg.lanes == 1) continue;
          run_block_case(c, cfg.lanes, cfg.rows, seed * 7919u + cfg.lanes);
        }
      }
  }
  run_grid_cases(quick, 5000);
  std::printf("metal emulation harness (OT_TILE=%u, OT_TILE_ELEMS=%u): %d checks, %d failed\n", (u32)OT_TILE,
              (u32)OT_TILE_ELEMS, g_checks, g_fail);
  return g_fail ? 1 : 0;
}
