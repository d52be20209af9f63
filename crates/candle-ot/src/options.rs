//! Options of [`crate::SamplesLoss`]: GeomLoss's names, defaults and meanings, as a typed
//! builder validated at build time.

use crate::error::opt_err;
use candle_core::Result;

/// Which loss [`crate::SamplesLoss`] computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum Loss {
    /// The Sinkhorn divergence `S_ε` (debiased, the default) or the raw `OT_ε`.
    #[default]
    Sinkhorn,
    /// The Hausdorff divergence built on the softmin at ε = blur^p.
    Hausdorff,
    /// The energy distance, kernel `k(x, y) = −|x − y|`.
    Energy,
    /// The Gaussian kernel norm, `k(x, y) = exp(−|x − y|² / 2σ²)`, σ = blur.
    Gaussian,
    /// The Laplacian kernel norm, `k(x, y) = exp(−|x − y| / σ)`, σ = blur.
    Laplacian,
}

impl Loss {
    /// GeomLoss's name of the loss.
    pub fn name(self) -> &'static str {
        match self {
            Loss::Sinkhorn => "sinkhorn",
            Loss::Hausdorff => "hausdorff",
            Loss::Energy => "energy",
            Loss::Gaussian => "gaussian",
            Loss::Laplacian => "laplacian",
        }
    }

    /// Whether this is a kernel-norm loss (energy, gaussian, laplacian).
    pub fn is_kernel(self) -> bool {
        matches!(self, Loss::Energy | Loss::Gaussian | Loss::Laplacian)
    }
}

impl std::str::FromStr for Loss {
    type Err = candle_core::Error;
    /// GeomLoss's names, case-insensitive (`"Sinkhorn"`, `"SINKHORN"`).
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "sinkhorn" => Loss::Sinkhorn,
            "hausdorff" => Loss::Hausdorff,
            "energy" => Loss::Energy,
            "gaussian" => Loss::Gaussian,
            "laplacian" => Loss::Laplacian,
            _ => {
                return opt_err(
                    "loss",
                    format!(
                        "expected sinkhorn, hausdorff, energy, gaussian or laplacian, got {s:?}"
                    ),
                )
            }
        })
    }
}

impl std::fmt::Display for Loss {
    /// GeomLoss's name (`sinkhorn`, …), which `parse` reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How the reductions over all pairs (x_i, y_j) are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum Backend {
    /// Picks `Online` where its kernels are compiled in, else `Tensorized`; on the CPU and on
    /// CUDA, `Multiscale` for the Sinkhorn loss in f32 with no `tol`, D ≤ 3 and `B·N·M` at
    /// least the measured crossover ([`crate::samples_loss::auto_multiscale_pairs`]: 10⁹ on
    /// the CPU, 4·10¹⁰ on CUDA), with `cluster_scale = blur` unless set.
    #[default]
    Auto,
    /// Dense N×M matrices with Candle tensor ops; any device; O(N·M·D) memory.
    Tensorized,
    /// Streaming custom ops; O((N + M)·D) memory.
    Online,
    /// Coarse-to-fine: ε-scaling on voxel-grid cluster centroids, then kernel truncation and
    /// block-sparse streaming softmins on the points (GeomLoss's `multiscale`). D ≤ 3; on the
    /// CPU, and on CUDA / Metal where the online kernels are compiled in (the clustering runs
    /// on the host); the kernel and Hausdorff losses run on `Online` instead.
    Multiscale,
}

impl Backend {
    /// The backend's name (`auto`, `tensorized`, `online`, `multiscale`).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Tensorized => "tensorized",
            Backend::Online => "online",
            Backend::Multiscale => "multiscale",
        }
    }
}

impl std::fmt::Display for Backend {
    /// The backend's name, which `parse` reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Backend {
    type Err = candle_core::Error;
    /// The backend's name, case-insensitive.
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => Backend::Auto,
            "tensorized" => Backend::Tensorized,
            "online" => Backend::Online,
            "multiscale" => Backend::Multiscale,
            _ => {
                return opt_err(
                    "backend",
                    format!("expected auto, tensorized, online or multiscale, got {s:?}"),
                )
            }
        })
    }
}

/// The validated options of a [`crate::SamplesLoss`].
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SamplesLossOptions {
    /// The loss.
    pub loss: Loss,
    /// Exponent of the cost `|x − y|^p / p`: 1 or 2. Default 2.
    pub p: u32,
    /// Blur σ: ε = σ^p for Sinkhorn and Hausdorff, the kernel width for kernel losses.
    /// Default 0.05.
    pub blur: f64,
    /// Reach: `None` for balanced OT (default), else the unbalanced OT with ρ = reach^p.
    pub reach: Option<f64>,
    /// Diameter of the data for the ε schedule; `None` (default) estimates it from the data.
    pub diameter: Option<f64>,
    /// Ratio between successive ε of the schedule, in (0, 1). Default 0.5.
    pub scaling: f64,
    /// Multiscale kernel truncation (in units of ε): the block (I, J) is kept when
    /// `f̄_I + ḡ_J > C(x̄_I, ȳ_J) − truncate·ε` at the jump. Default 5.
    pub truncate: f64,
    /// Multiscale cluster (voxel) side; `None` (default) takes GeomLoss's
    /// `diameter / (√D · 2000^{1/D})`, about 2000 cells over the bounding box.
    pub cluster_scale: Option<f64>,
    /// Debiased Sinkhorn divergence `S_ε` (default) or the raw `OT_ε`.
    pub debias: bool,
    /// The backend.
    pub backend: Backend,
    /// After the schedule, iterate at the last ε until `max_i |f̃_i − f_i|/ε < tol`. `None`
    /// (default) runs GeomLoss's fixed schedule.
    pub tol: Option<f64>,
    /// The most extra iterations `tol` may take. Default 1000.
    pub max_iter: usize,
    /// Hausdorff only: differentiate the value exactly (in x, y, a and b) instead of
    /// GeomLoss's gradient, which flows through each softmin's rows only and is not the
    /// derivative of the value (83 % off in x on a 30-point case). Costs four more softmin
    /// passes. Default `false` (GeomLoss's).
    #[cfg_attr(feature = "serde", serde(default))]
    pub exact_hausdorff_gradient: bool,
    /// How the `tol` iterations run: Anderson-accelerated (default), over-relaxed or plain. See
    /// [`crate::sinkhorn::Acceleration`].
    #[cfg_attr(feature = "serde", serde(default))]
    pub acceleration: crate::sinkhorn::Acceleration,
    /// With `tol`: return [`crate::OtError::NotConverged`] instead of an unconverged value
    /// when `max_iter` is reached first (or an observer stops the loop). Default `false`: the
    /// value comes back with `converged: Some(false)` in the diagnostics and a `tracing`
    /// warning.
    #[cfg_attr(feature = "serde", serde(default))]
    pub require_convergence: bool,
    /// Called after every update of the Sinkhorn loop, with typed progress; it can stop the
    /// `tol` iterations. See [`crate::sinkhorn::Observer`]. Not serialized.
    #[cfg_attr(feature = "serde", serde(skip))]
    pub observer: Option<crate::sinkhorn::Observer>,
}

impl Default for SamplesLossOptions {
    fn default() -> Self {
        Self {
            loss: Loss::Sinkhorn,
            p: 2,
            blur: 0.05,
            reach: None,
            diameter: None,
            scaling: 0.5,
            truncate: 5.0,
            cluster_scale: None,
            debias: true,
            backend: Backend::Auto,
            tol: None,
            max_iter: 1000,
            exact_hausdorff_gradient: false,
            acceleration: crate::sinkhorn::Acceleration::Anderson,
            require_convergence: false,
            observer: None,
        }
    }
}

impl SamplesLossOptions {
    /// Checks every option; the error names the option, its range and the value received.
    pub fn validate(&self) -> Result<()> {
        let pos = |name: &'static str, v: f64| -> Result<()> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                opt_err(name, format!("must be a finite number > 0, got {v}"))
            }
        };
        if !(self.p == 1 || self.p == 2) {
            return opt_err("p", format!("must be 1 or 2, got {}", self.p));
        }
        pos("blur", self.blur)?;
        if let Some(r) = self.reach {
            pos("reach", r)?;
        }
        if let Some(d) = self.diameter {
            pos("diameter", d)?;
        }
        if !(self.scaling > 0.0 && self.scaling < 1.0) {
            return opt_err(
                "scaling",
                format!("must be in the open interval (0, 1), got {}", self.scaling),
            );
        }
        pos("truncate", self.truncate)?;
        if let Some(c) = self.cluster_scale {
            pos("cluster_scale", c)?;
        }
        if let Some(t) = self.tol {
            pos("tol", t)?;
        }
        if self.tol.is_some() && self.max_iter == 0 {
            return opt_err(
                "max_iter",
                "must be at least 1 when tol is set (the iterations tol may take), got 0",
            );
        }
        Ok(())
    }
}

impl SamplesLossOptions {
    /// The options set away from their defaults that this loss ignores, as `(option, why)`:
    /// `reach` or `p = 1` on a kernel loss (energy, gaussian, laplacian: fixed kernels, no
    /// transport), `diameter` or `tol` on a loss other than sinkhorn (no ε schedule, no
    /// iterations). [`SamplesLossBuilder::build`] and [`crate::SamplesLoss::from_options`] warn
    /// about each through `tracing` (target `candle_ot`); the CLI prints them as `warning:`
    /// lines.
    pub fn ignored(&self) -> Vec<(&'static str, String)> {
        let name = self.loss.name();
        let mut out = vec![];
        if self.loss.is_kernel() {
            if let Some(r) = self.reach {
                out.push((
                    "reach",
                    format!("reach = {r} is ignored: it applies to sinkhorn and hausdorff (unbalanced transport), not to {name}"),
                ));
            }
            if self.p != 2 {
                out.push((
                    "p",
                    format!("p = {} is ignored: it applies to sinkhorn and hausdorff (the cost |x − y|^p / p); the {name} kernel is fixed", self.p),
                ));
            }
        }
        if self.loss != Loss::Sinkhorn {
            if let Some(d) = self.diameter {
                out.push((
                    "diameter",
                    format!("diameter = {d} is ignored: it applies to the sinkhorn loss (its ε schedule), not to {name}"),
                ));
            }
            if let Some(t) = self.tol {
                out.push((
                    "tol",
                    format!("tol = {t} is ignored: it applies to the sinkhorn loss (its iterations), not to {name}"),
                ));
            }
        }
        if self.exact_hausdorff_gradient && self.loss != Loss::Hausdorff {
            out.push((
                "exact_hausdorff_gradient",
                format!("exact_hausdorff_gradient is ignored: it applies to the hausdorff loss, not to {name}"),
            ));
        }
        out
    }

    pub(crate) fn warn_ignored(&self) {
        for (option, why) in self.ignored() {
            tracing::warn!(target: "candle_ot", option, "{why}");
        }
    }
}

/// Builder of [`crate::SamplesLoss`]; `build` validates the options.
#[derive(Clone, Debug, Default)]
pub struct SamplesLossBuilder {
    opts: SamplesLossOptions,
}

impl SamplesLossBuilder {
    /// A builder with GeomLoss's defaults for `loss`.
    pub fn new(loss: Loss) -> Self {
        Self {
            opts: SamplesLossOptions {
                loss,
                ..Default::default()
            },
        }
    }
    /// Cost exponent, 1 or 2 (default 2).
    pub fn p(mut self, p: u32) -> Self {
        self.opts.p = p;
        self
    }
    /// Blur σ (default 0.05): ε = σ^p, or the kernel width.
    pub fn blur(mut self, blur: f64) -> Self {
        self.opts.blur = blur;
        self
    }
    /// Reach of unbalanced OT, ρ = reach^p (default: balanced).
    pub fn reach(mut self, reach: impl Into<Option<f64>>) -> Self {
        self.opts.reach = reach.into();
        self
    }
    /// Diameter for the ε schedule (default: estimated from the data).
    pub fn diameter(mut self, diameter: impl Into<Option<f64>>) -> Self {
        self.opts.diameter = diameter.into();
        self
    }
    /// ε-scaling ratio in (0, 1) (default 0.5).
    pub fn scaling(mut self, scaling: f64) -> Self {
        self.opts.scaling = scaling;
        self
    }
    /// Multiscale truncation (default 5).
    pub fn truncate(mut self, truncate: f64) -> Self {
        self.opts.truncate = truncate;
        self
    }
    /// Multiscale cluster scale (default: from the data).
    pub fn cluster_scale(mut self, cluster_scale: impl Into<Option<f64>>) -> Self {
        self.opts.cluster_scale = cluster_scale.into();
        self
    }
    /// Debiased `S_ε` (true, default) or raw `OT_ε` (false).
    pub fn debias(mut self, debias: bool) -> Self {
        self.opts.debias = debias;
        self
    }
    /// The backend (default `Auto`).
    pub fn backend(mut self, backend: Backend) -> Self {
        self.opts.backend = backend;
        self
    }
    /// Iterate at the last ε until the update is below `tol` (units of ε).
    pub fn tol(mut self, tol: impl Into<Option<f64>>) -> Self {
        self.opts.tol = tol.into();
        self
    }
    /// See [`SamplesLossOptions::acceleration`].
    pub fn acceleration(mut self, acceleration: crate::sinkhorn::Acceleration) -> Self {
        self.opts.acceleration = acceleration;
        self
    }

    /// See [`SamplesLossOptions::exact_hausdorff_gradient`].
    pub fn exact_hausdorff_gradient(mut self, exact: bool) -> Self {
        self.opts.exact_hausdorff_gradient = exact;
        self
    }

    /// The most extra iterations for `tol` (default 1000).
    pub fn max_iter(mut self, max_iter: usize) -> Self {
        self.opts.max_iter = max_iter;
        self
    }
    /// See [`SamplesLossOptions::require_convergence`].
    pub fn require_convergence(mut self, require: bool) -> Self {
        self.opts.require_convergence = require;
        self
    }
    /// See [`SamplesLossOptions::observer`].
    pub fn observer(mut self, observer: impl Into<Option<crate::sinkhorn::Observer>>) -> Self {
        self.opts.observer = observer.into();
        self
    }
    /// Validates the options.
    pub fn build(self) -> Result<crate::SamplesLoss> {
        self.opts.validate()?;
        self.opts.warn_ignored();
        Ok(crate::SamplesLoss::from_options_unchecked(self.opts))
    }
}
