//! `cargo bench -p candle-ot`: one streaming softmin pass, `f_i = −ε log Σ_j exp(h_j − C_ij/ε)`,
//! on the CPU, f32, p = 2, N = M = 4096, for D ∈ {1, 2, 3, 8, 64}. Throughput is reported in
//! pairs (i, j) per second (criterion's "elements").

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

criterion_group!(benches, bench_softmin);
criterion_main!(benches);
