//! Typed errors of candle-ot. They convert into [`candle_core::Error`], so every public
//! function returns `candle_core::Result` as the rest of Candle does.

/// What went wrong, with the argument, what was expected and what was received.
#[derive(Debug, thiserror::Error)]
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
}

impl From<OtError> for candle_core::Error {
    fn from(e: OtError) -> Self {
        candle_core::Error::wrap(e)
    }
}

pub(crate) fn opt_err<T>(name: &'static str, reason: impl Into<String>) -> candle_core::Result<T> {
    Err(OtError::Option {
        name,
        reason: reason.into(),
    }
    .into())
}
