//! The thread pool used by the CPU kernels.
//!
//! By default the CPU kernels run on rayon's global pool (one thread per core, or
//! `RAYON_NUM_THREADS`). [`set_num_threads`] gives candle-ot a dedicated pool instead.
//! Every output row is reduced by exactly one thread in a fixed order, so results are
//! bit-identical across runs and across thread counts.

use std::sync::{Arc, RwLock};

static POOL: RwLock<Option<Arc<rayon::ThreadPool>>> = RwLock::new(None);

/// Sets the number of threads of candle-ot's CPU kernels. `0` returns to rayon's global pool.
pub fn set_num_threads(n: usize) -> candle_core::Result<()> {
    let pool = if n == 0 {
        None
    } else {
        let p = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("candle-ot-{i}"))
            .build()
            .map_err(candle_core::Error::wrap)?;
        Some(Arc::new(p))
    };
    *POOL.write().unwrap_or_else(|e| e.into_inner()) = pool;
    Ok(())
}

/// The number of threads the CPU kernels use now.
pub fn num_threads() -> usize {
    match &*POOL.read().unwrap_or_else(|e| e.into_inner()) {
        Some(p) => p.current_num_threads(),
        None => rayon::current_num_threads(),
    }
}

/// Runs `f` inside candle-ot's pool (or the global one).
pub(crate) fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let pool = POOL.read().unwrap_or_else(|e| e.into_inner()).clone();
    match pool {
        Some(p) => p.install(f),
        None => f(),
    }
}
