//! Qwen2 (and Qwen2.5): the Llama block with biases on the q, k and v projections.

use super::config::{self, check_model_type, RopeScaling, TokenIds};
use super::decoder::{Decoder, DecoderConfig};
use super::rope::Scaling;
use super::{CausalLm, ForwardOutput, Logits, ModelInfo};
use crate::{Error, KvCache, LayerSource, Result};
use candle_core::{Device, Tensor};

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_max_positions() -> usize {
    32_768
}

fn default_act() -> String {
    "silu".into()
}

/// The fields of a Hugging Face Qwen2 `config.json` this model reads.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Qwen2Config {
    /// `qwen2` when present.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads.
    pub num_key_value_heads: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary base frequency.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Rotary scaling (`null`, `linear` or `llama3`).
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Longest supported sequence.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// Whether the LM head reuses the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Sliding-window attention; not supported when `true`.
    #[serde(default)]
    pub use_sliding_window: bool,
    /// The MLP activation; only `silu` is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Beginning-of-sequence token.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token(s).
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
}

impl Qwen2Config {
    /// Parses a `config.json`; errors name the missing or inconsistent field.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let cfg: Self = config::parse(bytes)?;
        check_model_type(cfg.model_type.as_deref(), &["qwen2"])?;
        Ok(cfg)
    }

    /// Reads and parses the source's `config.json`.
    pub fn from_source(source: &dyn LayerSource) -> Result<Self> {
        Self::from_json(&config::read_config(source)?)
    }

    fn decoder_config(&self) -> Result<DecoderConfig> {
        if self.hidden_act != "silu" {
            return Err(Error::Unsupported(format!(
                "hidden_act `{}` (only silu)",
                self.hidden_act
            )));
        }
        if self.use_sliding_window {
            return Err(Error::Unsupported("Qwen2 sliding-window attention".into()));
        }
        let heads = self.num_attention_heads;
        if heads == 0 || self.hidden_size % heads != 0 {
            return Err(Error::config(
                config::CONFIG,
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {heads}",
                    self.hidden_size
                ),
            ));
        }
        Ok(DecoderConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            vocab_size: self.vocab_size,
            num_layers: self.num_hidden_layers,
            num_heads: heads,
            num_kv_heads: self.num_key_value_heads,
            head_dim: self.hidden_size / heads,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling: match &self.rope_scaling {
                Some(s) => s.to_scaling()?,
                None => Scaling::None,
            },
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: true,
            o_bias: false,
            mlp_bias: false,
        })
    }

    fn info(&self) -> ModelInfo {
        ModelInfo {
            architecture: "qwen2",
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_layers: self.num_hidden_layers,
            max_position_embeddings: self.max_position_embeddings,
            bos_token_id: self.bos_token_id,
            eos_token_ids: self
                .eos_token_id
                .as_ref()
                .map_or(Vec::new(), TokenIds::to_vec),
        }
    }
}

/// A Qwen2 causal LM whose projections come from a [`LayerSource`].
pub struct Qwen2 {
    decoder: Decoder,
}

impl Qwen2 {
    /// Builds the model from `source`; a tensor that is missing or shaped differently from
    /// what `cfg` implies is an error naming it.
    pub fn load(source: &dyn LayerSource, cfg: &Qwen2Config) -> Result<Self> {
        Ok(Self {
            decoder: Decoder::load(source, cfg.decoder_config()?, cfg.info())?,
        })
    }
}

decoder_causal_lm!(Qwen2);
