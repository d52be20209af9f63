//! Reading point clouds for `candle-ot distance`: `.npy`, `.safetensors` and `.csv`.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// Reads a point cloud (N, D) or (B, N, D) as f64 on the CPU.
///
/// - `.npy`: any float array;
/// - `.safetensors`: the tensor named `key` (default: `x` if present, else the only tensor);
/// - `.csv`: one point per line, comma-separated numbers; a first line that does not parse
///   is taken as a header.
pub fn read_points(path: &Path, key: Option<&str>) -> Result<Tensor> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default();
    let t = match ext.as_str() {
        "npy" => {
            check_npy_header(path)?;
            Tensor::read_npy(path)
                .with_context(|| format!("cannot read {} as .npy", path.display()))?
        }
        "safetensors" => {
            let mut ts = candle_core::safetensors::load(path, &Device::Cpu)
                .with_context(|| format!("cannot read {} as .safetensors", path.display()))?;
            match key {
                Some(k) => ts
                    .remove(k)
                    .ok_or_else(|| anyhow!("{} has no tensor {k:?}", path.display()))?,
                None if ts.contains_key("x") => ts.remove("x").expect("checked"),
                None if ts.len() == 1 => ts.into_values().next().expect("one tensor"),
                None => bail!(
                    "{} holds several tensors ({:?}): name one with --key",
                    path.display(),
                    ts.keys().collect::<Vec<_>>()
                ),
            }
        }
        "csv" | "txt" => read_csv(path)?,
        _ => bail!(
            "{}: unknown extension {ext:?}, expected .npy, .safetensors or .csv",
            path.display()
        ),
    };
    if !t.dtype().is_float() {
        bail!(
            "{}: points must be floating point, got {:?}",
            path.display(),
            t.dtype()
        );
    }
    Ok(t.to_dtype(DType::F64)?)
}

fn read_csv(path: &Path) -> Result<Tensor> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_csv(&text).with_context(|| format!("{}", path.display()))
}

/// Parses CSV text into an (N, D) f64 tensor: one point per line, comma-separated numbers;
/// blank lines and lines starting with `#` are skipped; a first line that does not parse is
/// taken as a header.
pub fn parse_csv(text: &str) -> Result<Tensor> {
    let mut rows: Vec<Vec<f64>> = Vec::new();
    for (k, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parsed: Result<Vec<f64>, _> =
            line.split(',').map(|s| s.trim().parse::<f64>()).collect();
        match parsed {
            Ok(r) => rows.push(r),
            Err(_) if rows.is_empty() && k == 0 => continue, // header
            Err(e) => bail!("line {}: not a number ({e}): {line:?}", k + 1),
        }
    }
    let d = rows.first().map(|r| r.len()).unwrap_or(0);
    if rows.is_empty() || d == 0 {
        bail!("no points");
    }
    if let Some(bad) = rows.iter().position(|r| r.len() != d) {
        bail!(
            "row {} has {} columns, the first has {d}",
            bad + 1,
            rows[bad].len()
        );
    }
    let n = rows.len();
    let flat: Vec<f64> = rows.into_iter().flatten().collect();
    Ok(Tensor::from_vec(flat, (n, d), &Device::Cpu)?)
}

/// Checks a `.npy` header against the file before candle reads it: candle allocates whatever
/// shape the header declares, so a 128-byte file declaring 10¹² elements would abort the
/// process. The declared data must fit in the file.
fn check_npy_header(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let bad = |why: &str| anyhow!("{}: not a valid .npy file: {why}", path.display());
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("no NUMPY magic"));
    }
    let (hlen, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(&format!("unsupported version {v}"))),
    };
    let end = start
        .checked_add(hlen)
        .filter(|e| *e <= bytes.len())
        .ok_or_else(|| bad("header longer than the file"))?;
    let header = String::from_utf8_lossy(&bytes[start..end]);
    let item = header
        .split("descr")
        .nth(1)
        .and_then(|r| r.chars().find(|c| c.is_ascii_digit()))
        .and_then(|c| c.to_digit(10))
        .ok_or_else(|| bad("no dtype"))? as usize;
    let shape = header
        .split("shape")
        .nth(1)
        .and_then(|r| r.split('(').nth(1))
        .and_then(|r| r.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let mut count: usize = 1;
    for dim in shape.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let dim: usize = dim
            .parse()
            .map_err(|_| bad(&format!("bad dimension {dim:?}")))?;
        count = count.saturating_mul(dim);
    }
    if count.saturating_mul(item) > bytes.len() - end {
        return Err(bad(&format!(
            "the header declares shape ({shape}) but the file holds {} data bytes",
            bytes.len() - end
        )));
    }
    Ok(())
}
