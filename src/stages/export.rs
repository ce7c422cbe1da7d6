//! `export`: the fine-tuned model as a deployable file set — a GGUF for llama.cpp (f32, f16,
//! q8_0, q4_0, q4_k_m) or an HF safetensors directory (f32, f16, bf16) — plus `export.json`
//! with the size and the validation perplexity of the exported model next to the unquantized
//! one, so the cost of quantization is visible.
//! Reads: `fetch.model` (the GGUF tokenizer metadata when the base is a GGUF; the weights when
//! nothing was trained), the train adapter or the merged model, and pack's `val/` files.

use super::evaluate::EvalModel;
use super::train::load_model;
use super::{write_json, RunCx, Stage, StageError, StageKind};
use crate::data::pack::PackedSplit;
use crate::model::adapter::PeftAdapter;
use crate::model::gguf_export::write_gguf;
use crate::model::{weights, Llama};
use candle_core::quantized::gguf_file::Value as GValue;
use candle_core::{DType, Device};
use serde_json::json;

pub use crate::config::{ExportFormat, SafetensorsDtype};

/// Everything the export stage reads, and so its key.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Export {
    pub format: ExportFormat,
    pub model: EvalModel,
    pub batch_size: u64,
    pub chat_template: Option<String>,
    pub max_shard_size: u64,
}

impl Stage for Export {
    const KIND: StageKind = StageKind::Export;
    // v2: lineage.json and kiln.key / kiln.upstream GGUF metadata in the output.
    // v3: perplexities through the fused cross-entropy and RMSNorm ops (low bits differ).
    // v6: perplexities through kiln's sgemm (low bits differ).
    // v7: the key is the canonical encoding of the typed inputs (kiln.stage/2); output unchanged.
    const VERSION: u32 = 7;

    type Neutral = ();

    fn run(&self, _: &(), cx: &mut RunCx<'_>) -> Result<(), StageError> {
        let device = Device::Cpu;
        let ups = cx.upstream;
        let (base, model_dir, tok_dir, pack) = match (self.model, ups) {
            (EvalModel::Base, [f, p]) => (f, f.dir.clone(), f.dir.clone(), p),
            (EvalModel::BaseWithAdapter, [f, a, p]) => (f, f.dir.clone(), a.dir.clone(), p),
            (EvalModel::Merged | EvalModel::Trained, [f, m, p]) => {
                (f, m.dir.clone(), m.dir.clone(), p)
            }
            _ => {
                return Err(StageError::Invalid(
                    "export: unexpected upstream stages".into(),
                ))
            }
        };
        let mut model = load_model(&model_dir, &device)?;
        if self.model == EvalModel::BaseWithAdapter {
            PeftAdapter::load(&tok_dir, &device)?.merge_into(&mut model)?;
        }
        let val = PackedSplit::read(&pack.dir.join("val"))?;
        let bs = self.batch_size as usize;
        let ref_loss = super::train::evaluate(&model, &val, bs, &device)?;
        let mut report = json!({
            "format": self.format.label(),
            "val_loss_f32": ref_loss,
            "val_perplexity_f32": ref_loss.map(f64::exp),
        });
        let exported: Llama = match self.format {
            ExportFormat::Gguf(q) => {
                let file = format!("model-{}.gguf", q.as_str());
                let path = cx.out.join(&file);
                let src = base.dir.join("model.gguf");
                // Lineage in the file itself: `kiln lineage <kiln.key>` expands it.
                let extra = vec![
                    ("kiln.key".to_string(), GValue::String(cx.key.to_string())),
                    (
                        "kiln.upstream".to_string(),
                        GValue::Array(
                            cx.upstream
                                .iter()
                                .map(|u| {
                                    GValue::String(format!(
                                        "{}={}",
                                        u.name,
                                        u.dir
                                            .file_name()
                                            .map(|n| n.to_string_lossy().to_string())
                                            .unwrap_or_default()
                                    ))
                                })
                                .collect(),
                        ),
                    ),
                ];
                let summary = write_gguf(
                    &model,
                    &tok_dir,
                    src.exists().then_some(src.as_path()),
                    self.chat_template.as_deref(),
                    q,
                    &extra,
                    &path,
                )?;
                report["file"] = json!(file);
                report["bytes"] = json!(summary.bytes);
                report["tensors"] = json!(summary.tensors);
                drop(model);
                let (cfg, w) = weights::load_gguf(&path, &device)?;
                Llama::from_weights(cfg, w, &device)?
            }
            ExportFormat::Safetensors(dtype) => {
                let dtype = match dtype {
                    SafetensorsDtype::F32 => DType::F32,
                    SafetensorsDtype::F16 => DType::F16,
                    SafetensorsDtype::Bf16 => DType::BF16,
                };
                super::merge::write_hf_model(
                    &model,
                    &tok_dir,
                    cx.out,
                    self.max_shard_size,
                    dtype,
                    self.chat_template.as_deref(),
                )?;
                drop(model);
                report["bytes"] = json!(crate::cache::dir_size(cx.out));
                load_model(cx.out, &device)?
            }
        };
        let loss = super::train::evaluate(&exported, &val, bs, &device)?;
        report["val_loss"] = json!(loss);
        report["val_perplexity"] = json!(loss.map(f64::exp));
        for (name, v) in [
            ("export_val_loss", loss),
            ("export_val_perplexity", loss.map(f64::exp)),
        ] {
            if let Some(value) = v {
                (cx.emit)(crate::events::Event::Metric {
                    stage: cx.name.to_string(),
                    step: 0,
                    name: name.into(),
                    value,
                });
            }
        }
        write_json(&cx.out.join("lineage.json"), &super::lineage_record(cx))?;
        write_json(&cx.out.join("export.json"), &report)
    }
}
