//! `merge`: folds the trained LoRA adapter into the base weights and writes a standalone
//! HF-layout model: `model.safetensors` (sharded above `max_shard_size`, with
//! `model.safetensors.index.json`), `config.json`, `generation_config.json`, `tokenizer.json` and
//! `tokenizer_config.json` carrying the chat template the model was trained with.
//! Reads: every file of `fetch.model` and the train stage's adapter and tokenizer files.

use super::{io_err, write_json, RunCx, Stage, StageError, StageKind};
use crate::model::adapter::PeftAdapter;
use crate::model::weights;
use crate::text::TextTokenizer;
use candle_core::{DType, Device};
use serde_json::{json, Value};
use std::path::Path;

pub use crate::config::DEFAULT_MAX_SHARD;

/// Everything the merge stage reads, and so its key.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Merge {
    pub max_shard_size: u64,
    /// The chat template to store in tokenizer_config.json when the config chose one (the
    /// tokenizer's own otherwise).
    pub chat_template: Option<String>,
    /// The base the adapter was trained against: a packed (QLoRA, int8, 16-bit) base is
    /// widened and the deltas merged into that, as PEFT merges into a bitsandbytes layer
    /// (f32, the default, is left out of the key).
    #[serde(skip_serializing_if = "crate::config::precision::BaseWeights::is_f32")]
    pub base_weights: crate::config::precision::BaseWeights,
}

impl Stage for Merge {
    const KIND: StageKind = StageKind::Merge;
    // v2: model.safetensors carries {"format": "pt"} metadata (transformers requires it).
    // v3: the key is the canonical encoding of the typed inputs (kiln.stage/2); output unchanged.
    const VERSION: u32 = 3;

    type Neutral = ();

    fn run(&self, _: &(), cx: &mut RunCx<'_>) -> Result<(), StageError> {
        let [model_up, train_up] = cx.upstream else {
            return Err(StageError::Invalid(
                "merge needs the model and train upstream".into(),
            ));
        };
        let note = merge_dirs(
            &model_up.dir,
            &train_up.dir,
            cx.out,
            self.max_shard_size,
            self.chat_template.as_deref(),
            self.base_weights,
        )?;
        if let Some(message) = note {
            (cx.emit)(crate::events::Event::Note {
                message: format!("{}: {message}", cx.name),
            });
        }
        Ok(())
    }
}

/// Merges the PEFT adapter in `adapter_dir` into the model in `model_dir` (its linear weights
/// stored as `base` says, then widened) and writes the merged model into `out` (which must exist
/// and be empty; callers publish it atomically). Returns a line saying what it merged into when
/// the base was packed.
pub fn merge_dirs(
    model_dir: &Path,
    adapter_dir: &Path,
    out: &Path,
    max_shard_size: u64,
    chat_template: Option<&str>,
    base: crate::config::precision::BaseWeights,
) -> Result<Option<String>, StageError> {
    let device = Device::Cpu;
    let (mut model, stored) = super::train::load_model_as(model_dir, base)?;
    let note = stored.map(|_| {
        format!(
            "merged the adapter into the base as it was trained against ({}), widened to f32, as PEFT merges a QLoRA adapter; the merged weights carry that storage's rounding",
            base.describe()
        )
    });
    let adapter = PeftAdapter::load(adapter_dir, &device)?;
    adapter.merge_into(&mut model)?;
    // Tokenizer files: the adapter directory's (what training saw), else the base model's.
    let tok_dir = if adapter_dir.join("tokenizer.json").exists() {
        adapter_dir
    } else {
        model_dir
    };
    write_hf_model(
        &model,
        tok_dir,
        out,
        max_shard_size,
        DType::F32,
        chat_template,
    )?;
    Ok(note)
}

/// Writes `model` as a standalone HF-layout model directory: weights in `dtype` (sharded above
/// `max_shard_size`), `config.json`, `generation_config.json`, and the tokenizer files from
/// `tok_dir` with `chat_template` (when given) stored in tokenizer_config.json.
pub fn write_hf_model(
    model: &crate::model::Llama,
    tok_dir: &Path,
    out: &Path,
    max_shard_size: u64,
    dtype: DType,
    chat_template: Option<&str>,
) -> Result<(), StageError> {
    weights::save_sharded(&model.to_weights()?, out, max_shard_size, dtype)?;
    let mut cfg = model.cfg.to_hf();
    cfg["torch_dtype"] = json!(match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    });
    write_json(&out.join("config.json"), &cfg)?;
    let tj = tok_dir.join("tokenizer.json");
    std::fs::copy(&tj, out.join("tokenizer.json")).map_err(io_err(&tj))?;
    let tc = tok_dir.join("tokenizer_config.json");
    let mut tok_cfg: Value = match std::fs::read(&tc) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| StageError::Invalid(format!("{}: {e}", tc.display())))?,
        Err(_) => json!({}),
    };
    if let (Some(t), Some(obj)) = (chat_template, tok_cfg.as_object_mut()) {
        obj.insert("chat_template".into(), Value::String(t.to_string()));
    }
    write_json(&out.join("tokenizer_config.json"), &tok_cfg)?;
    let tok = TextTokenizer::load_dir(out)?;
    let id = |t: &Option<String>| t.as_deref().and_then(|t| tok.token_id(t));
    write_json(
        &out.join("generation_config.json"),
        &json!({
            "bos_token_id": id(&tok.bos_token),
            "eos_token_id": id(&tok.eos_token),
            "pad_token_id": tok_cfg.get("pad_token").and_then(|p| p.as_str()).and_then(|t| tok.token_id(t)),
        }),
    )
}
