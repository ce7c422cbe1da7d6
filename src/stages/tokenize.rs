//! `tokenize`: one dataset's records -> token ids and trained masks (docs/formats.md).
//! Reads: the model's tokenizer files (not its weights) and the dataset's fetched files.
//! Writes: `tokens/` (binary token set) and `stats.json`.

use super::{write_json, RunCx, Stage, StageError, StageKind};
use crate::config::{DataFormat, ExcessLength};
use crate::data::format::FormatCtx;
use crate::data::read::read_records_as;
use crate::data::tokenize::{tokenize_records, TokenizeOpts};
use crate::text::template::ChatTemplate;
use crate::text::{TextError, TextTokenizer};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Which template text a chat dataset renders with.
#[derive(Debug, Clone, PartialEq)]
pub enum TemplateSource {
    /// The tokenizer's own (its text is covered by the tokenizer files' digest).
    FromTokenizer,
    /// Text from the config or a built-in.
    Text(String),
}

pub struct Tokenize {
    pub label: String,
    pub path_display: String,
    pub format: DataFormat,
    pub sequence_len: u64,
    pub excess: ExcessLength,
    pub min_sample_len: u64,
    pub train_on_inputs: bool,
    /// Only for chat datasets.
    pub template: Option<TemplateSource>,
    pub default_system_message: Option<String>,
    pub eot_tokens: Vec<String>,
    /// `special_tokens:` overrides of the tokenizer's bos/eos (must be in its vocabulary).
    pub special_tokens: BTreeMap<String, String>,
    /// Fetched file name -> the user's path, for error messages only (not part of the key).
    pub file_labels: BTreeMap<String, String>,
}

/// End-of-turn markers of common templates, used when `eot_tokens` is not set and the
/// tokenizer knows the token.
const KNOWN_EOT: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
];

impl Tokenize {
    /// Loads the tokenizer and template from the fetched model entry.
    pub fn load_text(
        &self,
        model_dir: &std::path::Path,
    ) -> Result<(TextTokenizer, Option<ChatTemplate>, Vec<String>), StageError> {
        let mut tok = TextTokenizer::load_dir(model_dir)?;
        for (k, t) in &self.special_tokens {
            if tok.token_id(t).is_none() {
                return Err(StageError::Invalid(format!(
                    "special_tokens.{k}: `{t}` is not in the tokenizer's vocabulary (adding tokens is not supported yet); use a token the tokenizer has"
                )));
            }
            match k.as_str() {
                "bos_token" => tok.bos_token = Some(t.clone()),
                "eos_token" => tok.eos_token = Some(t.clone()),
                _ => {}
            }
        }
        let template = match &self.template {
            None => None,
            Some(TemplateSource::Text(t)) => Some(ChatTemplate::new(t, tok.bos_token.as_deref(), tok.eos_token.as_deref())?),
            Some(TemplateSource::FromTokenizer) => match &tok.chat_template {
                Some(t) => Some(ChatTemplate::new(t, tok.bos_token.as_deref(), tok.eos_token.as_deref())?),
                None => {
                    return Err(StageError::Text(TextError::Template(format!(
                        "dataset {} uses chat_template but the tokenizer has no chat template; set `chat_template: chatml` (or another) in the config",
                        self.label
                    ))))
                }
            },
        };
        let eot = if self.eot_tokens.is_empty() {
            KNOWN_EOT
                .iter()
                .filter(|t| tok.token_id(t).is_some())
                .map(|t| t.to_string())
                .collect()
        } else {
            self.eot_tokens.clone()
        };
        Ok((tok, template, eot))
    }
}

impl Stage for Tokenize {
    const KIND: StageKind = StageKind::Tokenize;
    const VERSION: u32 = 1;

    fn params(&self) -> Value {
        let mut p = json!({
            "format": self.format,
            "sequence_len": self.sequence_len,
            "excess_length_strategy": self.excess,
            "min_sample_len": self.min_sample_len,
            "train_on_inputs": self.train_on_inputs,
        });
        if !self.special_tokens.is_empty() {
            p["special_tokens"] = json!(self.special_tokens);
        }
        if let Some(t) = &self.template {
            p["chat_template"] = match t {
                TemplateSource::FromTokenizer => json!("tokenizer_default"),
                TemplateSource::Text(s) => json!(s),
            };
            p["default_system_message"] = json!(self.default_system_message);
            p["eot_tokens"] = json!(self.eot_tokens);
        }
        p
    }

    fn run(&self, cx: &mut RunCx<'_>) -> Result<(), StageError> {
        let [model, data] = cx.upstream else {
            return Err(StageError::Invalid(
                "tokenize needs the model and one dataset upstream".into(),
            ));
        };
        let (tok, template, eot) = self.load_text(&model.dir)?;
        let mut records = Vec::new();
        for f in &data.manifest.files {
            let shown = self
                .file_labels
                .get(&f.path)
                .cloned()
                .unwrap_or_else(|| f.path.clone());
            records.extend(read_records_as(
                &data.dir.join(&f.path),
                std::path::Path::new(&shown),
            )?);
        }
        if records.is_empty() {
            return Err(StageError::Data(crate::data::DataError::Dataset {
                dataset: format!("{} ({})", self.label, self.path_display),
                message: "is empty: no records".into(),
            }));
        }
        let fctx = FormatCtx {
            template: template.as_ref(),
            eos_token: tok.eos_token.as_deref(),
            eot_tokens: &eot,
            default_system_message: self.default_system_message.as_deref(),
        };
        let opts = TokenizeOpts {
            dataset_index: 0,
            dataset_name: &self.label,
            dataset_path: &self.path_display,
            sequence_len: self.sequence_len as usize,
            excess: self.excess,
            min_sample_len: self.min_sample_len as usize,
            train_on_inputs: self.train_on_inputs,
        };
        let total = records.len() as u64;
        (cx.emit)(crate::events::Event::Progress {
            name: cx.name.to_string(),
            done: 0,
            total,
            unit: "records",
        });
        let (set, stats) = tokenize_records(&tok, &self.format, &records, &fctx, &opts)?;
        if set.is_empty() {
            return Err(StageError::Data(crate::data::DataError::Dataset {
                dataset: format!("{} ({})", self.label, self.path_display),
                message: format!(
                    "no usable samples out of {} records ({} longer than sequence_len {}, {} shorter than min_sample_len, {} with no trained tokens)",
                    stats.records, stats.dropped_too_long, self.sequence_len, stats.dropped_too_short, stats.dropped_untrained
                ),
            }));
        }
        set.write(&cx.out.join("tokens"))?;
        write_json(&cx.out.join("stats.json"), &stats)?;
        (cx.emit)(crate::events::Event::Progress {
            name: cx.name.to_string(),
            done: total,
            total,
            unit: "records",
        });
        Ok(())
    }
}
