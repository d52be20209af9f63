//! Typed errors of candle-ot. They convert into [`candle_core::Error`], so every public
//! function returns `candle_core::Result` as the rest of Candle does; [`OtError::from_candle`]
//! gets the typed error back.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use candle_ot::{Loss, OtError, SamplesLoss};
//! # fn main() -> candle_core::Result<()> {
//! let x = Tensor::zeros((10, 2), candle_core::DType::F32, &Device::Cpu)?;
//! let y = Tensor::full(f32::NAN, (12, 2), &Device::Cpu)?;
//! let err = SamplesLoss::new(Loss::Sinkhorn).forward(&x, &y).unwrap_err();
//! match OtError::from_candle(&err) {
//!     Some(OtError::NonFinite { name }) => assert_eq!(name, "y"), // skip this batch
//!     other => panic!("unexpected {other:?}"),
//! }
//! # Ok(()) }
//! ```

/// What went wrong, with the argument, what was expected and what was received.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum OtError {
    /// A tensor has the wrong rank or shape.
    #[error("{name} must be {expected}, got {got:?}")]
    Shape {
        /// The argument (`"x"`, `"a"`, `"v"`, …).
        name: &'static str,
        /// The shape it should have, e.g. `"(N, D) or (B, N, D)"`.
        expected: String,
        /// The shape it has.
        got: Vec<usize>,
    },
    /// Two tensors disagree (dimension, batch size, number of points).
    #[error("{0}")]
    Mismatch(String),
    /// A point cloud has no point.
    #[error("{name} is empty: a point cloud needs at least one point, got shape {got:?}")]
    Empty {
        /// The argument (`"x"` or `"y"`).
        name: &'static str,
        /// Its shape.
        got: Vec<usize>,
    },
    /// NaN or infinity in an input.
    #[error("{name} contains non-finite values (NaN or Inf)")]
    NonFinite {
        /// The argument.
        name: &'static str,
    },
    /// Weights with a negative entry, or with no positive entry.
    #[error("{name}: {reason}")]
    Weights {
        /// The argument (`"a"`, `"b"`, or `"a, b"` for unequal total masses).
        name: &'static str,
        /// What is wrong with them.
        reason: String,
    },
    /// An option outside its range.
    #[error("invalid option {name}: {reason}")]
    Option {
        /// The option (`"blur"`, `"scaling"`, …).
        name: &'static str,
        /// Its valid range, or why the value is refused.
        reason: String,
    },
    /// Finite inputs whose costs would overflow the compute dtype.
    #[error("{0}")]
    Range(String),
    /// A dtype, device or backend combination that is not supported.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// `tol` was not reached (with `require_convergence`).
    #[error("not converged: update error {update_error:e} ≥ tol {tol:e} after {iterations} extra iterations{}; raise max_iter or tol", if *.stopped { " (stopped by the observer)" } else { "" })]
    NotConverged {
        /// The extra iterations run at the last ε.
        iterations: usize,
        /// The last update error (units of ε).
        update_error: f64,
        /// The tolerance asked for.
        tol: f64,
        /// Whether an observer stopped the loop.
        stopped: bool,
    },
}

impl From<OtError> for candle_core::Error {
    /// `candle_core::Error::Wrapped` around the typed error, without a backtrace: these are
    /// the caller's input mistakes, one line each even with `RUST_BACKTRACE=1`.
    fn from(e: OtError) -> Self {
        candle_core::Error::Wrapped(Box::new(Carrier(e)))
    }
}

impl OtError {
    /// The typed error inside a [`candle_core::Error`] returned by this crate (also under
    /// Candle's `WithBacktrace`, `Context` and `WithPath` layers), or `None` for any other
    /// error (Candle's own, I/O, …). Returns a copy.
    pub fn from_candle(err: &candle_core::Error) -> Option<OtError> {
        use candle_core::Error as E;
        match err {
            E::Wrapped(d) => probe(d.as_ref()),
            E::WithBacktrace { inner, .. }
            | E::Context { inner, .. }
            | E::WithPath { inner, .. } => Self::from_candle(inner),
            _ => None,
        }
    }
}

// `candle_core::Error::Wrapped` holds a `Box<dyn Display>`, which cannot be downcast. The
// carrier's `Display` hands a copy of its error to `probe` when asked through this slot, and
// formats the error otherwise; any other wrapped value leaves the slot empty.
thread_local! {
    static PROBE: std::cell::RefCell<Option<Option<OtError>>> = const { std::cell::RefCell::new(None) };
}

struct Carrier(OtError);

impl std::fmt::Display for Carrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let probing = PROBE.with(|p| {
            let mut p = p.borrow_mut();
            match p.as_mut() {
                Some(slot) => {
                    *slot = Some(self.0.clone());
                    true
                }
                None => false,
            }
        });
        if probing {
            Ok(())
        } else {
            std::fmt::Display::fmt(&self.0, f)
        }
    }
}

fn probe(d: &(dyn std::fmt::Display + Send + Sync)) -> Option<OtError> {
    struct Sink;
    impl std::fmt::Write for Sink {
        fn write_str(&mut self, _: &str) -> std::fmt::Result {
            Ok(())
        }
    }
    PROBE.with(|p| *p.borrow_mut() = Some(None));
    let _ = std::fmt::write(&mut Sink, format_args!("{d}"));
    PROBE.with(|p| p.borrow_mut().take().flatten())
}

pub(crate) fn opt_err<T>(name: &'static str, reason: impl Into<String>) -> candle_core::Result<T> {
    Err(OtError::Option {
        name,
        reason: reason.into(),
    }
    .into())
}
