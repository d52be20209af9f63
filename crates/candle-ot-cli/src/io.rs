//! Reading inputs for `candle-ot distance`: point clouds (`.npy`, `.safetensors`, `.csv`) and
//! densities on 2-D / 3-D grids (`.png` images, `.npy`, `.safetensors`).

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

fn extension(path: &Path) -> String {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default()
}

/// Whether `path` names a PNG image (by its extension): always a density on a 2-D grid.
pub fn is_image(path: &Path) -> bool {
    extension(path) == "png"
}

/// Reads the tensor of a `.npy` or `.safetensors` file, in its stored dtype, on the CPU
/// (`.safetensors`: the tensor named `key`, default `x` if present, else the only tensor).
fn read_tensor(path: &Path, key: Option<&str>, ext: &str) -> Result<Tensor> {
    Ok(match ext {
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
        _ => unreachable!("read_tensor is called for .npy and .safetensors only"),
    })
}

/// Reads a point cloud (N, D) or (B, N, D) as f64 on the CPU.
///
/// - `.npy`: any float array;
/// - `.safetensors`: the tensor named `key` (default: `x` if present, else the only tensor);
/// - `.csv`: one point per line, comma-separated numbers; a first line that does not parse
///   is taken as a header.
pub fn read_points(path: &Path, key: Option<&str>) -> Result<Tensor> {
    let ext = extension(path);
    let t = match ext.as_str() {
        "npy" | "safetensors" => read_tensor(path, key, &ext)?,
        "csv" | "txt" => read_csv(path)?,
        "png" => bail!(
            "{}: a PNG is a density on a 2-D grid, not a point cloud: both inputs must then be grids (.png, or .npy / .safetensors with --grid 2)",
            path.display()
        ),
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

/// Reads a `.npy` array as stored (any dtype), on the CPU, after checking its header against
/// the file's size.
pub fn read_npy(path: &Path) -> Result<Tensor> {
    read_tensor(path, None, "npy")
}

/// A density on a 2-D or 3-D grid, read by [`read_grid`].
#[derive(Clone, Debug)]
pub struct GridDensity {
    /// The masses `(batch…, n_1, …, n_D)`, f64 on the CPU, each batch item summing to 1.
    pub masses: Tensor,
    /// The grid dimension D (2 or 3): the last `dims` axes of `masses`.
    pub dims: usize,
    /// For a PNG that was not plain grayscale: its colour type before the conversion to luma
    /// (e.g. `Rgba8`).
    pub converted_from: Option<String>,
}

impl GridDensity {
    /// The grid, `(n_1, …, n_D)`.
    pub fn grid(&self) -> &[usize] {
        let d = self.masses.dims();
        &d[d.len() - self.dims..]
    }

    /// The batch axes (every leading axis; empty for a single density).
    pub fn batch(&self) -> &[usize] {
        let d = self.masses.dims();
        &d[..d.len() - self.dims]
    }
}

/// Formats a grid shape as `32×32` (`scalar` for no axes).
pub fn fmt_shape(dims: &[usize]) -> String {
    if dims.is_empty() {
        return "scalar".into();
    }
    dims.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("×")
}

/// Reads a density on a `dims`-D grid (2 or 3) and normalises it to mass 1 per batch item.
///
/// - `.png`: always a 2-D grid, `(rows, columns)` = `(height, width)`, no batch axis. Grayscale
///   images are read as they are; RGB(A) and gray + alpha images are converted to grayscale
///   (luma, Rec. 709 weights) and their alpha channel is dropped
///   ([`GridDensity::converted_from`] says so). 8-bit values are 0…255, 16-bit 0…65535.
/// - `.npy` / `.safetensors` (the tensor as for [`read_points`]): any float or integer array
///   with at least `dims` axes; the last `dims` are the grid, the leading ones batch axes.
///
/// `invert` first replaces every value `v` by `max − v`, for dark-on-light drawings: 255 − v for
/// 8-bit data (PNG or `u8` arrays), 65535 − v for 16-bit PNGs, 1 − v for floats. The values
/// must then be finite and ≥ 0, with some mass in every batch item.
pub fn read_grid(path: &Path, key: Option<&str>, dims: usize, invert: bool) -> Result<GridDensity> {
    if !(dims == 2 || dims == 3) {
        bail!("--grid must be 2 or 3, got {dims}");
    }
    let ext = extension(path);
    let (values, full, converted_from) = match ext.as_str() {
        "png" => {
            if dims != 2 {
                bail!(
                    "{}: a PNG image is a 2-D grid, but --grid {dims} was given",
                    path.display()
                );
            }
            let (t, full, conv) = read_png(path)?;
            (t, Some(full), conv)
        }
        "npy" | "safetensors" => {
            let t = read_tensor(path, key, &ext)?;
            if t.rank() < dims || t.dims()[t.rank() - dims..].contains(&0) {
                bail!(
                    "{}: {:?} is not a density on a {dims}-D grid: it needs at least {dims} non-empty axes (the last {dims} are the grid, any leading ones batch axes)",
                    path.display(),
                    t.dims()
                );
            }
            let full = match t.dtype() {
                DType::U8 => Some(255.0),
                DType::F16 | DType::BF16 | DType::F32 | DType::F64 => Some(1.0),
                DType::U32 | DType::I16 | DType::I32 | DType::I64 => None,
                dt => bail!(
                    "{}: unsupported dtype {dt:?} (floats or integers)",
                    path.display()
                ),
            };
            if invert && full.is_none() {
                bail!(
                    "{}: --invert needs 8-bit (u8) or floating-point values (255 − v or 1 − v), the file holds {:?}",
                    path.display(),
                    t.dtype()
                );
            }
            (t.to_dtype(DType::F64)?, full, None)
        }
        "csv" | "txt" => bail!(
            "{}: a .csv file holds a point cloud; grids are .png, .npy or .safetensors",
            path.display()
        ),
        _ => bail!(
            "{}: unknown extension {ext:?}, expected .png, .npy or .safetensors for a grid",
            path.display()
        ),
    };
    let values = match (invert, full) {
        (true, Some(full)) => (full - values)?,
        _ => values,
    };
    let masses = normalise(&values, dims, invert, path)?;
    Ok(GridDensity {
        masses,
        dims,
        converted_from,
    })
}

/// A PNG as an (height, width) f64 tensor of gray levels, the full-scale value (255, 65535 or
/// 1) and the colour type it was converted from when not plain grayscale.
fn read_png(path: &Path) -> Result<(Tensor, f64, Option<String>)> {
    use image::ColorType;
    let mut reader =
        image::io::Reader::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    reader.set_format(image::ImageFormat::Png);
    let img = reader
        .decode()
        .with_context(|| format!("cannot read {} as a PNG image", path.display()))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        bail!("{}: the image is empty ({w}×{h})", path.display());
    }
    let color = img.color();
    let converted = match color {
        ColorType::L8 | ColorType::L16 => None,
        c => Some(format!("{c:?}")),
    };
    let (v, full): (Vec<f64>, f64) = match color {
        ColorType::L8 | ColorType::La8 | ColorType::Rgb8 | ColorType::Rgba8 => (
            img.to_luma8()
                .into_raw()
                .into_iter()
                .map(f64::from)
                .collect(),
            255.0,
        ),
        ColorType::L16 | ColorType::La16 | ColorType::Rgb16 | ColorType::Rgba16 => (
            img.to_luma16()
                .into_raw()
                .into_iter()
                .map(f64::from)
                .collect(),
            65535.0,
        ),
        _ => (
            img.to_luma32f()
                .into_raw()
                .into_iter()
                .map(f64::from)
                .collect(),
            1.0,
        ),
    };
    Ok((Tensor::from_vec(v, (h, w), &Device::Cpu)?, full, converted))
}

/// Divides every batch item of `t` (f64, `(batch…, grid…)`) by its sum, after checking the
/// values are finite and ≥ 0 and every item has mass.
fn normalise(t: &Tensor, dims: usize, inverted: bool, path: &Path) -> Result<Tensor> {
    let shape = t.dims().to_vec();
    let n: usize = shape[shape.len() - dims..].iter().product();
    let mut v = t.flatten_all()?.to_vec1::<f64>()?;
    let after = if inverted { " after --invert" } else { "" };
    if v.iter().any(|x| !x.is_finite()) {
        bail!("{}: non-finite values (NaN or ∞)", path.display());
    }
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    if min < 0.0 {
        bail!(
            "{}: negative value {min}{after}: masses must be ≥ 0{}",
            path.display(),
            if inverted {
                " (--invert takes 1 − v for floats: values must lie in [0, 1])"
            } else {
                ""
            }
        );
    }
    let items = v.len() / n;
    for (i, chunk) in v.chunks_mut(n).enumerate() {
        let s: f64 = chunk.iter().sum();
        if s <= 0.0 {
            let which = if items == 1 {
                "the density".to_string()
            } else {
                format!("batch item {i}")
            };
            bail!(
                "{}: {which} has no mass{after} (every pixel is 0)",
                path.display()
            );
        }
        chunk.iter_mut().for_each(|x| *x /= s);
    }
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

fn read_csv(path: &Path) -> Result<Tensor> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (t, header) = parse_csv(&text).with_context(|| format!("{}", path.display()))?;
    if let Some(h) = header {
        eprintln!(
            "note: {}: the first line {h:?} is a header (no field is a number): skipped",
            path.display()
        );
    }
    Ok(t)
}

/// Parses delimited numeric text into an (N, D) f64 tensor with the `csv` crate: one point per
/// line, the fields separated by commas, semicolons, or runs of spaces / tabs (numpy's
/// `savetxt` default), whichever the first data line uses; blank lines and lines starting with
/// `#` are skipped. The first line is a header only when none of its fields is a number
/// (returned, for the caller to report); any other field that is not a number is an error
/// naming its line.
pub fn parse_csv(text: &str) -> Result<(Tensor, Option<String>)> {
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or_else(|| anyhow!("no points"))?;
    let (delim, text) = if first.contains(',') {
        (b',', std::borrow::Cow::Borrowed(text))
    } else if first.contains(';') {
        (b';', std::borrow::Cow::Borrowed(text))
    } else {
        // Whitespace-separated: runs of spaces and tabs become one separator.
        let joined: String = text
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") + "\n")
            .collect();
        (b' ', std::borrow::Cow::Owned(joined))
    };
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .delimiter(delim)
        .comment(Some(b'#'))
        .trim(csv::Trim::All)
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut rows: Vec<Vec<f64>> = Vec::new();
    let mut header = None;
    for rec in rdr.records() {
        let rec = rec.map_err(|e| anyhow!("{e}"))?;
        let line = rec.position().map_or(0, |p| p.line());
        if rec.iter().all(|f| f.is_empty()) {
            continue;
        }
        let fields: Vec<Result<f64, _>> = rec.iter().map(|f| f.parse::<f64>()).collect();
        if rows.is_empty() && header.is_none() && fields.iter().all(|f| f.is_err()) {
            header = Some(
                rec.iter()
                    .collect::<Vec<_>>()
                    .join(&(delim as char).to_string()),
            );
            continue;
        }
        let mut row = Vec::with_capacity(fields.len());
        for (f, raw) in fields.into_iter().zip(rec.iter()) {
            match f {
                Ok(v) => row.push(v),
                Err(e) => bail!("line {line}: {raw:?} is not a number ({e})"),
            }
        }
        rows.push(row);
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
    Ok((Tensor::from_vec(flat, (n, d), &Device::Cpu)?, header))
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
