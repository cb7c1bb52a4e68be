//! The crate's error type.

/// Everything that can go wrong in speculative decoding.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model failed (loading, a forward pass, the KV cache).
    #[error(transparent)]
    Nn(#[from] jitdelta_nn::Error),
    /// A candle operation on the model's outputs failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A controller name that does not parse (see [`ControllerKind`](crate::ControllerKind)).
    #[error("unknown controller `{given}`: {reason}")]
    Controller {
        /// What was given.
        given: String,
        /// Why it does not parse, and what would.
        reason: String,
    },
    /// An argument out of its range (a temperature of 0, an empty prompt, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
