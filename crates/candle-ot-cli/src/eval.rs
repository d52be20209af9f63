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

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_ot::{Backend, Loss, SamplesLoss, SamplesLossOptions, SinkhornDiagnostics};
use std::collections::HashMap;
use std::path::Path;

/// A case read from disk: its tensors and options.
pub struct Case {
    /// All tensors of the file, on the CPU, in their stored dtype.
    pub tensors: HashMap<String, Tensor>,
    /// The options from `params` (GeomLoss defaults where absent).
    pub options: SamplesLossOptions,
    /// The file's metadata (string to string).
    pub metadata: HashMap<String, String>,
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
    }
    o.validate()?;
    Ok(o)
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
    let options = parse_params(params.as_deref())?;
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

/// Evaluates a case in `dtype` (F32 or F64) with `backend` (`Auto` picks an exact backend).
pub fn evaluate(case: &Case, dtype: DType, backend: Backend) -> Result<Evaluation> {
    if !matches!(dtype, DType::F32 | DType::F64) {
        bail!("--dtype must be f32 or f64");
    }
    let mut opts = case.options.clone();
    // `auto` stays exact here: the library's `Auto` may take the approximate multiscale
    // backend on large clouds, so eval resolves it to the exact streaming backend itself.
    opts.backend = match backend {
        Backend::Auto => Backend::Online,
        b => b,
    };
    let loss = SamplesLoss::from_options(opts)?;
    let get = |name: &str| case.tensors.get(name);
    let x = get("x").ok_or_else(|| anyhow!("the case has no tensor `x`"))?;
    let y = get("y").ok_or_else(|| anyhow!("the case has no tensor `y`"))?;
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
