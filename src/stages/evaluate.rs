//! `evaluate`: validation loss and perplexity of the fine-tuned model on the packed val split
//! (which holds `test_datasets` when the config gives them), and optionally greedy answers to a
//! prompts file. Writes `eval_results.json` (and `generations.jsonl`); the metrics also go to the
//! index's metrics table.
//! Reads: the model (the merged model, or the base model plus the trained adapter, or the base
//! model alone), pack's `val/` files, and the fetched prompts file if any.

use super::train::load_model;
use super::{io_err, write_json, RunCx, Stage, StageError, StageKind, Upstream};
use crate::data::pack::PackedSplit;
use crate::events::Event;
use crate::infer::{ChatSession, GenSettings};
use crate::model::adapter::PeftAdapter;
use crate::model::generate::SamplingOptions;
use crate::text::template::Message;
use crate::text::TextTokenizer;
use candle_core::Device;
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;

/// The files of pack's output the evaluate stage reads.
pub const VAL_FILES: &[&str] = &[
    "val/bins.u64",
    "val/pack.json",
    "val/tokens.u32",
    "val/trained.u8",
    "val/offsets.u64",
    "val/sources.u32",
    "val/header.json",
];

/// Which model the upstream list starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalModel {
    /// [merge]
    Merged,
    /// [fetch.model, train]
    BaseWithAdapter,
    /// [fetch.model]
    Base,
    /// [train] — a full fine-tune: the train stage's output is the whole model.
    Trained,
}

impl serde::Serialize for EvalModel {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl EvalModel {
    pub fn as_str(&self) -> &'static str {
        match self {
            EvalModel::Merged => "merged",
            EvalModel::BaseWithAdapter => "base+adapter",
            EvalModel::Base => "base",
            EvalModel::Trained => "trained",
        }
    }
}

/// Everything the evaluate stage reads, and so its key.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Evaluate {
    pub model: EvalModel,
    /// With `base+adapter`: the base the adapter was trained against (packed bases are
    /// widened before the deltas are added; f32, the default, is left out of the key).
    #[serde(skip_serializing_if = "crate::config::precision::BaseWeights::is_f32")]
    pub base_weights: crate::config::precision::BaseWeights,
    pub batch_size: u64,
    /// A prompts file upstream (its content is that upstream's digest).
    #[serde(rename = "prompts")]
    pub has_prompts: bool,
    pub max_new_tokens: u64,
    /// Jinja source when the config chose the template (the tokenizer's own otherwise).
    pub chat_template: Option<String>,
    /// `chat_template_kwargs`, as training rendered with (absent from the key when empty).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub chat_template_kwargs: std::collections::BTreeMap<String, serde_json::Value>,
}

/// One prompt: plain text (a single user turn) or a message list.
fn read_prompts(path: &Path) -> Result<Vec<Vec<Message>>, StageError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let is_jsonl = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e == "jsonl" || e == "json");
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |m: &str| StageError::Invalid(format!("{}:{}: {m}", path.display(), i + 1));
        if !is_jsonl {
            out.push(vec![Message {
                role: "user".into(),
                content: line.to_string(),
            }]);
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
        if let Some(p) = v.get("prompt").and_then(|p| p.as_str()) {
            out.push(vec![Message {
                role: "user".into(),
                content: p.to_string(),
            }]);
        } else if let Some(ms) = v.get("messages").and_then(|m| m.as_array()) {
            let mut msgs = Vec::new();
            for m in ms {
                let (Some(role), Some(content)) = (
                    m.get("role").and_then(|r| r.as_str()),
                    m.get("content").and_then(|c| c.as_str()),
                ) else {
                    return Err(bad("each message needs string `role` and `content`"));
                };
                msgs.push(Message {
                    role: role.into(),
                    content: content.into(),
                });
            }
            out.push(msgs);
        } else {
            return Err(bad(
                "expected {\"prompt\": \"...\"} or {\"messages\": [...]}",
            ));
        }
    }
    Ok(out)
}

fn only_file(up: &Upstream) -> Result<std::path::PathBuf, StageError> {
    up.manifest
        .files
        .iter()
        .map(|f| up.dir.join(&f.path))
        .next()
        .ok_or_else(|| StageError::Invalid(format!("{} holds no file", up.name)))
}

impl Stage for Evaluate {
    const KIND: StageKind = StageKind::Evaluate;
    // v2: val loss through the fused cross-entropy and RMSNorm ops (low bits differ).
    // v4: linear layers on kiln's sgemm (low bits of losses differ).
    // v5: the engine decodes with multi-stream row dots and attention in position parts (low
    // bits of generated answers' logits differ).
    // v6: the key is the canonical encoding of the typed inputs (kiln.stage/2); output unchanged.
    const VERSION: u32 = 6;

    type Neutral = ();

    fn run(&self, _: &(), cx: &mut RunCx<'_>) -> Result<(), StageError> {
        let device = Device::Cpu;
        let ups = cx.upstream;
        let (model, tok, rest) = match self.model {
            EvalModel::Merged | EvalModel::Trained => {
                let [m, rest @ ..] = ups else {
                    return Err(StageError::Invalid("evaluate: no model upstream".into()));
                };
                (
                    load_model(&m.dir, &device)?,
                    TextTokenizer::load_dir(&m.dir)?,
                    rest,
                )
            }
            EvalModel::BaseWithAdapter => {
                let [m, a, rest @ ..] = ups else {
                    return Err(StageError::Invalid("evaluate: no model upstream".into()));
                };
                let (mut model, _) = super::train::load_model_as(&m.dir, self.base_weights)?;
                PeftAdapter::load(&a.dir, &device)?.merge_into(&mut model)?;
                (model, TextTokenizer::load_dir(&a.dir)?, rest)
            }
            EvalModel::Base => {
                let [m, rest @ ..] = ups else {
                    return Err(StageError::Invalid("evaluate: no model upstream".into()));
                };
                (
                    load_model(&m.dir, &device)?,
                    TextTokenizer::load_dir(&m.dir)?,
                    rest,
                )
            }
        };
        let [pack, prompts @ ..] = rest else {
            return Err(StageError::Invalid("evaluate: no pack upstream".into()));
        };
        let val = PackedSplit::read(&pack.dir.join("val"))?;
        let mut results = json!({
            "split": "val",
            "samples": val.header.samples,
            "tokens": val.header.tokens,
            "trained_tokens": val.header.trained_tokens,
        });
        if let Some(loss) = super::train::evaluate(&model, &val, self.batch_size as usize, &device)?
        {
            results["eval_loss"] = json!(loss);
            results["eval_perplexity"] = json!(loss.exp());
            for (name, value) in [("eval_loss", loss), ("eval_perplexity", loss.exp())] {
                (cx.emit)(Event::Metric {
                    stage: cx.name.to_string(),
                    step: 0,
                    name: name.into(),
                    value,
                });
            }
        }
        if let [p] = prompts {
            let list = read_prompts(&only_file(p)?)?;
            let engine = crate::model::engine::Engine::from_llama(&model)?;
            drop(model);
            let mut chat = ChatSession::new(
                engine,
                tok,
                self.chat_template.clone(),
                false,
                GenSettings {
                    sampling: SamplingOptions::default(),
                    max_new_tokens: self.max_new_tokens as usize,
                },
            )
            .map_err(|e| StageError::Invalid(e.to_string()))?;
            chat.set_template_kwargs(&self.chat_template_kwargs);
            let gp = cx.out.join("generations.jsonl");
            let mut f = std::io::BufWriter::new(std::fs::File::create(&gp).map_err(io_err(&gp))?);
            let (mut tokens, mut secs) = (0usize, 0f64);
            for (i, msgs) in list.iter().enumerate() {
                let r = chat
                    .complete(msgs, &mut |_| true)
                    .map_err(|e| StageError::Invalid(format!("prompt {}: {e}", i + 1)))?;
                tokens += r.stats.generated_tokens;
                secs += r.stats.decode_seconds;
                let line = json!({
                    "messages": msgs,
                    "response": r.text,
                    "tokens": r.stats.generated_tokens,
                    "finish_reason": r.stats.finish_reason,
                });
                writeln!(f, "{line}").map_err(io_err(&gp))?;
                (cx.emit)(Event::Progress {
                    name: cx.name.to_string(),
                    done: i as u64 + 1,
                    total: list.len() as u64,
                    unit: "prompts",
                });
            }
            f.flush().map_err(io_err(&gp))?;
            // Timing is a metric, never part of the output: same inputs, same bytes.
            results["generations"] = json!(list.len());
            results["generated_tokens"] = json!(tokens);
            (cx.emit)(Event::Metric {
                stage: cx.name.to_string(),
                step: 0,
                name: "decode_tokens_per_s".into(),
                value: tokens as f64 / secs.max(1e-9),
            });
        }
        write_json(&cx.out.join("eval_results.json"), &results)
    }
}
