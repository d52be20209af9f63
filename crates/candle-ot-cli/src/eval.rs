//! `candle-ot eval`: evaluate a case file (the reference format) and write every output.
//!
//! Input: a safetensors file with `x`, `y` and optionally `a`, `b`, `l` (any float dtype) and
//! the metadata key `params`, a JSON object with GeomLoss's names (`loss, p, blur, reach,
//! diameter, scaling, debias`, and `tol`, `max_iter`). `null` for `reach` / `diameter` means
//! none; a missing key takes GeomLoss's default; keys that do not apply and unknown keys are
//! ignored; no `params` means all defaults.
//!
//! Output (all f64): `loss` ((1,) or (B,)), `grad_x`, `grad_y`, `grad_a`, `grad_b` (gradients of
//! the summed loss), `F`, `G`, and `labels_i` when the case holds `l` (M, K).
//!
//! Ragged cases (clouds of different sizes, [`SamplesLoss::forward_packed`]): the 1-D integer
//! tensors `x_lengths` and `y_lengths` (u8, u32, i16, i32 or i64; one size ≥ 1 per item, both
//! or neither) make `x` the packed points (ΣN_b, D), `y` (ΣM_b, D), and the optional `a`, `b`
//! packed weights (ΣN_b,), (ΣM_b,) (default uniform within each item), and `l` packed labels
//! (ΣM_b, K). Output (f64): `loss` (B,), and `grad_x`, `grad_y`, `grad_a`, `grad_b`, `F`
//! (ΣN_b,), `G` (ΣM_b,) and `labels_i` (ΣN_b, K) packed like x, y, a, b
//! ([`SamplesLoss::solve_packed`]).
//!
//! Grid cases (metadata `kind` = `grid`, `tests/data/reference/grid/`) hold densities `a`, `b`
//! shaped `(B, n_1, …, n_D)` (any leading batch axes, or none) and run [`ImagesLoss`] with
//! `D = len(params.shape)` (see [`parse_grid_params`]). Output (f64): `loss` ((1,) or the batch
//! axes), `grad_a`, `grad_b`, `F`, `G` shaped like `a`, `b`.
//!
//! Barycenter cases (metadata `kind` = `barycenter`) hold `measures` `(B, K, n_1, …, n_D)` and
//! `weights` `(B, K)` and run [`ImagesBarycenter::geomloss`] (GeomLoss's `ImagesBarycenter`; see
//! [`parse_barycenter_params`]). Output (f64): `barycenter` `(B, n_1, …, n_D)`. Every other
//! `kind` is a point-cloud case.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_ot::{
    Backend, ImagesBarycenter, ImagesBarycenterOptions, ImagesLoss, ImagesLossOptions, Loss,
    SamplesLoss, SamplesLossOptions, SinkhornDiagnostics,
};
use std::collections::HashMap;
use std::path::Path;

/// A case read from disk: its tensors and options.
pub struct Case {
    /// All tensors of the file, on the CPU, in their stored dtype.
    pub tensors: HashMap<String, Tensor>,
    /// The options from `params` (GeomLoss defaults where absent). Point-cloud cases only: grid
    /// and barycenter cases hold the defaults here and [`evaluate`] reads their `params` with
    /// [`parse_grid_params`] / [`parse_barycenter_params`].
    pub options: SamplesLossOptions,
    /// The file's metadata (string to string).
    pub metadata: HashMap<String, String>,
}

/// What a case file holds, from its metadata key `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaseKind {
    /// Point clouds `x`, `y` (every `kind` but the two below, or none).
    Samples,
    /// Densities `a`, `b` on a grid (`kind` = `grid`): [`ImagesLoss`].
    Grid,
    /// Densities `measures` and `weights` (`kind` = `barycenter`): [`ImagesBarycenter`].
    Barycenter,
}

impl CaseKind {
    fn of(metadata: &HashMap<String, String>) -> Self {
        match metadata.get("kind").map(String::as_str) {
            Some("grid") => CaseKind::Grid,
            Some("barycenter") => CaseKind::Barycenter,
            _ => CaseKind::Samples,
        }
    }
}

impl Case {
    /// What the case holds (metadata `kind`).
    pub fn kind(&self) -> CaseKind {
        CaseKind::of(&self.metadata)
    }
}

fn json_f64(v: &serde_json::Value, key: &str) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| anyhow!("params.{key} must be a number or null, got {x}")),
    }
}

/// Parses the `params` JSON into options (see the module docs for the rules).
pub fn parse_params(params: Option<&str>) -> Result<SamplesLossOptions> {
    let mut o = SamplesLossOptions::default();
    let Some(params) = params else {
        return Ok(o);
    };
    let v: serde_json::Value =
        serde_json::from_str(params).context("metadata `params` is not valid JSON")?;
    if !v.is_object() {
        bail!("metadata `params` must be a JSON object, got {v}");
    }
    if let Some(loss) = v.get("loss").filter(|l| !l.is_null()) {
        let s = loss
            .as_str()
            .ok_or_else(|| anyhow!("params.loss must be a string, got {loss}"))?;
        o.loss = s.parse::<Loss>()?;
    }
    if let Some(blur) = json_f64(&v, "blur")? {
        o.blur = blur;
    }
    if !o.loss.is_kernel() {
        if let Some(p) = json_f64(&v, "p")? {
            if p.fract() != 0.0 || !(1.0..=2.0).contains(&p) {
                bail!("params.p must be 1 or 2, got {p}");
            }
            o.p = p as u32;
        }
        o.reach = json_f64(&v, "reach")?;
    }
    if o.loss == Loss::Hausdorff {
        if let Some(e) = v.get("exact_hausdorff_gradient").filter(|e| !e.is_null()) {
            o.exact_hausdorff_gradient = e.as_bool().ok_or_else(|| {
                anyhow!("params.exact_hausdorff_gradient must be true or false, got {e}")
            })?;
        }
    }
    if o.loss == Loss::Sinkhorn {
        o.diameter = json_f64(&v, "diameter")?;
        if let Some(s) = json_f64(&v, "scaling")? {
            o.scaling = s;
        }
        if let Some(d) = v.get("debias").filter(|d| !d.is_null()) {
            o.debias = d
                .as_bool()
                .ok_or_else(|| anyhow!("params.debias must be true or false, got {d}"))?;
        }
        o.tol = json_f64(&v, "tol")?;
        if let Some(m) = json_f64(&v, "max_iter")? {
            if m.fract() != 0.0 || m < 0.0 {
                bail!("params.max_iter must be a non-negative integer, got {m}");
            }
            o.max_iter = m as usize;
        }
        if let Some(acc) = v.get("acceleration").filter(|a| !a.is_null()) {
            o.acceleration = acc
                .as_str()
                .ok_or_else(|| anyhow!("params.acceleration must be a string, got {acc}"))?
                .parse()?;
        }
        if let Some(r) = v.get("require_convergence").filter(|r| !r.is_null()) {
            o.require_convergence = r.as_bool().ok_or_else(|| {
                anyhow!("params.require_convergence must be true or false, got {r}")
            })?;
        }
    }
    o.validate()?;
    Ok(o)
}

fn json_usize(v: &serde_json::Value, key: &str) -> Result<Option<usize>> {
    match json_f64(v, key)? {
        None => Ok(None),
        Some(m) if m.fract() == 0.0 && m >= 0.0 => Ok(Some(m as usize)),
        Some(m) => bail!("params.{key} must be a non-negative integer, got {m}"),
    }
}

/// The metadata `params` as a JSON object (`{}` when absent).
fn params_object(params: Option<&str>) -> Result<serde_json::Value> {
    let v: serde_json::Value = match params {
        Some(p) => serde_json::from_str(p).context("metadata `params` is not valid JSON")?,
        None => serde_json::json!({}),
    };
    if !v.is_object() {
        bail!("metadata `params` must be a JSON object, got {v}");
    }
    Ok(v)
}

/// The grid dimension of a case: `params.shape` (2 or 3 sizes, the last axes of the tensor
/// `name`, after exactly `leading` axes, or any number when `any_leading`), or without it the
/// rank of `name` minus `leading`.
fn grid_dims(
    v: &serde_json::Value,
    dims: &[usize],
    (leading, any_leading): (usize, bool),
    name: &str,
    expected: &str,
) -> Result<usize> {
    match v.get("shape").filter(|s| !s.is_null()) {
        Some(shape) => {
            let grid: Vec<usize> = shape
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|x| x.as_u64().map(|x| x as usize))
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| anyhow!("params.shape must be a list of grid sizes, got {shape}"))?;
            if !(grid.len() == 2 || grid.len() == 3) {
                bail!("params.shape must have 2 (image) or 3 (volume) axes, got {shape}");
            }
            let ok = if any_leading {
                dims.len() >= grid.len() && dims[dims.len() - grid.len()..] == grid[..]
            } else {
                dims.len() == grid.len() + leading && dims[leading..] == grid[..]
            };
            if !ok {
                bail!(
                    "params.shape is {grid:?} but {name} is {dims:?}: expected {name} {expected} with the grid last"
                );
            }
            Ok(grid.len())
        }
        None => match dims.len().checked_sub(leading) {
            Some(d @ (2 | 3)) => Ok(d),
            _ => bail!("params.shape is missing and {name} is {dims:?}: expected {expected}"),
        },
    }
}

/// `params.p` (1 or 2), if given.
fn json_p(v: &serde_json::Value) -> Result<Option<u32>> {
    match json_f64(v, "p")? {
        Some(p) if p.fract() != 0.0 || !(1.0..=2.0).contains(&p) => {
            bail!("params.p must be 1 or 2, got {p}")
        }
        Some(p) => Ok(Some(p as u32)),
        None => Ok(None),
    }
}

/// Parses the `params` JSON of a grid case into [`ImagesLoss`] options, for densities `a` of
/// shape `a_dims`.
///
/// Keys: `loss` (`sinkhorn` or absent), `shape` (the grid; its length is the grid dimension,
/// 2 or 3, and it must be the last axes of `a`; absent: every axis of `a` but the first, the
/// reference layout `(B, grid…)`), `p` (1 or 2, default 2), `blur` (`null` = one pixel),
/// `reach` (`null` = balanced), `scaling` (default 0.5), `debias` (default true), `tol`,
/// `max_iter`, `axes` (`[[lo, hi], …]`, one per grid axis; default the unit square / cube).
/// Other keys are ignored.
pub fn parse_grid_params(params: Option<&str>, a_dims: &[usize]) -> Result<ImagesLossOptions> {
    let v = params_object(params)?;
    if let Some(loss) = v.get("loss").filter(|l| !l.is_null()) {
        if loss.as_str() != Some("sinkhorn") {
            bail!("grid cases run the Sinkhorn divergence (ImagesLoss): params.loss must be \"sinkhorn\", got {loss}");
        }
    }
    let dims = grid_dims(&v, a_dims, (1, true), "a", "(B, n1, n2) or (B, n1, n2, n3)")?;
    let mut b = ImagesLoss::builder(dims);
    if let Some(p) = json_p(&v)? {
        b = b.p(p);
    }
    b = b.blur(json_f64(&v, "blur")?).reach(json_f64(&v, "reach")?);
    if let Some(s) = json_f64(&v, "scaling")? {
        b = b.scaling(s);
    }
    if let Some(d) = v.get("debias").filter(|d| !d.is_null()) {
        b = b.debias(
            d.as_bool()
                .ok_or_else(|| anyhow!("params.debias must be true or false, got {d}"))?,
        );
    }
    b = b.tol(json_f64(&v, "tol")?);
    if let Some(m) = json_usize(&v, "max_iter")? {
        b = b.max_iter(m);
    }
    if let Some(axes) = v.get("axes").filter(|a| !a.is_null()) {
        let pairs: Vec<(f64, f64)> = axes
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|p| match p.as_array().map(|p| p.as_slice()) {
                        Some([lo, hi]) => Some((lo.as_f64()?, hi.as_f64()?)),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| anyhow!("params.axes must be a list of [lo, hi] pairs, got {axes}"))?;
        b = b.axes(&pairs);
    }
    Ok(b.build()?.options().clone())
}

/// Parses the `params` JSON of a barycenter case into [`ImagesBarycenter`] options, for
/// `measures` of shape `m_dims`.
///
/// Keys: `shape` (the grid; its length is the grid dimension, 2 or 3, and it must be the last
/// axes of `measures`; absent: every axis of `measures` but the first two, the reference layout
/// `(B, K, grid…)`), `p` (1 or 2, default 2), `blur` (`null` = one pixel), `scaling_N`
/// (iterations per pyramid level, default 10). Other keys (`kind`, `B`, `K`, …) are ignored.
pub fn parse_barycenter_params(
    params: Option<&str>,
    m_dims: &[usize],
) -> Result<ImagesBarycenterOptions> {
    let v = params_object(params)?;
    let dims = grid_dims(
        &v,
        m_dims,
        (2, false),
        "measures",
        "(B, K, n1, n2) or (B, K, n1, n2, n3)",
    )?;
    let mut b = ImagesBarycenter::builder(dims);
    if let Some(p) = json_p(&v)? {
        b = b.p(p);
    }
    b = b.blur(json_f64(&v, "blur")?);
    if let Some(n) = json_usize(&v, "scaling_N")? {
        b = b.scaling_n(n);
    }
    Ok(b.build()?.options().clone())
}

/// Reads a case file.
pub fn read_case(path: &Path) -> Result<Case> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    read_case_bytes(&bytes).with_context(|| format!("{}", path.display()))
}

/// Reads a case from the bytes of a safetensors file (see the module docs for the format).
pub fn read_case_bytes(bytes: &[u8]) -> Result<Case> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| anyhow!("not a valid safetensors file: {e}"))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let params = metadata.get("params").cloned();
    let options = match CaseKind::of(&metadata) {
        CaseKind::Samples => parse_params(params.as_deref())?,
        CaseKind::Grid | CaseKind::Barycenter => SamplesLossOptions::default(),
    };
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
        .context("cannot load the tensors")?;
    Ok(Case {
        tensors,
        options,
        metadata,
    })
}

/// What [`evaluate`] computed.
pub struct Evaluation {
    /// Output tensors (f64), by name.
    pub outputs: HashMap<String, Tensor>,
    /// Diagnostics of the Sinkhorn loop, when it ran.
    pub diagnostics: Option<SinkhornDiagnostics>,
}

/// Evaluates a case in `dtype` (F32 or F64) with `backend` (`Auto` picks an exact backend;
/// grid and barycenter cases accept `Auto` only).
pub fn evaluate(case: &Case, dtype: DType, backend: Backend) -> Result<Evaluation> {
    if !matches!(dtype, DType::F32 | DType::F64) {
        bail!("--dtype must be f32 or f64");
    }
    match case.kind() {
        CaseKind::Samples => {}
        CaseKind::Grid => return evaluate_grid(case, dtype, backend),
        CaseKind::Barycenter => return evaluate_barycenter(case, dtype, backend),
    }
    let mut opts = case.options.clone();
    // `auto` stays exact here: the library's `Auto` may take the approximate multiscale
    // backend on large clouds, so eval resolves it to the exact streaming backend itself.
    opts.backend = match backend {
        Backend::Auto => Backend::Online,
        b => b,
    };
    if let Some(tol) = opts.tol {
        opts.observer = Some(crate::progress_observer(tol, opts.max_iter));
    }
    let loss = SamplesLoss::from_options(opts)?;
    let get = |name: &str| case.tensors.get(name);
    let x = get("x").ok_or_else(|| anyhow!("the case has no tensor `x`"))?;
    let y = get("y").ok_or_else(|| anyhow!("the case has no tensor `y`"))?;
    match (get("x_lengths"), get("y_lengths")) {
        (None, None) => {}
        (Some(xl), Some(yl)) => return evaluate_ragged(case, &loss, dtype, (x, xl), (y, yl)),
        (Some(_), None) => bail!(
            "the case has `x_lengths` but no `y_lengths`: a ragged case needs both (one size per item of x and of y)"
        ),
        (None, Some(_)) => bail!(
            "the case has `y_lengths` but no `x_lengths`: a ragged case needs both (one size per item of x and of y)"
        ),
    }
    let batched = x.rank() == 3;
    if !(x.rank() == 2 || batched) {
        bail!("x must be (N, D) or (B, N, D), got {:?}", x.dims());
    }
    let lead = |t: &Tensor| -> Vec<usize> { t.dims()[..t.rank().saturating_sub(1)].to_vec() };
    let uniform = |t: &Tensor| -> Result<Tensor> {
        let dims = lead(t);
        let k = *dims
            .last()
            .ok_or_else(|| anyhow!("points must have a rank of 2 or 3"))?;
        Ok(Tensor::full(1.0 / k.max(1) as f64, dims, &Device::Cpu)?)
    };
    let a = match get("a") {
        Some(a) => a.clone(),
        None => uniform(x)?,
    };
    let b = match get("b") {
        Some(b) => b.clone(),
        None => uniform(y)?,
    };
    let var = |t: &Tensor| -> Result<Var> { Ok(Var::from_tensor(&t.to_dtype(dtype)?)?) };
    let (va, vx, vb, vy) = (var(&a)?, var(x)?, var(&b)?, var(y)?);
    let sol = loss.solve(
        Some(va.as_tensor()),
        vx.as_tensor(),
        Some(vb.as_tensor()),
        vy.as_tensor(),
    )?;
    let grads = sol.loss.sum_all()?.backward()?;
    let f64_of = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F64)?) };
    let grad_of = |v: &Var| -> Result<Tensor> {
        match grads.get(v.as_tensor()) {
            Some(g) => f64_of(g),
            None => Ok(v.as_tensor().zeros_like()?.to_dtype(DType::F64)?),
        }
    };
    let mut out = HashMap::new();
    let loss_t = if batched {
        sol.loss.clone()
    } else {
        sol.loss.reshape(1)?
    };
    out.insert("loss".to_string(), f64_of(&loss_t)?);
    out.insert("grad_x".to_string(), grad_of(&vx)?);
    out.insert("grad_y".to_string(), grad_of(&vy)?);
    out.insert("grad_a".to_string(), grad_of(&va)?);
    out.insert("grad_b".to_string(), grad_of(&vb)?);
    out.insert("F".to_string(), f64_of(&sol.f)?);
    out.insert("G".to_string(), f64_of(&sol.g)?);
    if let Some(l) = get("l") {
        let labels = sol.transfer(&l.to_dtype(dtype)?)?;
        out.insert("labels_i".to_string(), f64_of(&labels)?);
    }
    Ok(Evaluation {
        outputs: out,
        diagnostics: sol.diagnostics,
    })
}

/// The item sizes of a ragged case: the 1-D integer tensor `name` (u8, u32, i16, i32 or i64),
/// every size at least 1.
pub fn read_lengths(t: &Tensor, name: &str) -> Result<Vec<usize>> {
    if t.rank() != 1 {
        bail!(
            "`{name}` must be 1-D, one size per item, got shape {:?}",
            t.dims()
        );
    }
    let v: Vec<i64> = match t.dtype() {
        DType::U8 => t.to_vec1::<u8>()?.into_iter().map(i64::from).collect(),
        DType::U32 => t.to_vec1::<u32>()?.into_iter().map(i64::from).collect(),
        DType::I16 => t.to_vec1::<i16>()?.into_iter().map(i64::from).collect(),
        DType::I32 => t.to_vec1::<i32>()?.into_iter().map(i64::from).collect(),
        DType::I64 => t.to_vec1::<i64>()?,
        other => bail!(
            "`{name}` must hold integers (u8, u32, i16, i32 or i64), got {}",
            format!("{other:?}").to_lowercase()
        ),
    };
    if v.is_empty() {
        bail!("`{name}` is empty: a ragged case needs at least one item");
    }
    v.iter()
        .enumerate()
        .map(|(k, &n)| {
            usize::try_from(n)
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| anyhow!("`{name}`[{k}] is {n}: every item needs at least one point"))
        })
        .collect()
}

/// Checks a packed cloud `p` (ΣN_b, D) against its sizes and its optional packed weights.
fn check_packed(
    p: &Tensor,
    lengths: &[usize],
    w: Option<&Tensor>,
    (pn, ln, wn): (&str, &str, &str),
) -> Result<()> {
    if p.rank() != 2 {
        bail!(
            "`{pn}` must be (ΣN_b, D) in a ragged case (the items' points one after the other, sizes in `{ln}`), got {:?}",
            p.dims()
        );
    }
    let total: usize = lengths.iter().sum();
    if total != p.dim(0)? {
        bail!(
            "`{ln}` sums to {total} but `{pn}` has {} rows ({:?}): the sizes must add up to the packed points",
            p.dim(0)?,
            p.dims()
        );
    }
    if let Some(w) = w {
        if w.dims() != [total] {
            bail!(
                "`{wn}` must be ({total},) in a ragged case, one weight per packed point of `{pn}`, got {:?}",
                w.dims()
            );
        }
    }
    Ok(())
}

/// Uniform weights within each item of a packed cloud: `1/N_b` on the points of item b (f64).
fn packed_uniform(lengths: &[usize]) -> Result<Tensor> {
    let w: Vec<f64> = lengths
        .iter()
        .flat_map(|&n| std::iter::repeat_n(1.0 / n as f64, n))
        .collect();
    let k = w.len();
    Ok(Tensor::from_vec(w, k, &Device::Cpu)?)
}

/// A ragged point-cloud case (`x_lengths`, `y_lengths`): [`SamplesLoss::solve_packed`] on
/// the packed x, y (and a, b), with the packed outputs `loss` (B,), `grad_x` (ΣN_b, D),
/// `grad_y` (ΣM_b, D), `grad_a` (ΣN_b,), `grad_b` (ΣM_b,), `F` (ΣN_b,), `G` (ΣM_b,), and
/// `labels_i` (ΣN_b, K) for packed labels `l` (ΣM_b, K) (Sinkhorn only).
fn evaluate_ragged(
    case: &Case,
    loss: &SamplesLoss,
    dtype: DType,
    (x, xl): (&Tensor, &Tensor),
    (y, yl): (&Tensor, &Tensor),
) -> Result<Evaluation> {
    let get = |name: &str| case.tensors.get(name);
    let x_lengths = read_lengths(xl, "x_lengths")?;
    let y_lengths = read_lengths(yl, "y_lengths")?;
    if x_lengths.len() != y_lengths.len() {
        bail!(
            "`x_lengths` has {} items but `y_lengths` has {}: item b of x is compared with item b of y",
            x_lengths.len(),
            y_lengths.len()
        );
    }
    check_packed(x, &x_lengths, get("a"), ("x", "x_lengths", "a"))?;
    check_packed(y, &y_lengths, get("b"), ("y", "y_lengths", "b"))?;
    let total_y: usize = y_lengths.iter().sum();
    if let Some(l) = get("l") {
        if l.rank() != 2 || l.dim(0)? != total_y {
            bail!(
                "`l` must be ({total_y}, K), one row of labels per packed point of `y`, got {:?}",
                l.dims()
            );
        }
    }
    let a = match get("a") {
        Some(a) => a.clone(),
        None => packed_uniform(&x_lengths)?,
    };
    let b = match get("b") {
        Some(b) => b.clone(),
        None => packed_uniform(&y_lengths)?,
    };
    let var = |t: &Tensor| -> Result<Var> { Ok(Var::from_tensor(&t.to_dtype(dtype)?)?) };
    let (va, vx, vb, vy) = (var(&a)?, var(x)?, var(&b)?, var(y)?);
    let sol = loss.solve_packed(
        Some(va.as_tensor()),
        vx.as_tensor(),
        &x_lengths,
        Some(vb.as_tensor()),
        vy.as_tensor(),
        &y_lengths,
    )?;
    let value = &sol.loss;
    let grads = value.sum_all()?.backward()?;
    let grad_of = |v: &Var| -> Result<Tensor> {
        match grads.get(v.as_tensor()) {
            Some(g) => Ok(g.to_dtype(DType::F64)?),
            None => Ok(v.as_tensor().zeros_like()?.to_dtype(DType::F64)?),
        }
    };
    let mut out = HashMap::new();
    out.insert("loss".to_string(), value.to_dtype(DType::F64)?);
    out.insert("grad_x".to_string(), grad_of(&vx)?);
    out.insert("grad_y".to_string(), grad_of(&vy)?);
    out.insert("grad_a".to_string(), grad_of(&va)?);
    out.insert("grad_b".to_string(), grad_of(&vb)?);
    out.insert("F".to_string(), sol.f.to_dtype(DType::F64)?);
    out.insert("G".to_string(), sol.g.to_dtype(DType::F64)?);
    if let Some(l) = get("l") {
        let labels = sol.plan()?.transfer(&l.to_dtype(dtype)?)?; // (ΣN_b, K)
        out.insert("labels_i".to_string(), labels.to_dtype(DType::F64)?);
    }
    Ok(Evaluation {
        outputs: out,
        diagnostics: sol.padded.diagnostics,
    })
}

/// For grid and barycenter cases (`kind`, run by `runner`): refuses a point-cloud `--backend`
/// and returns a getter of the case's tensors with a clear error for a missing one.
fn grid_case_tensors<'c>(
    case: &'c Case,
    backend: Backend,
    kind: &'static str,
    runner: &'static str,
) -> Result<impl Fn(&str) -> Result<&'c Tensor> + 'c> {
    if backend != Backend::Auto {
        bail!(
            "--backend {} applies to point clouds: {kind} cases run {runner}, whose separable grid softmin is exact; leave --backend at auto",
            format!("{backend:?}").to_lowercase()
        );
    }
    Ok(move |name: &str| {
        case.tensors
            .get(name)
            .ok_or_else(|| anyhow!("the {kind} case has no tensor `{name}`"))
    })
}

/// A grid case (module docs): ImagesLoss on `a`, `b`.
fn evaluate_grid(case: &Case, dtype: DType, backend: Backend) -> Result<Evaluation> {
    let get = grid_case_tensors(case, backend, "grid", "ImagesLoss")?;
    let (a, b) = (get("a")?, get("b")?);
    let opts = parse_grid_params(case.metadata.get("params").map(String::as_str), a.dims())?;
    let dims = opts.dims;
    let mut builder = ImagesLoss::builder(dims)
        .p(opts.p)
        .blur(opts.blur)
        .reach(opts.reach)
        .scaling(opts.scaling)
        .debias(opts.debias)
        .tol(opts.tol)
        .max_iter(opts.max_iter);
    if let Some(e) = &opts.extent {
        let axes: Vec<(f64, f64)> = e.iter().map(|e| (0.0, *e)).collect();
        builder = builder.axes(&axes);
    }
    let loss = builder.build()?;
    let var = |t: &Tensor| -> Result<Var> { Ok(Var::from_tensor(&t.to_dtype(dtype)?)?) };
    let (va, vb) = (var(a)?, var(b)?);
    let sol = loss.solve(va.as_tensor(), vb.as_tensor())?;
    let grads = sol.loss.sum_all()?.backward()?;
    let f64_of = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F64)?) };
    let grad_of = |v: &Var| -> Result<Tensor> {
        match grads.get(v.as_tensor()) {
            Some(g) => f64_of(g),
            None => Ok(v.as_tensor().zeros_like()?.to_dtype(DType::F64)?),
        }
    };
    let loss_t = if a.rank() == dims {
        sol.loss.reshape(1)?
    } else {
        sol.loss.clone()
    };
    let mut out = HashMap::new();
    out.insert("loss".to_string(), f64_of(&loss_t)?);
    out.insert("grad_a".to_string(), grad_of(&va)?);
    out.insert("grad_b".to_string(), grad_of(&vb)?);
    out.insert("F".to_string(), f64_of(&sol.f)?);
    out.insert("G".to_string(), f64_of(&sol.g)?);
    Ok(Evaluation {
        outputs: out,
        diagnostics: Some(sol.diagnostics),
    })
}

/// A barycenter case (module docs): ImagesBarycenter on `measures`, `weights`.
fn evaluate_barycenter(case: &Case, dtype: DType, backend: Backend) -> Result<Evaluation> {
    let get = grid_case_tensors(case, backend, "barycenter", "ImagesBarycenter on a grid")?;
    let (m, w) = (get("measures")?, get("weights")?);
    let opts = parse_barycenter_params(case.metadata.get("params").map(String::as_str), m.dims())?;
    let solver = ImagesBarycenter::builder(opts.dims)
        .p(opts.p)
        .blur(opts.blur)
        .scaling_n(opts.scaling_n)
        .build()?;
    let bar = solver.geomloss(&m.to_dtype(dtype)?, &w.to_dtype(dtype)?)?;
    let mut out = HashMap::new();
    out.insert("barycenter".to_string(), bar.to_dtype(DType::F64)?);
    Ok(Evaluation {
        outputs: out,
        diagnostics: None,
    })
}

/// Writes the outputs; on failure no file is left behind.
pub fn write_outputs(outputs: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = path.with_extension("partial.safetensors");
    let res = candle_core::safetensors::save(outputs, &tmp)
        .map_err(anyhow::Error::from)
        .and_then(|_| std::fs::rename(&tmp, path).map_err(anyhow::Error::from));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.with_context(|| format!("cannot write {}", path.display()))
}
