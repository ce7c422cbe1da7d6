//! `refscore`: the reference model's summed log-probability of every chosen and rejected
//! completion of the packed preference pairs (DPO, IPO and hinge compare the trained model with
//! it). The reference is the base model as training starts from it — with a LoRA adapter that is
//! the frozen base with the adapter off, for full fine-tuning the starting weights, for QLoRA the
//! quantized base — so its key is the model (or quantize) entry's digest, the pack's, and the
//! base weights' storage: every variant of a sweep over `rl_beta`, learning rate or LoRA settings
//! reads one entry, and a rerun reads it again.
//! Reads: every file of `fetch.model` (or `quantize`) and `pack`. Writes `train.f64` and
//! `val.f64` (one little-endian f64 per packed sample, in the split's sample order: pair k's
//! chosen and rejected are samples 2k and 2k+1) and `scores.json` (counts and means).

use super::{io_err, write_json, RunCx, Stage, StageError, StageKind};
use crate::config::precision::BaseWeights;
use crate::data::pack::PackedSplit;
use crate::events::Event;
use crate::train::Batch;
use candle_core::Device;
use std::path::Path;

/// Everything the refscore stage reads, and so its key (with the model and pack digests).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RefScore {
    /// How the reference's block weights are stored (f32, the default, is left out of the key).
    #[serde(skip_serializing_if = "BaseWeights::is_f32")]
    pub base_weights: BaseWeights,
}

/// The files a split's scores are written to.
pub fn scores_file(split: &str) -> String {
    format!("{split}.f64")
}

/// Reads one split's scores (one per packed sample), checking the count against the split.
pub fn read_scores(dir: &Path, split: &str, samples: usize) -> Result<Vec<f64>, StageError> {
    let p = dir.join(scores_file(split));
    let bytes = std::fs::read(&p).map_err(io_err(&p))?;
    if bytes.len() != samples * 8 {
        return Err(StageError::Invalid(format!(
            "{}: {} scores for {samples} sequences; the entry does not belong to this pack",
            p.display(),
            bytes.len() / 8
        )));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

/// Scores every sample of a split, one packed row (bin) at a time — independent of the
/// training's micro-batch size.
fn score_split(
    model: &crate::model::Llama,
    split: &PackedSplit,
    device: &Device,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<f64>, StageError> {
    let n = split.header.bins as usize;
    let mut out = Vec::with_capacity(split.set.len());
    for b in 0..n {
        let batch = Batch::new(&[split.row(b)], device)?;
        for (c, r) in crate::train::pref::pair_logps(model, &batch)? {
            out.push(c);
            out.push(r);
        }
        progress(b + 1, n);
    }
    Ok(out)
}

impl Stage for RefScore {
    const KIND: StageKind = StageKind::Refscore;
    const VERSION: u32 = 1;
    const USES_ALL_CORES: bool = true;
    type Neutral = ();

    fn run(&self, _: &(), cx: &mut RunCx<'_>) -> Result<(), StageError> {
        let (model_up, pack_up) = match cx.upstream {
            [m, p] => (m, p),
            _ => {
                return Err(StageError::Invalid(
                    "refscore needs the model (or quantized base) and the pack upstream".into(),
                ))
            }
        };
        let device = Device::Cpu;
        let model = if model_up.dir.join(crate::model::load::PACKED_FILE).exists() {
            super::train::load_quantized(&model_up.dir, self.base_weights)?.0
        } else {
            super::train::load_model_as(&model_up.dir, self.base_weights)?.0
        };
        let mut summary = serde_json::Map::new();
        for split in ["train", "val"] {
            let dir = pack_up.dir.join(split);
            let data = PackedSplit::read(&dir)?;
            if !data.header.paired && !data.set.is_empty() {
                return Err(StageError::Invalid(format!(
                    "{}: the pack holds no preference pairs",
                    dir.display()
                )));
            }
            let name = cx.name.to_string();
            let emit = &mut *cx.emit;
            let scores = score_split(&model, &data, &device, |done, total| {
                emit(Event::Progress {
                    name: name.clone(),
                    done: done as u64,
                    total: total as u64,
                    unit: "rows",
                })
            })?;
            let p = cx.out.join(scores_file(split));
            std::fs::write(
                &p,
                scores
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            )
            .map_err(io_err(&p))?;
            let pairs = scores.len() / 2;
            let mean = |k: usize| {
                if pairs == 0 {
                    0.0
                } else {
                    scores.iter().skip(k).step_by(2).sum::<f64>() / pairs as f64
                }
            };
            summary.insert(
                split.into(),
                serde_json::json!({
                    "pairs": pairs,
                    "mean_logp_chosen": mean(0),
                    "mean_logp_rejected": mean(1),
                }),
            );
        }
        write_json(&cx.out.join("scores.json"), &summary)
    }
}
