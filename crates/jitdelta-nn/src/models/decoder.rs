//! The decoder-only transformer shared by the Llama and Qwen2 loaders: pre-norm blocks of
//! grouped-query self-attention with rotary embeddings and a SwiGLU MLP, RMSNorm everywhere.

use super::rope::{Rope, Scaling};
use super::{ForwardOutput, Logits, ModelInfo};
use crate::linear::{declare_group, forward_all};
use crate::{Error, KvCache, LayerSource, LinearLayer, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// The shape of a decoder, validated, as the model loaders derive it from their configs.
#[derive(Clone, Debug)]
pub(crate) struct DecoderConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Scaling,
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections.
    pub qkv_bias: bool,
    /// A bias on the output projection.
    pub o_bias: bool,
    /// Biases on the MLP projections.
    pub mlp_bias: bool,
}

impl DecoderConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::config(super::config::CONFIG, m));
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.head_dim == 0 {
            return bad("num_attention_heads, num_key_value_heads and head_dim must be > 0".into());
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return bad(format!(
                "head_dim {} is odd (rotary embeddings need pairs)",
                self.head_dim
            ));
        }
        if self.hidden_size == 0 || self.vocab_size == 0 || self.num_layers == 0 {
            return bad("hidden_size, vocab_size and num_hidden_layers must be > 0".into());
        }
        Ok(())
    }
}

struct Block {
    input_norm: Tensor,
    post_norm: Tensor,
    q: Arc<dyn LinearLayer>,
    k: Arc<dyn LinearLayer>,
    v: Arc<dyn LinearLayer>,
    o: Arc<dyn LinearLayer>,
    gate: Arc<dyn LinearLayer>,
    up: Arc<dyn LinearLayer>,
    down: Arc<dyn LinearLayer>,
}

/// A loaded decoder.
pub(crate) struct Decoder {
    cfg: DecoderConfig,
    info: ModelInfo,
    device: Device,
    dtype: DType,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Arc<dyn LinearLayer>,
    rope: Rope,
    /// Attention of single-token steps and verify blocks, add + RMSNorm and silu * up on CUDA:
    /// one kernel launch each.
    #[cfg(feature = "cuda")]
    fused: crate::gpu_ops::FusedOps,
}

fn norm(source: &dyn LayerSource, name: &str, size: usize) -> Result<Tensor> {
    Ok(source.tensor(name, &[size])?.to_dtype(source.dtype())?)
}

impl Decoder {
    /// [`CausalLm::logit_stats`](super::CausalLm::logit_stats): the fused kernel on CUDA.
    pub(crate) fn logit_stats(&self, logits: &Tensor) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        return Ok(self.fused.logit_stats(logits)?);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = logits;
            Ok(None)
        }
    }

    /// Builds the decoder from `source` (Hugging Face tensor names).
    pub(crate) fn load(
        source: &dyn LayerSource,
        cfg: DecoderConfig,
        info: ModelInfo,
    ) -> Result<Self> {
        cfg.validate()?;
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let q_size = cfg.num_heads * cfg.head_dim;
        let kv_size = cfg.num_kv_heads * cfg.head_dim;
        let embed_name = "model.embed_tokens";
        let embed = source.tensor(&format!("{embed_name}.weight"), &[cfg.vocab_size, h])?;
        if !embed.dtype().is_float() {
            return Err(Error::UnsupportedDtype {
                name: format!("{embed_name}.weight"),
                dtype: format!("{:?}", embed.dtype()),
            });
        }
        let blocks = (0..cfg.num_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                let lin =
                    |name: &str, shape, bias| source.linear(&format!("{p}.{name}"), shape, bias);
                let block = Block {
                    input_norm: norm(source, &format!("{p}.input_layernorm.weight"), h)?,
                    post_norm: norm(source, &format!("{p}.post_attention_layernorm.weight"), h)?,
                    q: lin("self_attn.q_proj", (q_size, h), cfg.qkv_bias)?,
                    k: lin("self_attn.k_proj", (kv_size, h), cfg.qkv_bias)?,
                    v: lin("self_attn.v_proj", (kv_size, h), cfg.qkv_bias)?,
                    o: lin("self_attn.o_proj", (h, q_size), cfg.o_bias)?,
                    gate: lin("mlp.gate_proj", (i, h), cfg.mlp_bias)?,
                    up: lin("mlp.up_proj", (i, h), cfg.mlp_bias)?,
                    down: lin("mlp.down_proj", (h, i), cfg.mlp_bias)?,
                };
                // The groups `forward_all` runs.
                declare_group(&[&block.q, &block.k, &block.v]);
                declare_group(&[&block.gate, &block.up]);
                Ok(block)
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = norm(source, "model.norm.weight", h)?;
        let head_name = if cfg.tie_word_embeddings {
            embed_name
        } else {
            "lm_head"
        };
        let lm_head = source.linear(head_name, (cfg.vocab_size, h), false)?;
        let rope = Rope::new(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling);
        Ok(Self {
            cfg,
            info,
            device: source.device().clone(),
            dtype: source.dtype(),
            embed,
            blocks,
            norm,
            lm_head,
            rope,
            #[cfg(feature = "cuda")]
            fused: crate::gpu_ops::FusedOps::new(source.device())?,
        })
    }

    pub(crate) fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// Runs the model; see [`super::CausalLm::forward`]. With `hidden`, collects each layer's
    /// output.
    pub(crate) fn forward(
        &self,
        tokens: &Tensor,
        offset: usize,
        cache: &mut KvCache,
        logits: Logits,
        collect_hidden: bool,
    ) -> Result<ForwardOutput> {
        if tokens.elem_count() > 0 {
            // A read of the device's result: it waits for the work queued before.
            self.check_token(tokens.flatten_all()?.max(0)?.to_scalar::<u32>()?)?;
        }
        self.forward_checked(tokens, offset, cache, logits, collect_hidden)
    }

    /// [`Decoder::forward`] for token ids on the host (batch 1): they are checked there, so
    /// the pass queues its work without waiting for the device.
    pub(crate) fn forward_ids(
        &self,
        ids: &[u32],
        offset: usize,
        cache: &mut KvCache,
        logits: Logits,
        collect_hidden: bool,
    ) -> Result<ForwardOutput> {
        if let Some(&max) = ids.iter().max() {
            self.check_token(max)?;
        }
        let tokens = Tensor::from_slice(ids, (1, ids.len()), &self.device)?;
        self.forward_checked(&tokens, offset, cache, logits, collect_hidden)
    }

    fn check_token(&self, max: u32) -> Result<()> {
        if max as usize >= self.cfg.vocab_size {
            return Err(Error::InvalidInput(format!(
                "token id {max} is outside the vocabulary ({} tokens)",
                self.cfg.vocab_size
            )));
        }
        Ok(())
    }

    /// Runs tokens whose ids are known to be in the vocabulary.
    fn forward_checked(
        &self,
        tokens: &Tensor,
        offset: usize,
        cache: &mut KvCache,
        logits: Logits,
        collect_hidden: bool,
    ) -> Result<ForwardOutput> {
        let (_, seq) = tokens.dims2()?;
        if seq == 0 {
            return Err(Error::InvalidInput("no tokens to run".into()));
        }
        if offset != cache.len() || cache.num_layers() != self.blocks.len() {
            return Err(Error::InvalidInput(format!(
                "position offset {offset} with a KV cache of {} positions and {} layers \
                 (the model has {} layers)",
                cache.len(),
                cache.num_layers(),
                self.blocks.len()
            )));
        }
        match self.run(tokens, offset, cache, logits, collect_hidden) {
            Ok(out) => {
                cache.advance(seq);
                Ok(out)
            }
            Err(e) => {
                // Drop whatever the failed pass appended to some layers.
                cache.truncate(offset)?;
                Err(e)
            }
        }
    }

    fn run(
        &self,
        tokens: &Tensor,
        offset: usize,
        cache: &mut KvCache,
        logits: Logits,
        collect_hidden: bool,
    ) -> Result<ForwardOutput> {
        let (b, seq) = tokens.dims2()?;
        let mut x = self
            .embed
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, seq, self.cfg.hidden_size))?
            .to_dtype(self.dtype)?;
        let rope = self.rope_tables(b, offset, seq)?;
        // Per-position blocks attend without a mask.
        let mask = if per_position(seq, offset) {
            None
        } else {
            self.mask(seq, offset)?
        };
        let eps = self.cfg.rms_norm_eps as f32;
        let mut hidden = Vec::new();
        // Every norm but the first follows a residual add: the two run as one op, `h` the
        // normalised stream, `x` the stream itself.
        let first_norm = self.blocks.first().map_or(&self.norm, |b| &b.input_norm);
        let mut h = candle_nn::ops::rms_norm(&x, first_norm, eps)?;
        for (l, block) in self.blocks.iter().enumerate() {
            let attn = self.attention(block, &h, l, cache, &rope, mask.as_ref())?;
            let (x_attn, h_attn) = self.add_rms_norm(&x, &attn, &block.post_norm, eps)?;
            let [gate, up] = forward_all([&block.gate, &block.up], &h_attn)?;
            let mlp = block.down.forward(&self.silu_mul(&gate, &up)?)?;
            let next_norm = self.blocks.get(l + 1).map_or(&self.norm, |b| &b.input_norm);
            (x, h) = self.add_rms_norm(&x_attn, &mlp, next_norm, eps)?;
            if collect_hidden {
                hidden.push(x.clone());
            }
        }
        let x = h;
        let logits = match logits {
            Logits::All => self.lm_head.forward(&x)?,
            Logits::Last => self
                .lm_head
                .forward(&x.narrow(1, seq - 1, 1)?)?
                .squeeze(1)?,
        };
        Ok(ForwardOutput {
            logits: logits.to_dtype(DType::F32)?,
            hidden,
        })
    }

    /// The rotary tables of positions `offset..offset + seq`, in the form this pass's
    /// attention takes.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn rope_tables(&self, batch: usize, offset: usize, seq: usize) -> Result<RopeTables> {
        #[cfg(feature = "cuda")]
        if crate::gpu_ops::FusedOps::rope_applies(
            &self.device,
            self.dtype,
            batch,
            self.cfg.head_dim,
        ) {
            return Ok(RopeTables::Fused(self.rope.cos_sin_bf16(
                offset,
                seq,
                &self.device,
            )?));
        }
        let (cos, sin) = self.rope.cos_sin(offset, seq, &self.device)?;
        Ok(RopeTables::Separate {
            cos: cos.to_dtype(self.dtype)?,
            sin: sin.to_dtype(self.dtype)?,
        })
    }

    /// `(x + y, rms_norm(x + y) * w)`: one kernel on CUDA where it applies, else candle's ops.
    fn add_rms_norm(
        &self,
        x: &Tensor,
        y: &Tensor,
        w: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if let Some(both) = self.fused.add_rms_norm(x, y, w, eps)? {
            return Ok(both);
        }
        let sum = (x + y)?;
        let norm = candle_nn::ops::rms_norm(&sum, w, eps)?;
        Ok((sum, norm))
    }

    /// SwiGLU's `silu(gate) * up`: one kernel on CUDA where it applies, else candle's ops.
    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(y) = self.fused.silu_mul(gate, up)? {
            return Ok(y);
        }
        Ok((candle_nn::ops::silu(gate)? * up)?)
    }

    /// The additive causal mask for `seq` queries at `offset`, rows repeated for each query
    /// head of a group: `(groups * seq, offset + seq)`; none for a single query.
    fn mask(&self, seq: usize, offset: usize) -> Result<Option<Tensor>> {
        if seq == 1 {
            return Ok(None);
        }
        let groups = self.cfg.num_heads / self.cfg.num_kv_heads;
        let total = offset + seq;
        let mask: Vec<f32> = (0..groups * seq)
            .flat_map(|r| {
                let pos = offset + r % seq;
                (0..total).map(move |j| if j <= pos { 0.0 } else { f32::NEG_INFINITY })
            })
            .collect();
        Ok(Some(
            Tensor::from_vec(mask, (groups * seq, total), &self.device)?.to_dtype(self.dtype)?,
        ))
    }

    fn attention(
        &self,
        block: &Block,
        x: &Tensor,
        layer: usize,
        cache: &mut KvCache,
        rope: &RopeTables,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, seq, _) = x.dims3()?;
        let (heads, kv_heads, d) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let [q, k, v] = forward_all([&block.q, &block.k, &block.v], x)?;
        let (q, k, v) = match rope {
            RopeTables::Separate { cos, sin } => {
                let split = |t: Tensor, n: usize| -> Result<Tensor> {
                    Ok(t.reshape((b, seq, n, d))?.transpose(1, 2)?.contiguous()?)
                };
                let (q, k, v) = (split(q, heads)?, split(k, kv_heads)?, split(v, kv_heads)?);
                let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
                let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
                let (k, v) = cache.append(layer, k, v)?;
                (q, k, v)
            }
            #[cfg(feature = "cuda")]
            RopeTables::Fused(cos_sin) => {
                self.fused
                    .rope_kv(&q, &k, &v, cos_sin, (heads, kv_heads, d), cache, layer)?
            }
        };
        let offset = k.dim(2)? - seq;
        #[cfg(feature = "cuda")]
        if seq == 1 || per_position(seq, offset) {
            if let Some(y) = self.fused.attend(&q, &k, &v)? {
                return Ok(block.o.forward(&y)?);
            }
        }
        let y = if per_position(seq, offset) {
            // A short block continuing a sequence (a speculative verify pass): each position
            // attends exactly as a single-token step at that position would (same shapes, no
            // mask), so its output is bit-identical to plain decoding's. Keys and values stay
            // views of the cache, laid out as a single-token step gets them.
            let rows = (0..seq)
                .map(|i| {
                    let n = offset + i + 1;
                    self.attend(
                        &q.narrow(2, i, 1)?.contiguous()?,
                        &k.narrow(2, 0, n)?,
                        &v.narrow(2, 0, n)?,
                        None,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&rows, 1)?
        } else {
            self.attend(&q, &k, &v, mask)?
        };
        Ok(block.o.forward(&y)?)
    }

    /// Scaled dot-product attention of `q` `(b, heads, seq, d)` over `k`, `v`
    /// `(b, kv_heads, total, d)`; returns `(b, seq, heads * d)`. `k` and `v` may be views of
    /// the KV cache's buffers (heads more than `total` positions apart): candle's matmul takes
    /// that batch stride as it is, each head's matrix laid out as in a contiguous tensor, so
    /// nothing is copied and the products are those of contiguous inputs.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, heads, seq, d) = q.dims4()?;
        let kv_heads = k.dim(1)?;
        // Grouped-query attention without copying keys: the query heads of a group share
        // one key/value head, so fold them into the query length.
        let groups = heads / kv_heads;
        let q = q.reshape((b, kv_heads, groups * seq, d))?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        Ok(probs
            .matmul(v)?
            .reshape((b, heads, seq, d))?
            .transpose(1, 2)?
            .reshape((b, seq, heads * d))?)
    }
}

/// Rotary tables of one forward pass: `(seq, head_dim / 2)` cosines and sines in the model's
/// dtype for candle's rope, or the fused kernel's packed BF16 table (CUDA, BF16, batch 1).
enum RopeTables {
    Separate {
        cos: Tensor,
        sin: Tensor,
    },
    #[cfg(feature = "cuda")]
    Fused(Tensor),
}

/// Longest block attended position by position (see `attention`): speculative verify passes.
const PER_POSITION_MAX: usize = 32;

/// Whether `seq` queries at `offset` attend position by position: a short block that continues
/// a sequence.
fn per_position(seq: usize, offset: usize) -> bool {
    seq > 1 && seq <= PER_POSITION_MAX && offset > 0
}
