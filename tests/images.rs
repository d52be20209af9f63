//! `ImagesLoss` on grids: GeomLoss 0.3.1's grid reference cases (`tests/data/reference/grid/`,
//! f64 and f32), the convergence oracle on grids GeomLoss refuses (non-square, odd sizes,
//! anisotropic domains: converged `ImagesLoss` = converged `SamplesLoss` on the pixel cloud,
//! p = 2; the dense L1 twin, p = 1), finite-difference gradients, and input validation.
//!
//! Metric: max|got − ref| / max|ref| over the whole tensor. Potentials and gradients are
//! compared after removing their mean per batch item (balanced potentials are defined up to a
//! constant), as the reference README says.

#[macro_use]
mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_ot::images::ImagesLoss;
use candle_ot::internals::{
    sinkhorn_multilevel, CostSet, Level, Multilevel, Refined, SoftminLevel,
};
use candle_ot::sinkhorn::{DualPotentials, LoopParams};
use candle_ot::softmin::grid::{self, GridCost};
use candle_ot::softmin::Softmin;
use candle_ot::{Loss, SamplesLoss};
use common::rel_err;
use std::path::PathBuf;

/// The README's tolerances: f64 everything; f32 (loss, potentials/gradients) for p = 2, p = 1.
const TOL_F64: f64 = 1e-6;
const TOL_F32_P2: (f64, f64) = (1e-5, 1e-4);
const TOL_F32_P1: (f64, f64) = (1e-3, 1e-2);
/// Converged ImagesLoss against converged SamplesLoss / the dense twin (f64).
const TOL_CONVERGED: f64 = 1e-8;

struct Case {
    name: String,
    params: serde_json::Value,
    t: std::collections::HashMap<String, Tensor>,
}

fn grid_cases() -> Vec<Case> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/reference/grid");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/data/reference/grid exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    let mut out = Vec::new();
    for p in paths {
        let bytes = std::fs::read(&p).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().clone().unwrap_or_default();
        if meta.get("kind").map(|s| s.as_str()) != Some("grid") {
            continue;
        }
        let params: serde_json::Value = serde_json::from_str(&meta["params"]).unwrap();
        let t = candle_core::safetensors::load(&p, &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
        out.push(Case {
            name: p.file_stem().unwrap().to_string_lossy().into(),
            params,
            t,
        });
    }
    assert!(
        out.len() >= 8,
        "expected the 8 public grid cases, found {}",
        out.len()
    );
    out
}

fn loss_of(params: &serde_json::Value, dims: usize) -> ImagesLoss {
    let f = |k: &str| params.get(k).and_then(|v| v.as_f64());
    ImagesLoss::builder(dims)
        .p(params["p"].as_u64().unwrap() as u32)
        .blur(f("blur"))
        .reach(f("reach"))
        .scaling(f("scaling").unwrap())
        .debias(params["debias"].as_bool().unwrap())
        .build()
        .unwrap()
}

/// Mean over the grid axes removed, per batch item: t (B, grid…).
fn centered(t: &Tensor) -> Tensor {
    let b = t.dim(0).unwrap();
    let flat = t.reshape((b, ())).unwrap();
    flat.broadcast_sub(&flat.mean_keepdim(1).unwrap()).unwrap()
}

/// Every grid case through `ImagesLoss`; returns the errors (loss, potentials + gradients).
fn run_case(c: &Case, dtype: DType) -> Result<(f64, f64)> {
    let dims = c.params["shape"].as_array().unwrap().len();
    let loss = loss_of(&c.params, dims);
    let a = Var::from_tensor(&c.t["a"].to_dtype(dtype)?)?;
    let b = Var::from_tensor(&c.t["b"].to_dtype(dtype)?)?;
    let sol = loss.solve(&a, &b)?;
    let grads = sol.loss.sum_all()?.backward()?;
    let (ga, gb) = (grads.get(&a).unwrap(), grads.get(&b).unwrap());
    let e_loss = rel_err(&sol.loss, &c.t["loss"]);
    let mut e_pot: f64 = 0.0;
    for (got, key) in [(&sol.f, "F"), (&sol.g, "G")] {
        e_pot = e_pot.max(rel_err(&centered(got), &centered(&c.t[key])));
    }
    // GeomLoss's unbalanced gradient is (ρ + ε/2)(e^{−f_aa/ρ} − e^{−f_ba/ρ}); the exact one
    // (ours) is (ρ + ε)(…): compare ours with the reference times (ρ + ε)/(ρ + ε/2).
    let factor = match c.params["reach"].as_f64() {
        None => 1.0,
        Some(r) => {
            let p = c.params["p"].as_u64().unwrap() as i32;
            let (rho, eps) = (r.powi(p), sol.eps);
            (rho + eps) / (rho + eps / 2.0)
        }
    };
    for (got, key) in [(ga, "grad_a"), (gb, "grad_b")] {
        let want = (&c.t[key] * factor)?;
        let (g, w) = if c.params["reach"].is_null() {
            (centered(got), centered(&want))
        } else {
            (got.clone(), want)
        };
        e_pot = e_pot.max(rel_err(&g, &w));
    }
    Ok((e_loss, e_pot))
}

#[test]
fn grid_reference_cases_f64() -> Result<()> {
    let mut failures = Vec::new();
    for c in grid_cases() {
        let (el, ep) = run_case(&c, DType::F64)?;
        eprintln!(
            "{:45} f64 loss {el:.2e} potentials/gradients {ep:.2e}",
            c.name
        );
        if el > TOL_F64 || ep > TOL_F64 {
            failures.push(format!(
                "{}: loss {el:.2e}, potentials/gradients {ep:.2e}",
                c.name
            ));
        }
    }
    assert!(failures.is_empty(), "beyond {TOL_F64:e}: {failures:#?}");
    Ok(())
}

#[test]
fn grid_reference_cases_f32() -> Result<()> {
    let mut failures = Vec::new();
    for c in grid_cases() {
        let (el, ep) = run_case(&c, DType::F32)?;
        let (tl, tp) = if c.params["p"].as_u64() == Some(1) {
            TOL_F32_P1
        } else {
            TOL_F32_P2
        };
        eprintln!(
            "{:45} f32 loss {el:.2e} potentials/gradients {ep:.2e}",
            c.name
        );
        if el > tl || ep > tp {
            failures.push(format!(
                "{}: loss {el:.2e} (tol {tl:e}), potentials/gradients {ep:.2e} (tol {tp:e})",
                c.name
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    Ok(())
}

/// A positive random density (B, grid…) summing to 1 per item, with some exact zeros.
fn density(rng: &mut rand_chacha::ChaCha8Rng, shape: &[usize], zeros: bool) -> Result<Tensor> {
    let t = common::rand_tensor(rng, shape, 0.0, 1.0)?;
    let t = if zeros {
        // Zero every pixel below 0.2 (about a fifth of them).
        (t.ge(0.2)?.to_dtype(DType::F64)? * &t)?
    } else {
        t
    };
    common::normalised(&t)
}

/// Converged ImagesLoss (p = 2) against converged SamplesLoss on the pixel coordinates with
/// the pixel masses as weights: non-square, odd sizes, an anisotropic domain, debias on and
/// off, balanced and unbalanced.
#[test]
fn converged_images_loss_equals_converged_samples_loss_on_pixels() -> Result<()> {
    let mut rng = common::rng(7);
    /// (shape, axes, reach, debias, blur)
    type Converged<'a> = (
        &'a [usize],
        Option<&'a [(f64, f64)]>,
        Option<f64>,
        bool,
        Option<f64>,
    );
    let cases: &[Converged] = &[
        (&[2, 9, 13], None, None, true, Some(0.08)),
        (
            &[1, 17, 6],
            Some(&[(0.0, 2.0), (-1.0, 0.5)]),
            None,
            false,
            Some(0.15),
        ),
        (&[1, 11, 7], None, Some(0.5), true, None),
        (
            &[1, 5, 6, 7],
            Some(&[(0.0, 1.0), (0.0, 1.5), (0.0, 0.7)]),
            None,
            true,
            Some(0.2),
        ),
    ];
    for &(shape, axes, reach, debias, blur) in cases {
        let dims = shape.len() - 1;
        let a = density(&mut rng, shape, true)?;
        let b = density(&mut rng, shape, false)?;
        let mut il = ImagesLoss::builder(dims)
            .reach(reach)
            .debias(debias)
            .blur(blur)
            .scaling(0.7)
            .tol(1e-13);
        if let Some(ax) = axes {
            il = il.axes(ax);
        }
        let il = il.build()?;
        let sol = il.solve(&a, &b)?;
        assert_eq!(sol.diagnostics.converged, Some(true), "{shape:?}");
        // The same problem on the pixel cloud.
        let extent: Vec<f64> = match axes {
            Some(ax) => ax.iter().map(|(l, h)| h - l).collect(),
            None => vec![1.0; dims],
        };
        let grid = &shape[1..];
        let spacing: Vec<f64> = extent
            .iter()
            .zip(grid)
            .map(|(e, n)| e / *n as f64)
            .collect();
        let x = grid::pixel_coordinates(grid, &spacing, &Device::Cpu)?; // (N, D)
        let bsz = shape[0];
        let x = x.unsqueeze(0)?.repeat((bsz, 1, 1))?; // (B, N, D)
        let sl = SamplesLoss::builder(Loss::Sinkhorn)
            .p(2)
            .blur(sol.blur)
            .reach(reach)
            .debias(debias)
            .scaling(0.7)
            .tol(1e-13)
            .build()?;
        let flat = |t: &Tensor| t.reshape((bsz, ())).unwrap();
        let ps = sl.solve(Some(&flat(&a)), &x, Some(&flat(&b)), &x)?;
        let e_loss = rel_err(&sol.loss, &ps.loss);
        let e_f = rel_err(&centered(&sol.f), &centered(&ps.f));
        let e_g = rel_err(&centered(&sol.g), &centered(&ps.g));
        eprintln!("{shape:?} axes {axes:?} reach {reach:?} debias {debias}: loss {e_loss:.1e} F {e_f:.1e} G {e_g:.1e}");
        assert!(
            e_loss < TOL_CONVERGED && e_f < TOL_CONVERGED && e_g < TOL_CONVERGED,
            "{shape:?}: loss {e_loss:e} F {e_f:e} G {e_g:e}"
        );
    }
    Ok(())
}

/// The dense twin of the grid softmin, as a `Softmin` (the p = 1 oracle: the L1 cost has no
/// point-cloud counterpart in SamplesLoss).
struct DenseGrid;

impl Softmin for DenseGrid {
    type Cost = GridCost;
    fn softmin(&self, eps: f64, c: &GridCost, h: &Tensor) -> Result<Tensor> {
        grid::softmin_dense(eps, c, h)
    }
}

struct OneLevel<'a>(Option<Box<dyn Level + 'a>>);

impl<'a> Multilevel<'a> for OneLevel<'a> {
    fn jumps(&self, _: &[f64]) -> Vec<usize> {
        vec![]
    }
    fn first(&mut self) -> Result<Box<dyn Level + 'a>> {
        Ok(self.0.take().unwrap())
    }
    fn refine(
        &mut self,
        _: usize,
        _: &dyn Level,
        _: &DualPotentials,
        _: f64,
    ) -> Result<Refined<'a>> {
        unreachable!("no jump")
    }
}

/// Converged p = 1 (L1) ImagesLoss against a converged single-level loop on the dense L1 twin.
#[test]
fn converged_l1_images_loss_equals_the_dense_l1_twin() -> Result<()> {
    let mut rng = common::rng(11);
    for shape in [&[1usize, 7, 12][..], &[2, 10, 9]] {
        let a = density(&mut rng, shape, true)?;
        let b = density(&mut rng, shape, false)?;
        let il = ImagesLoss::builder(2)
            .p(1)
            .blur(0.1)
            .scaling(0.7)
            .tol(1e-13)
            .build()?;
        let sol = il.solve(&a, &b)?;
        let spacing: Vec<f64> = shape[1..].iter().map(|n| 1.0 / *n as f64).collect();
        let cost = GridCost { p: 1, spacing };
        let level = SoftminLevel {
            softmin: &DenseGrid,
            costs: CostSet {
                xy: cost.clone(),
                yx: cost.clone(),
                xx: Some(cost.clone()),
                yy: Some(cost.clone()),
            },
            log_a: a.log()?,
            log_b: b.log()?,
            track: Box::new(|_, _| Ok(None)),
        };
        let params = LoopParams {
            eps_list: sol.diagnostics.eps_list.clone(),
            rho: None,
            debias: true,
            tol: Some(1e-13),
            max_iter: 1000,
            acceleration: candle_ot::Acceleration::Overrelaxation,
            observer: None,
        };
        let (pot, diag) = sinkhorn_multilevel(&mut OneLevel(Some(Box::new(level))), &params)?;
        assert_eq!(diag.converged, Some(true));
        let f = (&pot.f_ba - pot.f_aa.as_ref().unwrap())?;
        let e_f = rel_err(&centered(&sol.f), &centered(&f));
        let bsz = shape[0];
        let scal =
            |w: &Tensor, p: &Tensor| (w * p).unwrap().reshape((bsz, ())).unwrap().sum(1).unwrap();
        let g = (&pot.g_ab - pot.g_bb.as_ref().unwrap())?;
        let value = (scal(&a, &f) + scal(&b, &g))?;
        let e_loss = rel_err(&sol.loss, &value);
        eprintln!("{shape:?}: loss {e_loss:.1e} F {e_f:.1e}");
        assert!(
            e_loss < TOL_CONVERGED && e_f < TOL_CONVERGED,
            "{shape:?}: {e_loss:e} {e_f:e}"
        );
    }
    Ok(())
}

/// #19 on grids: every acceleration reaches the plain loop's converged value; an observer stops
/// the `tol` iterations, and `require_convergence` turns an unconverged solve into an error.
#[test]
fn images_tol_accelerations_and_convergence_control() -> Result<()> {
    use candle_ot::{Acceleration, Observer, Phase};
    use std::ops::ControlFlow;
    let mut r = common::rng(21);
    let a = density(&mut r, &[17, 29], false)?;
    let b = density(&mut r, &[17, 29], true)?;
    let solve = |acc: Acceleration| -> Result<(f64, usize)> {
        let s = ImagesLoss::builder(2)
            .blur(0.05)
            .tol(1e-10)
            .max_iter(100_000)
            .acceleration(acc)
            .build()?
            .solve(&a, &b)?;
        assert_eq!(s.diagnostics.converged, Some(true), "{acc}");
        Ok((common::scalar(&s.loss), s.diagnostics.extra_iterations))
    };
    let (plain, plain_iters) = solve(Acceleration::Plain)?;
    for acc in [Acceleration::Anderson, Acceleration::Overrelaxation] {
        let (v, iters) = solve(acc)?;
        assert!(((v - plain) / plain).abs() < 1e-9, "{acc}: {v} vs {plain}");
        assert!(
            iters < plain_iters,
            "{acc}: {iters} vs {plain_iters} iterations"
        );
    }
    let stop = Observer::new(|p| match p.phase {
        Phase::Tol { iteration, .. } if iteration >= 3 => ControlFlow::Break(()),
        _ => ControlFlow::Continue(()),
    });
    let builder = ImagesLoss::builder(2).blur(0.05).tol(1e-12).observer(stop);
    let d = builder.clone().build()?.solve(&a, &b)?.diagnostics;
    assert_eq!(
        (d.converged, d.stopped, d.extra_iterations),
        (Some(false), true, 3)
    );
    let e = builder
        .require_convergence(true)
        .build()?
        .solve(&a, &b)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not converged"), "{e}");
    Ok(())
}
