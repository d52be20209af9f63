//! `cargo bench -p candle-ot`: one streaming softmin pass, `f_i = −ε log Σ_j exp(h_j − C_ij/ε)`,
//! on the CPU, f32, p = 2, N = M = 4096, for D ∈ {1, 2, 3, 8, 64}; and one grid softmin
//! (`softmin::grid`, images 256² and 512², a 64³ volume) at ε = (one pixel)² with
//! `h = log a + g/ε` from a smooth potential, as in the loop's last iterations. Throughput is
//! reported in pairs per second (criterion's "elements"): point pairs (i, j), and for grids the
//! pixel pairs `N · Σ_k n_k` of the separable passes (before the exact truncation).

use candle_core::{DType, Device, Tensor};
use candle_ot::softmin::online::softmin;
use candle_ot::CostKind;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn bench_softmin(c: &mut Criterion) {
    let dev = Device::Cpu;
    let (n, m) = (4096usize, 4096usize);
    let mut group = c.benchmark_group("softmin_sqeuclidean_f32");
    group.sample_size(10);
    for d in [1usize, 2, 3, 8, 64] {
        let x = Tensor::rand(0f32, 1., (1, n, d), &dev).unwrap();
        let y = Tensor::rand(0f32, 1., (1, m, d), &dev).unwrap();
        let h = Tensor::full(-(m as f32).ln(), (1, m), &dev).unwrap();
        group.throughput(Throughput::Elements((n * m) as u64));
        group.bench_with_input(BenchmarkId::from_parameter(d), &d, |bencher, _| {
            bencher.iter(|| {
                let f = softmin(CostKind::SqEuclidean, 0.0025, &x, &y, &h).unwrap();
                assert_eq!(f.dtype(), DType::F32);
                f
            })
        });
    }
    group.finish();
}

fn bench_grid_softmin(c: &mut Criterion) {
    use candle_ot::softmin::grid::{softmin as grid_softmin, GridCost};
    let dev = Device::Cpu;
    let mut group = c.benchmark_group("grid_softmin_f32");
    group.sample_size(10);
    for shape in [vec![256usize, 256], vec![512, 512], vec![64, 64, 64]] {
        let n: usize = shape.iter().product();
        let spacing: Vec<f64> = shape.iter().map(|k| 1.0 / *k as f64).collect();
        let eps = spacing[0] * spacing[0];
        let cost = GridCost { p: 2, spacing };
        let mut full = vec![1usize];
        full.extend_from_slice(&shape);
        // log of a random density plus g/ε for g = ½|x − c|² (a translation's potential).
        let a = Tensor::rand(0.5f32, 1.5, full.as_slice(), &dev).unwrap();
        let a = a.broadcast_div(&a.sum_all().unwrap()).unwrap();
        let x = candle_ot::softmin::grid::pixel_coordinates(&shape, &cost.spacing, &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(); // (N, D)
        let g = ((x - 0.4).unwrap().sqr().unwrap().sum(1).unwrap() * (0.5 / eps))
            .unwrap()
            .reshape(full.as_slice())
            .unwrap();
        let h = (a.log().unwrap() + g).unwrap();
        let label = shape
            .iter()
            .map(|k| k.to_string())
            .collect::<Vec<_>>()
            .join("x");
        group.throughput(Throughput::Elements(
            (n * shape.iter().sum::<usize>()) as u64,
        ));
        group.bench_with_input(BenchmarkId::from_parameter(label), &h, |bencher, h| {
            bencher.iter(|| grid_softmin(eps, &cost, h).unwrap())
        });
    }
    group.finish();
}

/// The multiscale set-up of one debiased solve (issue #15 item 3): clustering both clouds and
/// truncating C_xy, C_xx, C_yy, N = M = 100k uniform points in the unit cube, f32, clusters at
/// 0.05 (`Auto`'s `cluster_scale = blur`: 8000 voxels), ε = 0.05², truncate 5. Variants: the
/// host code of before #15 (`host`), today's CPU default (keys and sums as tensor ops, host
/// truncation: `keys+host_truncation`), and the GPU path run on the CPU (`all_tensor_ops`).
fn bench_multiscale_setup(c: &mut Criterion) {
    use candle_ot::internals::multiscale_setup;
    let dev = Device::Cpu;
    let n = 100_000usize;
    let x = Tensor::rand(0f32, 1., (1, n, 3), &dev).unwrap();
    let y = Tensor::rand(0f32, 1., (1, n, 3), &dev).unwrap();
    let w = Tensor::full(1.0 / n as f32, (1, n), &dev).unwrap();
    let mut group = c.benchmark_group("multiscale_setup_100k");
    group.sample_size(10);
    group.throughput(Throughput::Elements(2 * n as u64));
    let mut kept = Vec::new();
    for (name, host_clustering, on_device) in [
        ("host", true, false),
        ("keys+host_truncation", false, false),
        ("all_tensor_ops", false, true),
    ] {
        group.bench_function(name, |bencher| {
            bencher.iter(|| {
                let k = multiscale_setup(
                    CostKind::SqEuclidean,
                    &x,
                    &w,
                    &y,
                    &w,
                    0.05,
                    0.0025,
                    5.0,
                    host_clustering,
                    on_device,
                )
                .unwrap();
                kept.push(k);
                k
            })
        });
    }
    group.finish();
    // Every variant keeps the same pairs.
    assert!(kept.windows(2).all(|w| w[0] == w[1]), "{kept:?}");
}

criterion_group!(
    benches,
    bench_softmin,
    bench_grid_softmin,
    bench_multiscale_setup
);
criterion_main!(benches);
