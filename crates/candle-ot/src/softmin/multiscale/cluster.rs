//! Voxel-grid clustering and the block structures of the multiscale backend (host code, f64).
//!
//! [`grid_cluster`] is GeomLoss's `clusterize` (pykeops' `grid_cluster` +
//! `cluster_ranges_centroids` + a sort by label): points fall into cubic cells of side
//! `scale`; each non-empty cell is a cluster with the summed weight `ā_I = Σ_{i∈I} a_i` and the
//! weighted centroid `x̄_I = Σ_{i∈I} a_i x_i / ā_I` (the plain mean when `ā_I = 0`); points are
//! sorted cluster by cluster (a stable sort on the cells in lexicographic order, so points keep
//! their input order inside a cluster) and the permutation is kept. It is the reference of
//! `on_device::cluster` (the same clusters from tensor ops on the points' device), and the
//! fallback when the voxel grid is too fine for exact `u32` keys.
//!
//! [`Blocks`] is the block-sparse pattern of one cost matrix: for each row cluster, the column
//! *point ranges* of its kept column clusters, with consecutive clusters merged into one range
//! (clusters are sorted along the grid's last axis, so a ball of kept cells is a few long runs).
//! [`Pattern`] holds the patterns of a batch with their GPU task tables, uploaded once.

/// One clustered cloud (one batch item).
#[derive(Clone, Debug)]
pub(crate) struct Clustering {
    /// `perm[k]` = the input index of the k-th point in cluster order.
    pub perm: Vec<u32>,
    /// Point ranges `[start, end)` of the clusters in the sorted cloud.
    pub ranges: Vec<(u32, u32)>,
    /// Centroids x̄_I, (Nc·D), row-major.
    pub centroids: Vec<f64>,
    /// Summed weights ā_I, (Nc).
    pub weights: Vec<f64>,
}

impl Clustering {
    /// The number of clusters.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }
}

/// Clusters the points `x` (N·D, row-major) with weights `a` (N) on a grid of cell side `scale`.
pub(crate) fn grid_cluster(x: &[f64], a: &[f64], d: usize, scale: f64) -> Clustering {
    let n = a.len();
    let mut lo = vec![f64::INFINITY; d];
    for p in x.chunks(d) {
        for (l, v) in lo.iter_mut().zip(p) {
            *l = l.min(*v);
        }
    }
    // Cell coordinates relative to the lowest corner (GeomLoss anchors the grid at the origin;
    // only the cell boundaries move, the algorithm is the same). Clamped so that a huge
    // extent over a tiny scale cannot overflow.
    let cell =
        |p: &[f64], k: usize| -> u64 { ((p[k] - lo[k]) / scale).floor().clamp(0.0, 1e18) as u64 };
    let mut keys: Vec<(u64, u64, u64, u32)> = (0..n)
        .map(|i| {
            let p = &x[i * d..(i + 1) * d];
            let c = |k: usize| if k < d { cell(p, k) } else { 0 };
            (c(0), c(1), c(2), i as u32)
        })
        .collect();
    keys.sort_unstable(); // the index breaks ties: a stable order
    let mut perm = Vec::with_capacity(n);
    let mut ranges = Vec::new();
    let mut centroids = Vec::new();
    let mut weights = Vec::new();
    let mut start = 0usize;
    while start < n {
        let key = (keys[start].0, keys[start].1, keys[start].2);
        let mut end = start;
        let mut w = 0.0;
        let mut c = vec![0.0; d];
        let mut mean = vec![0.0; d];
        while end < n && (keys[end].0, keys[end].1, keys[end].2) == key {
            let i = keys[end].3 as usize;
            perm.push(i as u32);
            let wi = a[i];
            w += wi;
            for k in 0..d {
                c[k] += wi * x[i * d + k];
                mean[k] += x[i * d + k];
            }
            end += 1;
        }
        let cnt = (end - start) as f64;
        for k in 0..d {
            centroids.push(if w > 0.0 { c[k] / w } else { mean[k] / cnt });
        }
        weights.push(w);
        ranges.push((start as u32, end as u32));
        start = end;
    }
    Clustering {
        perm,
        ranges,
        centroids,
        weights,
    }
}

/// GeomLoss's default cluster scale, `diameter / (√D · 2000^{1/D})`: about 2000 cells over the
/// bounding box.
pub(crate) fn default_cluster_scale(diameter: f64, d: usize) -> f64 {
    let df = d as f64;
    diameter / (df.sqrt() * 2000f64.powf(1.0 / df))
}

/// The block-sparse pattern of one cost matrix (one batch item): for each row cluster I,
/// `spans[offsets[I]..offsets[I+1]]` are the column point ranges it is reduced over.
#[derive(Clone, Debug, Default)]
pub(crate) struct Blocks {
    /// Row point ranges, one per row cluster.
    pub rows: Vec<(u32, u32)>,
    /// CSR offsets into `spans`, (row clusters + 1).
    pub offsets: Vec<u32>,
    /// Column point ranges `[start, end)`.
    pub spans: Vec<(u32, u32)>,
    /// Kept point pairs `Σ_{(I, J) kept} |I|·|J|`.
    pub pairs: u64,
    /// Kept cluster pairs (I, J).
    pub cluster_pairs: u64,
}

impl Blocks {
    /// From sorted kept lists: `lists[I]` holds the kept column clusters J of row cluster I.
    pub fn from_lists(rows: &[(u32, u32)], cols: &[(u32, u32)], lists: &[Vec<u32>]) -> Blocks {
        let mut offsets = Vec::with_capacity(rows.len() + 1);
        let mut spans: Vec<(u32, u32)> = Vec::new();
        let mut pairs = 0u64;
        let mut cluster_pairs = 0u64;
        offsets.push(0u32);
        for (r, l) in rows.iter().zip(lists) {
            let nrow = (r.1 - r.0) as u64;
            let mut last: Option<u32> = None;
            for &j in l {
                let c = cols[j as usize];
                cluster_pairs += 1;
                pairs += nrow * (c.1 - c.0) as u64;
                match last {
                    Some(lj) if lj + 1 == j => spans.last_mut().expect("a span").1 = c.1,
                    _ => spans.push(c),
                }
                last = Some(j);
            }
            offsets.push(spans.len() as u32);
        }
        Blocks {
            rows: rows.to_vec(),
            offsets,
            spans,
            pairs,
            cluster_pairs,
        }
    }

    /// All pairs: one row cluster covering `n` points, one span covering `m`.
    pub fn dense(n: usize, m: usize) -> Blocks {
        Blocks {
            rows: vec![(0, n as u32)],
            offsets: vec![0, 1],
            spans: vec![(0, m as u32)],
            pairs: (n * m) as u64,
            cluster_pairs: 1,
        }
    }

    /// The column spans of row cluster `r`.
    pub fn spans_of(&self, r: usize) -> &[(u32, u32)] {
        &self.spans[self.offsets[r] as usize..self.offsets[r + 1] as usize]
    }
}

/// A batch of block patterns (one [`Blocks`] per batch item) with its GPU task tables.
///
/// A block-sparse launch needs the pattern as a task table on the device ([`task_table`]). The
/// fine level of the multiscale loop launches the same pattern tens of times (every iteration,
/// both sides of the backward); the table is built and uploaded on the first launch for a
/// given device and rows-per-task, and every later launch reuses the upload. The cache is
/// device-independent: the device glue hands [`Pattern::table`] its own upload closure and a
/// key naming the device, and gets back what that closure built (a CUDA slice pair, Metal
/// buffers), so the same code path is unit-tested on the CPU.
#[derive(Debug, Default)]
pub(crate) struct Pattern {
    /// One pattern per batch item.
    pub blocks: Vec<Blocks>,
    tables: TableCache,
}

/// Uploaded task tables, keyed by (rows per task, device).
#[derive(Default)]
struct TableCache(std::sync::Mutex<Vec<TableEntry>>);

type TableEntry = (u32, String, std::sync::Arc<dyn std::any::Any + Send + Sync>);

impl std::fmt::Debug for TableCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map(|t| t.len()).unwrap_or(0);
        write!(f, "TableCache({n} uploaded)")
    }
}

impl Pattern {
    /// The pattern of a batch, no table uploaded yet.
    pub fn new(blocks: Vec<Blocks>) -> Self {
        Self {
            blocks,
            tables: TableCache::default(),
        }
    }

    /// The mean number of rows per row cluster ([`mean_cluster_rows`]).
    #[cfg_attr(not(any(feature = "cuda", feature = "metal")), allow(dead_code))]
    pub fn mean_cluster_rows(&self) -> u32 {
        mean_cluster_rows(&self.blocks)
    }

    /// The task table of this pattern with `rows_per_task` rows per task on the device named
    /// `device`: `upload(tasks, spans)` (the vectors of [`task_table`]) runs on the first call
    /// for that key, and later calls return its cached result.
    #[cfg_attr(not(any(feature = "cuda", feature = "metal", test)), allow(dead_code))]
    pub fn table<T: std::any::Any + Send + Sync>(
        &self,
        rows_per_task: u32,
        device: &str,
        upload: impl FnOnce(Vec<u32>, Vec<u32>) -> candle_core::Result<T>,
    ) -> candle_core::Result<std::sync::Arc<T>> {
        let mut cache =
            self.tables.0.lock().map_err(|_| {
                candle_core::Error::Msg("candle-ot: task table cache poisoned".into())
            })?;
        for (r, d, t) in cache.iter() {
            if *r == rows_per_task && d == device {
                if let Ok(t) = t.clone().downcast::<T>() {
                    return Ok(t);
                }
            }
        }
        let (tasks, spans) = task_table(&self.blocks, rows_per_task);
        let t = std::sync::Arc::new(upload(tasks, spans)?);
        cache.push((rows_per_task, device.to_string(), t.clone()));
        Ok(t)
    }

    /// How many task tables were built and uploaded (one per device and rows-per-task).
    #[cfg(test)]
    pub fn tables_built(&self) -> usize {
        self.tables.0.lock().map(|t| t.len()).unwrap_or(0)
    }
}

impl std::ops::Deref for Pattern {
    type Target = [Blocks];

    fn deref(&self) -> &[Blocks] {
        &self.blocks
    }
}

/// The GPU task table of a batch of patterns (one per batch item) for the block-sparse kernels
/// (`candle_ot_kernels`' `block_*` entry points): 5 `u32` per task (`b, row_start, row_end,
/// span_begin, span_end`), each task at most `rows_per_task` rows of one row cluster, and the
/// spans of every batch item concatenated (2 `u32` each, column ranges within the batch item).
#[cfg_attr(not(any(feature = "cuda", feature = "metal", test)), allow(dead_code))]
pub(crate) fn task_table(patterns: &[Blocks], rows_per_task: u32) -> (Vec<u32>, Vec<u32>) {
    let step = rows_per_task.max(1);
    let (mut tasks, mut spans) = (Vec::new(), Vec::new());
    for (b, p) in patterns.iter().enumerate() {
        let base = (spans.len() / 2) as u32;
        for &(c0, c1) in &p.spans {
            spans.extend_from_slice(&[c0, c1]);
        }
        for (r, &(s, e)) in p.rows.iter().enumerate() {
            let (s0, s1) = (base + p.offsets[r], base + p.offsets[r + 1]);
            let mut i = s;
            while i < e {
                let j = e.min(i.saturating_add(step));
                tasks.extend_from_slice(&[b as u32, i, j, s0, s1]);
                i = j;
            }
        }
    }
    (tasks, spans)
}

/// The mean number of rows per row cluster over a batch of patterns (at least 1).
#[cfg_attr(not(any(feature = "cuda", feature = "metal", test)), allow(dead_code))]
pub(crate) fn mean_cluster_rows(patterns: &[Blocks]) -> u32 {
    let clusters: usize = patterns.iter().map(|p| p.rows.len()).sum();
    let rows: u64 = patterns
        .iter()
        .flat_map(|p| p.rows.iter().map(|r| (r.1 - r.0) as u64))
        .sum();
    (rows / clusters.max(1) as u64).clamp(1, u32::MAX as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_are_contiguous_with_weighted_centroids() {
        // 1-D: cells of side 1.
        let x = [0.0, 3.5, 0.7, 3.1, 1.5]; // cells 0, 3, 0, 3, 1 from the lowest point
        let a = [1.0, 1.0, 3.0, 1.0, 2.0];
        let c = grid_cluster(&x, &a, 1, 1.0);
        assert_eq!(c.len(), 3);
        assert_eq!(c.perm, vec![0, 2, 4, 1, 3]);
        assert_eq!(c.ranges, vec![(0, 2), (2, 3), (3, 5)]);
        assert!((c.centroids[0] - 3.0 * 0.7 / 4.0).abs() < 1e-12);
        assert_eq!(c.weights, vec![4.0, 2.0, 2.0]);
    }

    #[test]
    fn zero_weight_clusters_use_the_plain_mean() {
        let c = grid_cluster(&[0.0, 0.0, 0.5, 0.5], &[0.0, 0.0], 2, 1.0);
        assert_eq!(c.centroids, vec![0.25, 0.25]);
        assert_eq!(c.weights, vec![0.0]);
    }

    #[test]
    fn consecutive_kept_clusters_merge_into_one_span() {
        let rows = [(0, 2), (2, 5)];
        let cols = [(0, 1), (1, 4), (4, 6)];
        let b = Blocks::from_lists(&rows, &cols, &[vec![0, 1], vec![0, 2]]);
        assert_eq!(b.spans_of(0), &[(0, 4)]);
        assert_eq!(b.spans_of(1), &[(0, 1), (4, 6)]);
        assert_eq!(b.pairs, 2 * 4 + 3 * 3);
        assert_eq!(b.cluster_pairs, 4);
    }

    #[test]
    fn task_tables_are_built_once_per_device_and_rows_per_task() {
        let rows = [(0, 2), (2, 7)];
        let cols = [(0, 1), (1, 4), (4, 6)];
        let p = Pattern::new(vec![Blocks::from_lists(
            &rows,
            &cols,
            &[vec![0, 1], vec![0, 2]],
        )]);
        let mut uploads = 0;
        let mut get = |r: u32, dev: &str| {
            p.table(r, dev, |t, s| {
                uploads += 1;
                Ok((t, s))
            })
            .unwrap()
        };
        let first = get(3, "gpu0");
        for _ in 0..10 {
            // the iterations of a solve: no new upload
            assert!(std::sync::Arc::ptr_eq(&first, &get(3, "gpu0")));
        }
        assert_eq!(first.0, task_table(&p.blocks, 3).0);
        get(4, "gpu0"); // other rows per task
        get(3, "gpu1"); // other device
        assert_eq!(uploads, 3);
        assert_eq!(p.tables_built(), 3);
        // a failed upload caches nothing
        assert!(p
            .table::<u8>(5, "gpu0", |_, _| candle_core::bail!("no memory"))
            .is_err());
        assert_eq!(p.tables_built(), 3);
    }

    #[test]
    fn task_table_cuts_clusters_and_offsets_spans() {
        let rows = [(0, 2), (2, 7)];
        let cols = [(0, 1), (1, 4), (4, 6)];
        let a = Blocks::from_lists(&rows, &cols, &[vec![0, 1], vec![0, 2]]);
        let b = Blocks::from_lists(&rows, &cols, &[vec![2], vec![1]]);
        let (tasks, spans) = task_table(&[a, b], 3);
        assert_eq!(spans, vec![0, 4, 0, 1, 4, 6, 4, 6, 1, 4]);
        #[rustfmt::skip]
        assert_eq!(tasks, vec![
            0, 0, 2, 0, 1,
            0, 2, 5, 1, 3,
            0, 5, 7, 1, 3,
            1, 0, 2, 3, 4,
            1, 2, 5, 4, 5,
            1, 5, 7, 4, 5,
        ]);
        assert_eq!(
            mean_cluster_rows(&[Blocks::dense(10, 3), Blocks::dense(4, 3)]),
            7
        );
    }
}
