//! # jitdelta-kernels
//!
//! GPU kernels over jitdelta's resident layout (docs/format.md §8: per chunk of rows, three
//! 16-byte aligned nibble planes — exponent code, sign + 3 mantissa bits, 4 low mantissa bits —
//! a base exponent per chunk and a CSR list of escapes):
//!
//! 1. **decode**: chunks to BF16 in global memory, bit-exact (the prefill path: decode once,
//!    then a cuBLAS GEMM);
//! 2. **fused GEMV/GEMM** for 1–8 activation rows: weights decoded in registers straight into
//!    tensor-core fragments, never written to memory, reading 1.5 bytes a weight;
//! 3. **draft**: the same reading only the code and high planes (1 byte a weight);
//! 4. **routed**: draft everywhere, exact for the chunks a router picked;
//! 5. **decode attention** ([`attention`]): short query blocks over a KV cache, each row on its
//!    own, so a speculative verify pass is bit-identical to single-token steps;
//! 6. **fused decoder ops** ([`decoder_ops`]): residual add + RMSNorm and SwiGLU's
//!    `silu(gate) * up`, one launch each instead of two.
//!
//! Every kernel has a CPU reference that the tests and the benchmark compare against: in
//! [`reference`](mod@reference), or in its own module for 5 and 6. The CUDA side needs the `cuda` feature; the references build everywhere.
//!
//! ```
//! use half::bf16;
//! use jitdelta_format::{FloatFormat, ResidentTensor};
//! use jitdelta_kernels::reference::{decode_bf16, gemv, ChunkSelection};
//! # fn main() -> jitdelta_kernels::Result<()> {
//! let w: Vec<bf16> = (0..64 * 32).map(|i| bf16::from_f32((i as f32 - 1000.0) / 512.0)).collect();
//! let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
//! let t = ResidentTensor::from_exact(FloatFormat::BF16, 64, 32, 16, 3, &bytes)?;
//! let mut again = vec![bf16::ZERO; w.len()];
//! decode_bf16(&t, &ChunkSelection::Exact, &mut again)?;
//! assert_eq!(again, w);
//! let x = vec![bf16::ONE; 32];
//! let y = gemv(&t, &ChunkSelection::Draft, &x, 1)?;
//! assert_eq!(y.y.len(), 64);
//! # Ok(()) }
//! ```
//!
//! With the `cuda` feature, `gpu::Kernels::new(stream)` compiles the kernels for the stream's
//! device (NVRTC, compute capability 8.0+), `Kernels::upload` puts a `ResidentTensor` in GPU
//! memory, and `Kernels::decode` / `Kernels::gemv` run them; `gpu::DecoderKernels` holds the
//! attention and fused decoder ops.
#![deny(missing_docs)]

pub mod attention;
pub mod decoder_ops;
pub mod device_layout;
mod error;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod reference;

pub use error::{Error, Result};
