//! Llama: SmolLM2, Llama 2 and 3 (with `llama3` rope scaling), Mistral (without its sliding
//! window: sequences longer than the window are attended in full).

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
    4096
}

fn default_act() -> String {
    "silu".into()
}

/// The fields of a Hugging Face Llama (or Mistral) `config.json` this model reads.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct LlamaConfig {
    /// `llama` or `mistral` when present.
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
    /// Number of key/value heads (grouped-query attention); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Head dimension; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
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
    /// Biases on the attention projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
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

impl LlamaConfig {
    /// Parses a `config.json`; errors name the missing or inconsistent field.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let cfg: Self = config::parse(bytes)?;
        check_model_type(cfg.model_type.as_deref(), &["llama", "mistral"])?;
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
        let heads = self.num_attention_heads;
        let head_dim = match self.head_dim {
            Some(d) => d,
            None if heads > 0 && self.hidden_size % heads == 0 => self.hidden_size / heads,
            None => {
                return Err(Error::config(
                    config::CONFIG,
                    format!(
                        "hidden_size {} is not a multiple of num_attention_heads {heads}",
                        self.hidden_size
                    ),
                ))
            }
        };
        Ok(DecoderConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            vocab_size: self.vocab_size,
            num_layers: self.num_hidden_layers,
            num_heads: heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(heads),
            head_dim,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling: match &self.rope_scaling {
                Some(s) => s.to_scaling()?,
                None => Scaling::None,
            },
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
        })
    }

    fn info(&self) -> ModelInfo {
        ModelInfo {
            architecture: "llama",
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

/// A Llama-architecture causal LM whose projections come from a [`LayerSource`].
pub struct Llama {
    decoder: Decoder,
}

impl Llama {
    /// Builds the model from `source`; a tensor that is missing or shaped differently from
    /// what `cfg` implies is an error naming it.
    pub fn load(source: &dyn LayerSource, cfg: &LlamaConfig) -> Result<Self> {
        Ok(Self {
            decoder: Decoder::load(source, cfg.decoder_config()?, cfg.info())?,
        })
    }
}

decoder_causal_lm!(Llama);
