//! Pieces of Hugging Face `config.json` files shared by the model configs.

use super::rope::Scaling;
use crate::{Error, LayerSource, Result};
use serde::de::DeserializeOwned;

pub(crate) const CONFIG: &str = "config.json";

/// Reads `config.json` from a source, or says where it is missing.
pub(crate) fn read_config(source: &dyn LayerSource) -> Result<Vec<u8>> {
    source
        .file(CONFIG)?
        .ok_or_else(|| Error::config(CONFIG, format!("not found in {}", source.origin())))
}

/// Parses `config.json`, turning serde's message (e.g. "missing field `hidden_size`") into a
/// config error.
pub(crate) fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::config(CONFIG, e.to_string()))
}

/// Checks `model_type` against the names a model implementation accepts.
pub(crate) fn check_model_type(found: Option<&str>, accepted: &[&str]) -> Result<()> {
    match found {
        Some(t) if !accepted.contains(&t) => Err(Error::config(
            CONFIG,
            format!(
                "model_type is `{t}`, this loader takes {}",
                accepted.join(" or ")
            ),
        )),
        _ => Ok(()),
    }
}

/// `eos_token_id` (or `bos_token_id`) as configs write it: one id or a list.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// The `rope_scaling` object of a config. Supported: `default`, `linear` and `llama3`.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
pub struct RopeScaling {
    /// The scaling type (newer configs).
    #[serde(default)]
    pub rope_type: Option<String>,
    /// The scaling type (older configs).
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Context extension factor.
    #[serde(default)]
    pub factor: Option<f64>,
    /// Llama 3: wavelengths above `original_max_position_embeddings / low_freq_factor` are
    /// scaled by `1 / factor`.
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    /// Llama 3: wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    /// Llama 3: the context length the model was trained at.
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

impl RopeScaling {
    /// Validates the fields the scaling type needs.
    pub(crate) fn to_scaling(&self) -> Result<Scaling> {
        let kind = self
            .rope_type
            .as_deref()
            .or(self.kind.as_deref())
            .unwrap_or("default");
        let need = |v: Option<f64>, field: &str| {
            v.ok_or_else(|| {
                Error::config(
                    CONFIG,
                    format!("rope_scaling of type `{kind}` needs `{field}`"),
                )
            })
        };
        match kind {
            "default" => Ok(Scaling::None),
            "linear" => Ok(Scaling::Linear {
                factor: need(self.factor, "factor")?,
            }),
            "llama3" => Ok(Scaling::Llama3 {
                factor: need(self.factor, "factor")?,
                low_freq_factor: need(self.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: need(self.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: need(
                    self.original_max_position_embeddings.map(|v| v as f64),
                    "original_max_position_embeddings",
                )?,
            }),
            other => Err(Error::Unsupported(format!(
                "rope_scaling type `{other}` (supported: default, linear, llama3)"
            ))),
        }
    }
}
