//! Label transfer with entropic transport plans, balanced and unbalanced.
//!
//! A target cloud made of three blobs carries labels (red, green, blue, one-hot); a source
//! cloud made of four blobs of unequal masses does not. The Sinkhorn solver's raw potentials
//! `f_ba`, `g_ab` define the plan `π_ij = a_i b_j exp((f_ba,i + g_ab,j − C(x_i, y_j))/ε)`, and
//! [`TransportPlan::transfer`](candle_ot::TransportPlan::transfer) moves the labels to the
//! source, `l_i = Σ_j π_ij l_j / a_i`, in one streaming pass: the N×M plan is never formed.
//!
//! - Balanced (blur 0.05, scaling 0.9, debias off): every source point receives a full unit
//!   of label mass, so the outlying blob is labelled too, and the heavy blob is split.
//! - Unbalanced (reach 0.2): transporting mass far costs more than dropping it, so the
//!   outlying blob keeps (almost) no label and stays black.
//!
//! ```text
//! cargo run --release --example label_transfer [-- --out DIR]
//! ```

use anyhow::Result;
use candle_core::Tensor;
use candle_ot::{Loss, SamplesLoss};
use candle_ot_examples::{
    gaussian_blob, hex, panel, points_tensor, rgb, rng, tensor_points2, tensor_points3, tensor_vec,
    wrote, Args, FONT,
};
use plotters::prelude::*;

/// The target blobs: centre and colour (the label).
const TARGET: [([f64; 2], [f64; 3]); 3] = [
    ([0.25, 0.70], [0.9, 0.1, 0.1]),
    ([0.45, 0.28], [0.1, 0.75, 0.1]),
    ([0.75, 0.70], [0.1, 0.25, 0.95]),
];

/// The source blobs: centre, standard deviation and share of the points.
const SOURCE: [([f64; 2], f64, f64); 4] = [
    ([0.22, 0.58], 0.075, 0.40),
    ([0.55, 0.38], 0.050, 0.20),
    ([0.68, 0.78], 0.060, 0.25),
    ([0.95, 0.07], 0.025, 0.15),
];

fn main() -> Result<()> {
    run(&Args::parse("label_transfer")?)
}

fn run(args: &Args) -> Result<()> {
    let dev = args.device.clone();
    let (n, m) = if args.quick { (200, 150) } else { (3000, 3000) };

    // Target: three blobs with one-hot labels (M, 3).
    let mut r = rng(7);
    let mut y = Vec::with_capacity(m);
    let mut labels = Vec::with_capacity(m * 3);
    for (k, (c, _)) in TARGET.iter().enumerate() {
        let mk = if k == 2 { m - 2 * (m / 3) } else { m / 3 };
        y.extend(gaussian_blob(&mut r, mk, *c, 0.055));
        for _ in 0..mk {
            labels.extend((0..3).map(|l| if l == k { 1f32 } else { 0. }));
        }
    }
    // Source: four blobs of unequal sizes, the last one far from every target blob.
    let mut x = Vec::with_capacity(n);
    for (k, (c, s, share)) in SOURCE.iter().enumerate() {
        let nk = if k == SOURCE.len() - 1 {
            n - x.len()
        } else {
            (share * n as f64) as usize
        };
        x.extend(gaussian_blob(&mut r, nk, *c, *s));
    }
    let xt = points_tensor(&x, &dev)?; // (N, 2)
    let yt = points_tensor(&y, &dev)?; // (M, 2)
    let lt = Tensor::from_vec(labels, (m, 3), &dev)?; // (M, 3)
    println!("source N = {n}, target M = {m}, three labels");

    // Balanced plan: blur 0.05 (ε = 0.0025), scaling 0.9, raw OT_ε (no debiasing).
    let balanced = SamplesLoss::builder(Loss::Sinkhorn)
        .p(2)
        .blur(0.05)
        .scaling(0.9)
        .debias(false)
        .build()?;
    let sol = balanced.solve(None, &xt, None, &yt)?;
    let plan = sol.plan()?;
    let lab_bal = tensor_points3(&plan.transfer(&lt)?)?; // Σ_j π_ij l_j / a_i, (N, 3)
    let bary = tensor_points2(&plan.barycentric_map()?)?; // Σ_j π_ij y_j / Σ_j π_ij
    let diag = sol.diagnostics.as_ref().expect("sinkhorn");
    println!(
        "balanced:   OT_eps = {:.5}, {} eps steps, total plan mass {:.4}",
        sol.loss.to_scalar::<f32>()?,
        diag.eps_list.len(),
        tensor_vec(&plan.row_marginal()?)?.iter().sum::<f64>()
    );

    // Unbalanced plan: the same, with reach 0.2 (ρ = 0.04): KL penalties on the marginals.
    let unbalanced = SamplesLoss::builder(Loss::Sinkhorn)
        .p(2)
        .blur(0.05)
        .scaling(0.9)
        .debias(false)
        .reach(0.2)
        .build()?;
    let sol_u = unbalanced.solve(None, &xt, None, &yt)?;
    let plan_u = sol_u.plan()?;
    let lab_unb = tensor_points3(&plan_u.transfer(&lt)?)?;
    let mass_u = tensor_vec(&plan_u.row_marginal()?)?;
    println!(
        "unbalanced: OT_eps = {:.5}, total plan mass {:.4}",
        sol_u.loss.to_scalar::<f32>()?,
        mass_u.iter().sum::<f64>()
    );
    // How much label each blob of the source receives (1 = fully labelled).
    let mut start = 0;
    for (k, (_, _, share)) in SOURCE.iter().enumerate() {
        let nk = if k == SOURCE.len() - 1 {
            n - start
        } else {
            (share * n as f64) as usize
        };
        let mean = |l: &[[f64; 3]]| {
            l[start..start + nk]
                .iter()
                .map(|v| v.iter().sum::<f64>())
                .sum::<f64>()
                / nk as f64
        };
        println!(
            "  source blob {k}: label mass received {:.3} (balanced), {:.3} (unbalanced)",
            mean(&lab_bal),
            mean(&lab_unb)
        );
        start += nk;
    }

    // The figure: 2 × 2 panels.
    let path = args.path("label_transfer.png");
    let root = BitMapBackend::new(&path, (1200, 1240)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        "Label transfer through entropic OT plans (blur 0.05, scaling 0.9)",
        (FONT, 28),
    )?;
    let areas = root.split_evenly((2, 2));
    let target_colour = |j: usize| {
        let k = (j * 3) / m.max(1); // blobs are stored one after the other
        let c = TARGET[k.min(2)].1;
        rgb(c[0], c[1], c[2])
    };
    let range = -0.05..1.05;

    // 1. The data.
    let mut c = panel(
        &areas[0],
        "source (grey) and labelled target",
        range.clone(),
        range.clone(),
        22,
    )?;
    c.draw_series(
        x.iter()
            .map(|p| Circle::new((p[0], p[1]), 2, hex("#777777").filled())),
    )?;
    c.draw_series(
        y.iter()
            .enumerate()
            .map(|(j, p)| Circle::new((p[0], p[1]), 2, target_colour(j).filled())),
    )?;

    // 2 and 3: the source coloured by the labels it receives.
    for (area, title, lab) in [
        (&areas[1], "balanced plan: transferred labels", &lab_bal),
        (
            &areas[2],
            "unbalanced plan (reach 0.2): far points stay black",
            &lab_unb,
        ),
    ] {
        let mut c = panel(area, title, range.clone(), range.clone(), 22)?;
        c.draw_series(
            y.iter()
                .enumerate()
                .map(|(j, p)| Circle::new((p[0], p[1]), 1, target_colour(j).mix(0.15).filled())),
        )?;
        c.draw_series(
            x.iter()
                .zip(lab.iter())
                .map(|(p, l)| Circle::new((p[0], p[1]), 2, rgb(l[0], l[1], l[2]).filled())),
        )?;
    }

    // 4. The balanced plan's barycentric map, on a subsample.
    let mut c = panel(
        &areas[3],
        "balanced plan: barycentric map x ↦ Σπy / Σπ",
        range.clone(),
        range,
        22,
    )?;
    c.draw_series(
        y.iter()
            .enumerate()
            .map(|(j, p)| Circle::new((p[0], p[1]), 1, target_colour(j).mix(0.15).filled())),
    )?;
    let every = (n / 300).max(1);
    c.draw_series((0..n).step_by(every).map(|i| {
        let l = lab_bal[i];
        PathElement::new(
            vec![(x[i][0], x[i][1]), (bary[i][0], bary[i][1])],
            rgb(l[0], l[1], l[2]).mix(0.7).stroke_width(1),
        )
    }))?;
    c.draw_series(
        (0..n)
            .step_by(every)
            .map(|i| Circle::new((x[i][0], x[i][1]), 2, hex("#555555").filled())),
    )?;
    root.present()?;
    wrote(&path);
    println!("figures in {}", args.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn quick_run_writes_the_figure() -> anyhow::Result<()> {
        let dir = candle_ot_examples::test_out("label_transfer");
        super::run(&candle_ot_examples::Args::with(dir.clone(), true)?)?;
        assert!(dir.join("label_transfer.png").metadata()?.len() > 1000);
        std::fs::remove_dir_all(dir)?;
        Ok(())
    }
}
