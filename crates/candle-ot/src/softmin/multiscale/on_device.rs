//! The multiscale backend's set-up work as Candle tensor ops, on the device that holds the
//! points: the voxel keys and the cluster sums of [`super::cluster::grid_cluster`], and the
//! kernel truncation of [`super::kept_lists`].
//!
//! These functions run on any Candle device; the CPU tests run them against the host code
//! and require the same clusters (perm, ranges, centroids) and the same kept blocks. What stays
//! on the host is linear in size and needs no coordinates:
//! * the sort of the points by voxel: a stable counting sort of one `u32` key per point
//!   (Candle's CUDA `arg_sort` is one thread block, at most a few thousand columns, so it cannot
//!   sort 10⁶ keys; a counting sort on the host is O(N + cells) and exact);
//! * the kept lists, read from one bit per cluster pair (`u32` words packed on the device).
//!
//! On Metal (no f64) the keys, sums and scores are f32, so points within an f32 rounding of a
//! voxel face, and cluster pairs within an f32 rounding of the truncation threshold, may fall on
//! the other side than in f64; CUDA and the CPU use f64 as the host code does.

use super::cluster::Clustering;
use crate::cost::CostKind;
use candle_core::{DType, Device, Result, Tensor, D};

/// The float type of the set-up work on `dev`: f64, except on Metal (no f64 there).
pub(crate) fn setup_dtype(dev: &Device) -> DType {
    if dev.is_metal() {
        DType::F32
    } else {
        DType::F64
    }
}

/// Elements per intermediate (R, J) tensor of the chunked score computation: bounds the device
/// memory of one chunk at 8·2²⁴ B = 128 MiB in f64.
const CHUNK_ELEMS: usize = 1 << 24;

/// `mask` (R, K) (u8 or u32 flags) packed 32 flags per `u32`, little end first: (R, ⌈K/32⌉).
fn pack_bits(mask: &Tensor) -> Result<Tensor> {
    let (r, k) = mask.dims2()?;
    let words = k.div_ceil(32);
    let m = mask.to_dtype(DType::U32)?;
    let m = if words * 32 > k {
        m.pad_with_zeros(1, 0, words * 32 - k)?
    } else {
        m
    };
    let pow2: Vec<u32> = (0..32).map(|b| 1u32 << b).collect();
    let pow2 = Tensor::from_vec(pow2, (1, 1, 32), mask.device())?;
    m.reshape((r, words, 32))?
        .broadcast_mul(&pow2)?
        .sum(D::Minus1) // (R, words)
}

/// The set flags of a (R, K) mask on the device, per row, in increasing order. Two round trips
/// that move only what is set: the bits of the nonzero words (one bit per 32 pairs), then those
/// words (`index_select`).
fn set_flags(mask: &Tensor) -> Result<Vec<Vec<u32>>> {
    let (r, k) = mask.dims2()?;
    let bits = pack_bits(mask)?; // (R, W)
    let w = bits.dim(1)?;
    let nonzero = pack_bits(&bits.ne(0u32)?)?.to_vec2::<u32>()?; // (R, ⌈W/32⌉)
    let mut at: Vec<u32> = Vec::new();
    for (i, row) in nonzero.iter().enumerate() {
        for (wi, &word) in row.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                at.push((i * w + wi * 32) as u32 + word.trailing_zeros());
                word &= word - 1;
            }
        }
    }
    let mut out = vec![Vec::new(); r];
    if at.is_empty() {
        return Ok(out);
    }
    let idx = Tensor::from_slice(&at, at.len(), mask.device())?;
    let words = bits
        .flatten_all()?
        .index_select(&idx, 0)?
        .to_vec1::<u32>()?;
    for (&a, &word) in at.iter().zip(&words) {
        let (i, wi) = (a as usize / w, a as usize % w);
        let mut word = word;
        while word != 0 {
            let j = wi * 32 + word.trailing_zeros() as usize;
            debug_assert!(j < k);
            out[i].push(j as u32);
            word &= word - 1;
        }
    }
    Ok(out)
}

/// The kept column clusters of every row cluster, as the host's `kept_lists` (module docs
/// of `multiscale`, step 3): `f_I + g_J − C(x̄_I, ȳ_J) > thresh`, plus the best column of every
/// row, the best row of every column, and the diagonal when `sym`.
///
/// `xc` (I, D) and `yc` (J, D) are the centroids, `f` (I,) and `g` (J,) the coarse
/// potentials, all of one dtype on one device. The scores are computed there in chunks of
/// rows (at most [`CHUNK_ELEMS`] elements per (R, J) intermediate) and thresholded; the host
/// receives the kept pairs (see `set_flags`), the row argmaxes and, once, the column argmaxes
/// (a running max over the chunks stays on the device). The arithmetic is the host's, in the
/// same order: `sq = (t₀² + t₁²) + t₂²` with `t_k = x̄_k − ȳ_k`, `C = sq/2` or `√sq`,
/// `s = (f + g) − C`, so in f64 the lists are identical.
pub(crate) fn kept_lists(
    cost: CostKind,
    xc: &Tensor,
    yc: &Tensor,
    f: &Tensor,
    g: &Tensor,
    thresh: f64,
    sym: bool,
) -> Result<Vec<Vec<u32>>> {
    kept_lists_chunked(cost, xc, yc, f, g, thresh, sym, CHUNK_ELEMS)
}

/// [`kept_lists`] with at most `chunk_elems` elements per (R, J) intermediate.
#[allow(clippy::too_many_arguments)]
fn kept_lists_chunked(
    cost: CostKind,
    xc: &Tensor,
    yc: &Tensor,
    f: &Tensor,
    g: &Tensor,
    thresh: f64,
    sym: bool,
    chunk_elems: usize,
) -> Result<Vec<Vec<u32>>> {
    let (ni, d) = xc.dims2()?;
    let nj = yc.dim(0)?;
    if ni == 0 || nj == 0 {
        return Ok(vec![Vec::new(); ni]);
    }
    // The column coordinates as rows (1, J), one per axis.
    let ycols: Vec<Tensor> = (0..d)
        .map(|k| yc.narrow(1, k, 1)?.t()?.contiguous())
        .collect::<Result<_>>()?;
    let g1 = g.unsqueeze(0)?; // (1, J)
    let rows = (chunk_elems / nj).clamp(1, ni);
    let mut lists: Vec<Vec<u32>> = Vec::with_capacity(ni);
    // Running best row of every column: (max, argmax) over the chunks so far, on the device.
    let mut col_best: Option<(Tensor, Tensor)> = None;
    let mut r0 = 0;
    while r0 < ni {
        let r = rows.min(ni - r0);
        let xr = xc.narrow(0, r0, r)?; // (R, D)
        let mut sq: Option<Tensor> = None;
        for (k, yk) in ycols.iter().enumerate() {
            let t2 = xr.narrow(1, k, 1)?.broadcast_sub(yk)?.sqr()?; // (R, J)
            sq = Some(match sq {
                None => t2,
                Some(s) => (s + t2)?,
            });
        }
        let sq = match sq {
            Some(s) => s,
            None => Tensor::zeros((r, nj), xc.dtype(), xc.device())?, // D = 0
        };
        let c = match cost {
            CostKind::Euclidean => sq.sqrt()?,
            CostKind::SqEuclidean => (sq * 0.5)?,
        };
        let fr = f.narrow(0, r0, r)?.unsqueeze(1)?; // (R, 1)
        let s = fr.broadcast_add(&g1)?.sub(&c)?; // (R, J)
        let kept = set_flags(&s.gt(thresh)?)?;
        let row_best = s.argmax(1)?.to_vec1::<u32>()?; // (R,)
        let offset = Tensor::full(r0 as u32, nj, s.device())?;
        let (cmax, carg) = (s.max(0)?, (s.argmax(0)? + offset)?); // (J,), (J,)
        col_best = Some(match col_best {
            None => (cmax, carg),
            Some((m, a)) => {
                let better = cmax.gt(&m)?; // strict: the first best row stays
                (better.where_cond(&cmax, &m)?, better.where_cond(&carg, &a)?)
            }
        });
        for (k, mut l) in kept.into_iter().enumerate() {
            let i = r0 + k;
            super::insert_sorted(&mut l, row_best[k]);
            if sym && i < nj {
                super::insert_sorted(&mut l, i as u32);
            }
            lists.push(l);
        }
        r0 += r;
    }
    // Columns that no row kept: add their best row (as the host code does).
    super::cover_columns(&mut lists, nj, || match col_best {
        Some((_, a)) => a.to_vec1::<u32>(),
        None => Ok(vec![0; nj]),
    })?;
    Ok(lists)
}

/// The centroids (Nc, D) and the cluster potentials of one clustering as tensors of
/// `dtype` on `dev`, for [`kept_lists`].
pub(crate) fn centroids(c: &Clustering, d: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    Tensor::from_slice(&c.centroids, (c.len(), d), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(dev)
}

/// One item's points in cluster order: `(perm, ranges)` as in [`Clustering`].
type Sorted = (Vec<u32>, Vec<(u32, u32)>);

/// The stable counting sort of one batch item's voxel keys: the clusters of
/// [`super::cluster::grid_cluster`] (non-empty voxels in key order, points in input order inside
/// a voxel) without the coordinates: `(perm, ranges)`. O(N + cells) when the key space is at
/// most a few times N, else a comparison sort of (key, index) pairs (same order).
fn sort_keys(keys: &[u32], cells: usize) -> Sorted {
    let n = keys.len();
    let mut perm = vec![0u32; n];
    let mut ranges = Vec::new();
    if cells <= 4 * n + (1 << 16) {
        let mut start = vec![0u32; cells + 1];
        for &k in keys {
            start[k as usize + 1] += 1;
        }
        for c in 0..cells {
            let (s, cnt) = (start[c], start[c + 1]);
            if cnt > 0 {
                ranges.push((s, s + cnt));
            }
            start[c + 1] = s + cnt;
        }
        for (i, &k) in keys.iter().enumerate() {
            let at = &mut start[k as usize];
            perm[*at as usize] = i as u32;
            *at += 1;
        }
    } else {
        let mut pairs: Vec<(u32, u32)> = keys.iter().zip(0u32..).map(|(&k, i)| (k, i)).collect();
        pairs.sort_unstable();
        let mut s = 0usize;
        while s < n {
            let mut e = s;
            while e < n && pairs[e].0 == pairs[s].0 {
                perm[e] = pairs[e].1;
                e += 1;
            }
            ranges.push((s as u32, e as u32));
            s = e;
        }
    }
    (perm, ranges)
}

/// [`super::cluster::grid_cluster`] of every batch item, with the voxel keys and the cluster
/// sums computed on the device of `x` (B, N, D) and `w` (B, N); `None` when the voxel grid has
/// more cells than the keys can hold exactly (2³² − 1, or 2²⁴ in f32 on Metal: then the caller
/// clusters on the host).
///
/// 1. Keys: `c_k = clamp(⌊(x_k − lo_k) / scale⌋, 0, 10¹⁸)` with `lo` the item's lowest corner
///    (the host formula), `key = Σ_k c_k · Π_{l>k} K_l` with `K_l` the grid's extent along axis
///    l, so that key order is the host's lexicographic cell order. One `u32` per point comes to
///    the host.
/// 2. Host: a stable counting sort of the keys ([`sort_keys`]): the permutation and the
///    cluster ranges, exactly the host code's.
/// 3. Sums: the points in cluster order (`index_select` on the device), then `scatter_add` of
///    `[a_i x_i, a_i, x_i]` into their cluster over `chunks` independent row chunks summed at
///    the end (`None`: one chunk on the CPU, which adds in the host code's order and gives its
///    centroids to the bit; up to 1024 on a GPU, Candle's `scatter_add` being sequential along
///    the scattered axis). Centroid `Σ a_i x_i / ā_I`, or the plain mean when `ā_I = 0`.
pub(crate) fn cluster(
    x: &Tensor,
    w: &Tensor,
    scale: f64,
    chunks: Option<usize>,
) -> Result<Option<Vec<Clustering>>> {
    let (b, n, d) = x.dims3()?;
    if b == 0 || n == 0 || d == 0 || d > 3 {
        return Ok(None);
    }
    let dev = x.device();
    let dt = setup_dtype(dev);
    let xs = x.detach().to_dtype(dt)?; // (B, N, D)
    let lo = xs.min_keepdim(1)?; // (B, 1, D)
    let sc = Tensor::new(scale, &Device::Cpu)?
        .to_dtype(dt)?
        .to_device(dev)?; // ()
    let cells = xs
        .broadcast_sub(&lo)?
        .broadcast_div(&sc)?
        .floor()?
        .clamp(0.0, 1e18)?; // (B, N, D)
    let ext = cells
        .max(1)?
        .max(0)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?; // (D,)
    let exact = if dt == DType::F32 {
        (1u64 << 24) as f64
    } else {
        u32::MAX as f64
    };
    let extent: Vec<f64> = ext.iter().map(|e| e + 1.0).collect();
    let total: f64 = extent.iter().product();
    if !total.is_finite() || total > exact {
        return Ok(None);
    }
    let strides: Vec<f64> = (0..d).map(|k| extent[k + 1..].iter().product()).collect();
    let strides = Tensor::from_vec(strides, d, &Device::Cpu)?
        .to_dtype(dt)?
        .to_device(dev)?;
    let keys = cells
        .broadcast_mul(&strides)?
        .sum(D::Minus1)? // (B, N), integers below 2^32 (2^24 in f32): exact
        .to_dtype(DType::U32)?
        .to_vec2::<u32>()?;
    let sorted: Vec<Sorted> = keys.iter().map(|k| sort_keys(k, total as usize)).collect();
    let nc = sorted.iter().map(|s| s.1.len()).max().unwrap_or(1);

    // The cluster sums: points in cluster order, scattered into their cluster.
    let p = match chunks {
        Some(p) => p,
        None if dev.is_cpu() => 1,
        None => ((1usize << 24) / (nc * (2 * d + 1))).clamp(1, 1024),
    }
    .clamp(1, n);
    let l = n.div_ceil(p);
    let (mut order, mut ids, mut counts) = (Vec::new(), Vec::new(), Vec::new());
    for (bi, (perm, ranges)) in sorted.iter().enumerate() {
        order.extend(perm.iter().map(|&i| (bi * n) as u32 + i));
        for (c, r) in ranges.iter().enumerate() {
            ids.extend(std::iter::repeat_n(c as u32, (r.1 - r.0) as usize));
            counts.push((r.1 - r.0) as f64);
        }
        ids.extend(std::iter::repeat_n(0, p * l - n)); // the padding rows add zeros
        counts.extend(std::iter::repeat_n(1.0, nc - ranges.len()));
    }
    let order = Tensor::from_vec(order, b * n, dev)?;
    let xo = xs.reshape((b * n, d))?.index_select(&order, 0)?; // (B·N, D)
    let wo = w
        .detach()
        .to_dtype(dt)?
        .reshape(b * n)?
        .index_select(&order, 0)?
        .unsqueeze(1)?; // (B·N, 1)
    let ch = 2 * d + 1;
    let src = Tensor::cat(&[xo.broadcast_mul(&wo)?, wo, xo], 1)?.reshape((b, n, ch))?; // (B, N, C)
    let src = src
        .pad_with_zeros(1, 0, p * l - n)?
        .reshape((b, p, l, ch))?; // (B, P, L, C)
    let ids = Tensor::from_vec(ids, (b, p, l, 1), dev)?
        .broadcast_as((b, p, l, ch))?
        .contiguous()?;
    let sums = Tensor::zeros((b, p, nc, ch), dt, dev)?
        .scatter_add(&ids, &src, 2)?
        .sum(1)?; // (B, Nc, C)
    let wx = sums.narrow(2, 0, d)?; // (B, Nc, D)
    let wsum = sums.narrow(2, d, 1)?; // (B, Nc, 1)
    let xsum = sums.narrow(2, d + 1, d)?; // (B, Nc, D)
    let cnt = Tensor::from_vec(counts, (b, nc, 1), &Device::Cpu)?
        .to_dtype(dt)?
        .to_device(dev)?;
    let positive = wsum.gt(0.0)?.broadcast_as((b, nc, d))?;
    let cen = positive.where_cond(&wx.broadcast_div(&wsum)?, &xsum.broadcast_div(&cnt)?)?; // (B, Nc, D)
    let cen = cen.to_dtype(DType::F64)?.to_vec3::<f64>()?;
    let wts = wsum.squeeze(2)?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    Ok(Some(
        sorted
            .into_iter()
            .zip(cen.into_iter().zip(wts))
            .map(|((perm, ranges), (c, wt))| {
                let k = ranges.len();
                Clustering {
                    perm,
                    centroids: c.into_iter().take(k).flatten().collect(),
                    weights: wt.into_iter().take(k).collect(),
                    ranges,
                }
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::super::cluster::grid_cluster;
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Points in [0, 1)^D with weights, a third of them zero (and one all-zero voxel).
    fn cloud(rng: &mut ChaCha8Rng, b: usize, n: usize, d: usize) -> (Vec<f64>, Vec<f64>) {
        let x: Vec<f64> = (0..b * n * d).map(|_| rng.random::<f64>()).collect();
        let mut w: Vec<f64> = (0..b * n)
            .map(|i| if i % 3 == 0 { 0.0 } else { rng.random::<f64>() })
            .collect();
        w[0] = 0.0;
        (x, w)
    }

    #[test]
    fn device_clustering_is_the_host_clustering() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let dev = Device::Cpu;
        for (b, n, d, scale) in [
            (1, 1, 3, 0.1),
            (2, 17, 1, 0.05),
            (2, 29, 2, 0.2),
            (3, 500, 3, 0.13),
            (1, 2000, 3, 0.011),
            (1, 300, 2, 1e-4), // more voxels than points: the comparison sort
        ] {
            let (x, w) = cloud(&mut rng, b, n, d);
            let xt = Tensor::from_slice(&x, (b, n, d), &dev)?;
            let wt = Tensor::from_slice(&w, (b, n), &dev)?;
            for chunks in [None, Some(7)] {
                let got = cluster(&xt, &wt, scale, chunks)?.expect("exact keys");
                for (bi, c) in got.iter().enumerate() {
                    let want = grid_cluster(
                        &x[bi * n * d..(bi + 1) * n * d],
                        &w[bi * n..(bi + 1) * n],
                        d,
                        scale,
                    );
                    assert_eq!(c.perm, want.perm, "{b} {n} {d} {scale}");
                    assert_eq!(c.ranges, want.ranges);
                    if chunks.is_none() {
                        // One chunk adds in the host's order: the same bits.
                        assert_eq!(c.centroids, want.centroids);
                        assert_eq!(c.weights, want.weights);
                    } else {
                        for (u, v) in c.centroids.iter().zip(&want.centroids) {
                            assert!((u - v).abs() <= 1e-12, "{u} vs {v}");
                        }
                        for (u, v) in c.weights.iter().zip(&want.weights) {
                            assert!((u - v).abs() <= 1e-12 * v.abs().max(1.0));
                        }
                    }
                }
            }
            // f32 points: the same clusters as the host code on their f64 values.
            let x32 = xt.to_dtype(DType::F32)?;
            let got = cluster(&x32, &wt.to_dtype(DType::F32)?, scale, None)?.expect("keys");
            let x64 = x32.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            for (bi, c) in got.iter().enumerate() {
                let want = grid_cluster(
                    &x64[bi * n * d..(bi + 1) * n * d],
                    &w[bi * n..(bi + 1) * n],
                    d,
                    scale,
                );
                assert_eq!((&c.perm, &c.ranges), (&want.perm, &want.ranges));
            }
        }
        Ok(())
    }

    #[test]
    fn too_fine_a_grid_goes_back_to_the_host() -> Result<()> {
        // 10^4 cells per axis in 3-D: 10^12 voxels, more than a u32 key holds.
        let x = Tensor::new(&[[[0.0f64, 0.0, 0.0], [1.0, 1.0, 1.0]]], &Device::Cpu)?;
        let w = Tensor::new(&[[0.5f64, 0.5]], &Device::Cpu)?;
        assert!(cluster(&x, &w, 1e-4, None)?.is_none());
        assert!(cluster(&x, &w, 1e-2, None)?.is_some());
        Ok(())
    }

    #[test]
    fn counting_and_comparison_sorts_agree() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let keys: Vec<u32> = (0..1000).map(|_| rng.random_range(0..50u32)).collect();
        let a = sort_keys(&keys, 50);
        let b = sort_keys(&keys, usize::MAX / 2); // forces the comparison sort
        assert_eq!(a, b);
        // stable: input order inside a voxel
        for &(s, e) in &a.1 {
            let p = &a.0[s as usize..e as usize];
            assert!(p.windows(2).all(|w| w[0] < w[1]));
            assert!(p.iter().all(|&i| keys[i as usize] == keys[p[0] as usize]));
        }
    }

    #[test]
    fn device_truncation_keeps_the_host_blocks() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let dev = Device::Cpu;
        for (d, nx, ny, cost, sym) in [
            (3, 300, 250, CostKind::SqEuclidean, false),
            (2, 200, 200, CostKind::Euclidean, true),
            (1, 40, 70, CostKind::SqEuclidean, false),
            (3, 1, 90, CostKind::Euclidean, false),
        ] {
            let ny = if sym { nx } else { ny };
            let xc: Vec<f64> = (0..nx * d).map(|_| rng.random::<f64>()).collect();
            let yc: Vec<f64> = if sym {
                xc.clone()
            } else {
                (0..ny * d).map(|_| rng.random::<f64>()).collect()
            };
            let f: Vec<f64> = (0..nx).map(|_| 0.05 * rng.random::<f64>()).collect();
            let g: Vec<f64> = if sym {
                f.clone()
            } else {
                (0..ny).map(|_| 0.05 * rng.random::<f64>()).collect()
            };
            let rx = Clustering {
                perm: (0..nx as u32).collect(),
                ranges: (0..nx as u32).map(|i| (i, i + 1)).collect(),
                centroids: xc.clone(),
                weights: vec![1.0; nx],
            };
            let ry = Clustering {
                perm: (0..ny as u32).collect(),
                ranges: (0..ny as u32).map(|i| (i, i + 1)).collect(),
                centroids: yc.clone(),
                weights: vec![1.0; ny],
            };
            for thresh in [-0.02, -0.1, -5.0] {
                let want = super::super::kept_lists(cost, d, &rx, &ry, &f, &g, thresh, sym)?;
                let t = |v: &[f64], n: usize, k: usize| Tensor::from_slice(v, (n, k), &dev);
                let (xt, yt) = (t(&xc, nx, d)?, t(&yc, ny, d)?);
                let (ft, gt) = (t(&f, nx, 1)?.squeeze(1)?, t(&g, ny, 1)?.squeeze(1)?);
                // one chunk, and chunks of 7 rows (the running column best across chunks)
                for chunk in [CHUNK_ELEMS, 7 * ny] {
                    let got = kept_lists_chunked(cost, &xt, &yt, &ft, &gt, thresh, sym, chunk)?;
                    assert_eq!(got, want, "d {d} {cost:?} sym {sym} thresh {thresh}");
                }
                let kept: usize = want.iter().map(|l| l.len()).sum();
                assert!(kept >= nx.max(ny));
            }
        }
        Ok(())
    }
}
