//! The losses inside Candle training graphs: `Var`s, `backward()`, candle-nn optimizers, and
//! gradients flowing through upstream ops.

#[allow(unused_macros)]
mod common;

use candle_core::{DType, Device, Module, Result, Tensor, Var, D};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW, SGD};
use candle_ot::{Backend, Loss, SamplesLoss};
use common::rand_tensor;
use rand::SeedableRng;

/// Wasserstein gradient flow: x ← x − lr · ∇_x S / a_i moves a cloud onto its target.
#[test]
fn point_cloud_flows_to_its_target_with_sgd() -> Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let n = 64;
    let x0 = rand_tensor(&mut rng, &[n, 2], 0.0, 0.5)?.to_dtype(DType::F32)?;
    let y = rand_tensor(&mut rng, &[n, 2], 0.5, 1.0)?.to_dtype(DType::F32)?;
    let x = Var::from_tensor(&x0)?;
    let loss = SamplesLoss::builder(Loss::Sinkhorn).blur(0.02).build()?;
    let start = loss.forward(&x, &y)?.to_scalar::<f32>()?;
    // The gradient is a_i ∇F(x_i) with a_i = 1/N: scale the step by N.
    let mut sgd = SGD::new(vec![x.clone()], 0.5 * n as f64)?;
    for _ in 0..60 {
        let l = loss.forward(&x, &y)?;
        sgd.backward_step(&l)?;
    }
    let end = loss.forward(&x, &y)?.to_scalar::<f32>()?;
    assert!(
        end.is_finite() && end < 0.02 * start,
        "S went from {start} to {end}"
    );
    Ok(())
}

/// An affine map fitted by AdamW recovers the known answer.
#[test]
fn affine_map_is_recovered_with_adamw() -> Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let n = 80;
    let x = rand_tensor(&mut rng, &[n, 2], -1.0, 1.0)?;
    // A non-symmetric cloud (a stretched, sheared square) so that the map is identifiable.
    let stretch = Tensor::new(&[[1.0f64, 0.0], [0.3, 0.5]], &Device::Cpu)?;
    let x = x.matmul(&stretch)?;
    let a_true = Tensor::new(&[[0.8f64, -0.3], [0.2, 1.1]], &Device::Cpu)?;
    let t_true = Tensor::new(&[0.4f64, -0.2], &Device::Cpu)?;
    let y = x.matmul(&a_true)?.broadcast_add(&t_true)?;
    let a = Var::from_tensor(&Tensor::eye(2, DType::F64, &Device::Cpu)?)?;
    let t = Var::zeros(2, DType::F64, &Device::Cpu)?;
    let loss = SamplesLoss::builder(Loss::Sinkhorn)
        .blur(0.01)
        .scaling(0.7)
        .build()?;
    let params = ParamsAdamW {
        lr: 0.02,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = AdamW::new(vec![a.clone(), t.clone()], params)?;
    for _ in 0..400 {
        let z = x.matmul(&a)?.broadcast_add(&t)?;
        let l = loss.forward(&z, &y)?;
        opt.backward_step(&l)?;
    }
    let err_a = (a.as_tensor() - &a_true)?
        .abs()?
        .max(0)?
        .max(0)?
        .to_scalar::<f64>()?;
    let err_t = (t.as_tensor() - &t_true)?
        .abs()?
        .max(0)?
        .to_scalar::<f64>()?;
    assert!(
        err_a < 0.03 && err_t < 0.03,
        "A error {err_a}, t error {err_t}"
    );
    Ok(())
}

/// A small MLP deformation trained with AdamW lowers the divergence a lot.
#[test]
fn mlp_deformation_trains() -> Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let n = 60;
    let x = rand_tensor(&mut rng, &[n, 3], 0.0, 1.0)?.to_dtype(DType::F32)?;
    let y = ((x.clone() * 1.5)? + 0.3)?;
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let l1 = candle_nn::linear(3, 16, vb.pp("l1"))?;
    let l2 = candle_nn::linear(16, 3, vb.pp("l2"))?;
    let f = |x: &Tensor| -> Result<Tensor> { x + l2.forward(&l1.forward(x)?.tanh()?)? };
    let loss = SamplesLoss::builder(Loss::Sinkhorn).blur(0.05).build()?;
    let start = loss.forward(&f(&x)?, &y)?.to_scalar::<f32>()?;
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: 0.01,
            ..Default::default()
        },
    )?;
    for _ in 0..150 {
        let l = loss.forward(&f(&x)?, &y)?;
        opt.backward_step(&l)?;
    }
    let end = loss.forward(&f(&x)?, &y)?.to_scalar::<f32>()?;
    assert!(end < 0.1 * start, "S went from {start} to {end}");
    Ok(())
}

/// Gradients flow through upstream ops: x = f(θ) and weights = softmax(logits); checked
/// against central finite differences in f64 (kernel loss: exact gradients, no schedule).
#[test]
fn gradients_flow_through_upstream_ops() -> Result<()> {
    const FD_STEP: f64 = 1e-6;
    const TOL: f64 = 1e-6;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let (n, m) = (9, 11);
    let base = rand_tensor(&mut rng, &[n, 2], 0.0, 1.0)?;
    let y = rand_tensor(&mut rng, &[m, 2], 0.0, 1.0)?;
    let theta0 = rand_tensor(&mut rng, &[1, 2], -0.5, 0.5)?;
    let logits0 = rand_tensor(&mut rng, &[1, n], -1.0, 1.0)?.squeeze(0)?;
    for (loss_kind, backend) in [
        (Loss::Gaussian, Backend::Online),
        (Loss::Energy, Backend::Tensorized),
        (Loss::Sinkhorn, Backend::Online),
    ] {
        let loss = SamplesLoss::builder(loss_kind)
            .blur(0.3)
            .backend(backend)
            .tol(1e-13)
            .max_iter(100_000)
            .build()?;
        let value = |theta: &Tensor, logits: &Tensor| -> Result<Tensor> {
            let x = base.broadcast_mul(&theta.exp()?)?.sin()?; // x = sin(base · e^θ)
            let a = candle_nn::ops::softmax(logits, D::Minus1)?;
            let b = Tensor::full(1.0 / m as f64, m, &Device::Cpu)?;
            loss.forward_weighted(&a, &x, &b, &y)
        };
        let theta = Var::from_tensor(&theta0)?;
        let logits = Var::from_tensor(&logits0)?;
        let grads = value(&theta, &logits)?.backward()?;
        for (name, var, t0) in [("theta", &theta, &theta0), ("logits", &logits, &logits0)] {
            let g = grads
                .get(var)
                .expect("gradient")
                .flatten_all()?
                .to_vec1::<f64>()?;
            let flat = t0.flatten_all()?.to_vec1::<f64>()?;
            for k in 0..flat.len() {
                let shifted = |s: f64| -> Result<f64> {
                    let mut v = flat.clone();
                    v[k] += s;
                    let t = Tensor::from_vec(v, t0.dims(), &Device::Cpu)?;
                    let r = if name == "theta" {
                        value(&t, &logits0)?
                    } else {
                        value(&theta0, &t)?
                    };
                    r.to_scalar::<f64>()
                };
                let fd = (shifted(FD_STEP)? - shifted(-FD_STEP)?) / (2.0 * FD_STEP);
                let scale = g.iter().fold(0f64, |s, v| s.max(v.abs()));
                assert!(
                    (g[k] - fd).abs() <= TOL * scale.max(1e-8) + 1e-9,
                    "{loss_kind:?} d/d{name}[{k}]: autograd {} vs finite differences {fd}",
                    g[k]
                );
            }
        }
    }
    Ok(())
}
