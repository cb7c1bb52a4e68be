//! Causal language models written against [`LayerSource`]: Llama (SmolLM2, Llama 2/3,
//! Mistral) and Qwen2.

/// `CausalLm` for a model struct that wraps a `decoder: Decoder` (every architecture here).
macro_rules! decoder_causal_lm {
    ($model:ty) => {
        impl CausalLm for $model {
            fn info(&self) -> &ModelInfo {
                self.decoder.info()
            }

            fn device(&self) -> &Device {
                self.decoder.device()
            }

            fn forward(
                &self,
                tokens: &Tensor,
                offset: usize,
                cache: &mut KvCache,
                logits: Logits,
            ) -> Result<Tensor> {
                Ok(self
                    .decoder
                    .forward(tokens, offset, cache, logits, false)?
                    .logits)
            }

            fn forward_with_hidden(
                &self,
                tokens: &Tensor,
                offset: usize,
                cache: &mut KvCache,
                logits: Logits,
            ) -> Result<ForwardOutput> {
                self.decoder.forward(tokens, offset, cache, logits, true)
            }

            fn forward_ids(
                &self,
                ids: &[u32],
                offset: usize,
                cache: &mut KvCache,
                logits: Logits,
            ) -> Result<Tensor> {
                Ok(self
                    .decoder
                    .forward_ids(ids, offset, cache, logits, false)?
                    .logits)
            }

            fn forward_ids_with_hidden(
                &self,
                ids: &[u32],
                offset: usize,
                cache: &mut KvCache,
                logits: Logits,
            ) -> Result<ForwardOutput> {
                self.decoder.forward_ids(ids, offset, cache, logits, true)
            }

            fn logit_stats(&self, logits: &Tensor) -> Result<Option<Tensor>> {
                self.decoder.logit_stats(logits)
            }
        }
    };
}

mod config;
mod decoder;
pub mod llama;
pub mod qwen2;
mod rope;

pub use config::{RopeScaling, TokenIds};
pub use llama::{Llama, LlamaConfig};
pub use qwen2::{Qwen2, Qwen2Config};

use crate::{Error, KvCache, LayerSource, Result};
use candle_core::{Device, Tensor};

/// Which positions a forward pass returns logits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position: shape `(batch, vocab)`.
    Last,
    /// Every position: shape `(batch, seq, vocab)`.
    All,
}

/// What a model is, as read from its config.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// `llama` or `qwen2`.
    pub architecture: &'static str,
    /// Vocabulary size (logits width).
    pub vocab_size: usize,
    /// Hidden size (width of the hidden activations).
    pub hidden_size: usize,
    /// Number of decoder layers (and of KV-cache layers).
    pub num_layers: usize,
    /// The longest sequence the model supports.
    pub max_position_embeddings: usize,
    /// The beginning-of-sequence token, if the config names one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens named by the config.
    pub eos_token_ids: Vec<u32>,
}

/// Logits plus the hidden activations of every decoder layer.
#[derive(Clone, Debug)]
pub struct ForwardOutput {
    /// As [`CausalLm::forward`] returns them.
    pub logits: Tensor,
    /// The residual stream after each decoder layer, `(batch, seq, hidden)` each, in layer
    /// order (before the final norm).
    pub hidden: Vec<Tensor>,
}

/// A causal language model with a truncatable KV cache.
pub trait CausalLm: Send + Sync {
    /// The model's dimensions and special tokens.
    fn info(&self) -> &ModelInfo;

    /// The device the model runs on.
    fn device(&self) -> &Device;

    /// Runs `tokens` (`(batch, seq)`, u32) at positions `offset..offset + seq`, appending
    /// their keys and values to `cache` (whose length must equal `offset`), and returns f32
    /// logits for the last or all positions. On error the cache is left as it was.
    fn forward(
        &self,
        tokens: &Tensor,
        offset: usize,
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<Tensor>;

    /// Like [`CausalLm::forward`], also returning each layer's hidden activations.
    fn forward_with_hidden(
        &self,
        tokens: &Tensor,
        offset: usize,
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<ForwardOutput>;

    /// An empty KV cache for this model.
    fn new_cache(&self) -> KvCache {
        KvCache::new(self.info().num_layers)
    }

    /// [`CausalLm::forward`] for one sequence of token ids (batch 1). The models here check
    /// the ids on the host, where `forward` reads them back from the device (a wait for the
    /// device each call).
    fn forward_ids(
        &self,
        ids: &[u32],
        offset: usize,
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<Tensor> {
        let tokens = Tensor::from_slice(ids, (1, ids.len()), self.device())?;
        self.forward(&tokens, offset, cache, logits)
    }

    /// [`CausalLm::forward_with_hidden`] for one sequence of token ids, as
    /// [`CausalLm::forward_ids`].
    fn forward_ids_with_hidden(
        &self,
        ids: &[u32],
        offset: usize,
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<ForwardOutput> {
        let tokens = Tensor::from_slice(ids, (1, ids.len()), self.device())?;
        self.forward_with_hidden(&tokens, offset, cache, logits)
    }

    /// `[argmax, Z, S, l2, ties]` of one row of this model's logits (what a greedy speculative
    /// draft reads; `jitdelta-kernels`' `decoder_ops::logit_stats` defines them) as an f32
    /// tensor of 5, computed in one kernel where the model has one (CUDA); `None` elsewhere,
    /// and the caller computes them with tensor ops.
    fn logit_stats(&self, logits: &Tensor) -> Result<Option<Tensor>> {
        let _ = logits;
        Ok(None)
    }
}

/// Loads the model `config.json` of `source` describes (`model_type` `llama`, `mistral` or
/// `qwen2`).
pub fn load_causal_lm(source: &dyn LayerSource) -> Result<Box<dyn CausalLm>> {
    let bytes = config::read_config(source)?;
    let value: serde_json::Value = config::parse(&bytes)?;
    match value.get("model_type").and_then(|v| v.as_str()) {
        Some("llama" | "mistral") => {
            let cfg = LlamaConfig::from_json(&bytes)?;
            Ok(Box::new(Llama::load(source, &cfg)?))
        }
        Some("qwen2") => {
            let cfg = Qwen2Config::from_json(&bytes)?;
            Ok(Box::new(Qwen2::load(source, &cfg)?))
        }
        Some(other) => Err(Error::Unsupported(format!(
            "model_type `{other}` (this crate implements llama, mistral and qwen2)"
        ))),
        None => Err(Error::config("config.json", "no `model_type` field")),
    }
}

/// Greedy decoding: feeds `prompt`, then appends the argmax token until `max_new` tokens or
/// a token of `stop`. Returns the new tokens (a stop token included).
pub fn greedy_generate(
    model: &dyn CausalLm,
    prompt: &[u32],
    max_new: usize,
    stop: &[u32],
) -> Result<Vec<u32>> {
    let mut cache = model.new_cache();
    let mut out = Vec::with_capacity(max_new);
    let mut input = prompt.to_vec();
    while out.len() < max_new {
        let logits = model.forward_ids(&input, cache.len(), &mut cache, Logits::Last)?;
        let next = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
        out.push(next);
        if stop.contains(&next) {
            break;
        }
        input = vec![next];
    }
    Ok(out)
}
