use thiserror::Error;

/// Errors of the kernels crate.
#[derive(Debug, Error)]
pub enum Error {
    /// The tensor's layout has no kernel (e.g. not BF16 with three nibble planes).
    #[error("unsupported tensor for the GPU kernels: {0}")]
    Unsupported(String),
    /// A buffer or argument does not match the tensor.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A tuning define (`-DNAME=value`) has a value that is not a number.
    #[error("kernel define {0}")]
    Define(String),
    /// A GEMV kernel fits fewer blocks per SM than its size class assumes (its
    /// `GEMV_MIN_BLOCKS`): a register cap or shared-memory ring too large for the device.
    #[error("kernel {kernel} fits {blocks} blocks per SM, its size class needs {wanted}")]
    Occupancy {
        /// The kernel's name.
        kernel: String,
        /// Blocks of it that fit on one SM.
        blocks: u32,
        /// Blocks per SM its launch sizing assumes.
        wanted: u32,
    },
    /// Decoding on the CPU failed.
    #[error(transparent)]
    Format(#[from] jitdelta_format::Error),
    /// A CUDA driver call failed.
    #[cfg(feature = "cuda")]
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// NVRTC could not compile the kernels.
    #[cfg(feature = "cuda")]
    #[error("NVRTC: {0}")]
    Compile(#[from] cudarc::nvrtc::CompileError),
    /// A cuBLAS call failed.
    #[cfg(feature = "cuda")]
    #[error("cuBLAS: {0}")]
    Cublas(#[from] cudarc::cublas::result::CublasError),
}

/// Result with this crate's [`Error`](enum@Error).
pub type Result<T> = std::result::Result<T, Error>;
