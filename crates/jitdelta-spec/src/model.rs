//! [`SelfSpec`]: one loaded model as both draft and target, switching its JIT layers between
//! Draft and Exact modes, with one KV cache per mode.

use crate::decode::{DraftRow, SpecModel, TargetRow};
use crate::sampling::{argmax, Sampling};
use crate::Result;
use candle_core::{Tensor, D};
use jitdelta_nn::{CausalLm, KvCache, Logits, Mode, ModeHandle};

/// Self-speculation on one model whose layers share `mode` (a
/// [`JitSource`](jitdelta_nn::JitSource)'s handle): drafts run in [`Mode::Draft`], verification
/// in [`Mode::Exact`]. Works on whatever device the model lives on: only what the loop reads
/// comes back to the host, in one copy per pass: per draft pass, when greedy, the argmax, the
/// signals' five reductions over the vocabulary and two hidden-state RMS values (computed on
/// the device, in one kernel where the model has one, [`CausalLm::logit_stats`], else by
/// [`DraftRow::from_device`]; the RMS values only [`SelfSpec::with_hidden_features`]),
/// when sampling the last logits row (the draw needs `q`) and the two RMS values; per verify
/// pass, the target's argmaxes, or its rows when
/// sampling.
///
/// It switches the shared handle before every pass and leaves it in `Exact`; do not run the
/// same source elsewhere at the same time.
pub struct SelfSpec<'m> {
    model: &'m dyn CausalLm,
    mode: ModeHandle,
    draft: KvCache,
    target: KvCache,
    hidden_features: bool,
}

impl<'m> SelfSpec<'m> {
    /// Wraps `model`, whose JIT layers follow `mode`.
    pub fn new(model: &'m dyn CausalLm, mode: ModeHandle) -> Self {
        Self {
            model,
            mode,
            draft: model.new_cache(),
            target: model.new_cache(),
            hidden_features: true,
        }
    }

    /// Whether draft passes compute the hidden-state RMS features (on by default). Only the
    /// contextual bandit reads them ([`ControllerKind::uses_hidden_state`]); off, a draft pass
    /// runs a plain forward and its rows carry zeros there, saving the per-pass reductions.
    ///
    /// [`ControllerKind::uses_hidden_state`]: crate::ControllerKind::uses_hidden_state
    pub fn with_hidden_features(mut self, on: bool) -> Self {
        self.hidden_features = on;
        self
    }

    /// One draft forward pass over `tokens` (the layers already in Draft mode): the last
    /// logits and, with the features on, the hidden-state RMS after the middle and the last
    /// layer.
    fn draft_pass(&mut self, tokens: &[u32]) -> Result<(Tensor, Option<[Tensor; 2]>)> {
        let at = self.draft.len();
        if !self.hidden_features {
            let logits = self
                .model
                .forward_ids(tokens, at, &mut self.draft, Logits::Last)?;
            return Ok((logits, None));
        }
        let out = self
            .model
            .forward_ids_with_hidden(tokens, at, &mut self.draft, Logits::Last)?;
        let layers = out.hidden.len();
        let rms = if layers > 0 {
            Some([
                last_rms(&out.hidden[(layers - 1) / 2])?,
                last_rms(&out.hidden[layers - 1])?,
            ])
        } else {
            None
        };
        Ok((out.logits, rms))
    }
}

/// Root mean square of the last position of a `(1, seq, hidden)` activation, as a rank-0 f32
/// tensor on its device (f32 whatever the compute dtype, BF16 on CUDA).
fn last_rms(h: &Tensor) -> Result<Tensor> {
    let seq = h.dim(1)?;
    Ok(h.narrow(1, seq - 1, 1)?
        .to_dtype(candle_core::DType::F32)?
        .sqr()?
        .mean_all()?
        .sqrt()?)
}

impl SpecModel for SelfSpec<'_> {
    fn draft(&mut self, tokens: &[u32], sampling: &Sampling) -> Result<DraftRow> {
        self.mode.set_mode(Mode::Draft);
        let out = self.draft_pass(tokens);
        self.mode.set_mode(Mode::Exact);
        let (logits, hidden_rms) = out?;
        let stats = if sampling.is_greedy() {
            self.model.logit_stats(&logits)?
        } else {
            None
        };
        DraftRow::from_device_stats(&logits, stats, sampling, hidden_rms)
    }

    fn verify(
        &mut self,
        tokens: &[u32],
        rows: usize,
        sampling: &Sampling,
    ) -> Result<Vec<TargetRow>> {
        self.mode.set_mode(Mode::Exact);
        let logits =
            self.model
                .forward_ids(tokens, self.target.len(), &mut self.target, Logits::All)?;
        let rows = rows.clamp(1, tokens.len());
        let logits = logits.squeeze(0)?.narrow(0, tokens.len() - rows, rows)?;
        if sampling.is_greedy() {
            let argmaxes: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
            return Ok(argmaxes
                .into_iter()
                .map(|argmax| TargetRow {
                    argmax,
                    probs: None,
                })
                .collect());
        }
        let all: Vec<Vec<f32>> = logits.to_vec2()?;
        Ok(all
            .into_iter()
            .map(|l| TargetRow {
                argmax: argmax(&l),
                probs: Some(sampling.probs(&l)),
            })
            .collect())
    }

    fn draft_len(&self) -> usize {
        self.draft.len()
    }

    fn target_len(&self) -> usize {
        self.target.len()
    }

    fn rollback(&mut self, draft_len: usize, target_len: usize) -> Result<()> {
        self.draft.truncate(draft_len)?;
        self.target.truncate(target_len)?;
        Ok(())
    }
}
