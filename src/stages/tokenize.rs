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
use serde::Serialize;
use std::collections::BTreeMap;

/// Which template text a chat dataset renders with.
#[derive(Debug, Clone, PartialEq)]
pub enum TemplateSource {
    /// The tokenizer's own (its text is covered by the tokenizer files' digest).
    FromTokenizer,
    /// Text from the config or a built-in.
    Text(String),
}

/// Keyed as the template's text, or `tokenizer_default`.
impl Serialize for TemplateSource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TemplateSource::FromTokenizer => s.serialize_str("tokenizer_default"),
            TemplateSource::Text(t) => s.serialize_str(t),
        }
    }
}

/// Everything the tokenize stage reads, and so its key (field names are the config's).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tokenize {
    pub format: DataFormat,
    pub sequence_len: u64,
    #[serde(rename = "excess_length_strategy")]
    pub excess: ExcessLength,
    pub min_sample_len: u64,
    pub train_on_inputs: bool,
    /// `special_tokens:` overrides of the tokenizer's bos/eos (must be in its vocabulary).
    pub special_tokens: BTreeMap<String, String>,
    /// Only for chat datasets: the template and the settings only chat rendering reads.
    #[serde(flatten)]
    pub chat: Option<ChatInputs>,
}

/// What a chat dataset's rendering reads beyond its format.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatInputs {
    pub chat_template: TemplateSource,
    pub default_system_message: Option<String>,
    pub eot_tokens: Vec<String>,
    /// `chat_template_kwargs`: extra template variables (absent from the key when empty).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub chat_template_kwargs: std::collections::BTreeMap<String, serde_json::Value>,
}

/// What the tokenize stage reads only for messages (never part of its key: renaming a dataset
/// file or moving the project keeps the cache).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizeNeutral {
    /// `datasets[0]`, `test_datasets[1]`.
    pub label: String,
    /// The dataset's path as the config writes it.
    pub path_display: String,
    /// Fetched file name -> the user's path.
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
        label: &str,
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
        let kwargs = self
            .chat
            .as_ref()
            .map(|c| c.chat_template_kwargs.clone())
            .unwrap_or_default();
        let template = match self.chat.as_ref().map(|c| &c.chat_template) {
            None => None,
            Some(TemplateSource::Text(t)) => Some(ChatTemplate::new(t, tok.bos_token.as_deref(), tok.eos_token.as_deref())?.with_kwargs(&kwargs)),
            Some(TemplateSource::FromTokenizer) => match &tok.chat_template {
                Some(t) => Some(ChatTemplate::new(t, tok.bos_token.as_deref(), tok.eos_token.as_deref())?.with_kwargs(&kwargs)),
                None => {
                    return Err(StageError::Text(TextError::Template(format!(
                        "dataset {} uses chat_template but the tokenizer has no chat template; set `chat_template: chatml` (or another) in the config",
                        label
                    ))))
                }
            },
        };
        let configured = self
            .chat
            .as_ref()
            .map(|c| c.eot_tokens.as_slice())
            .unwrap_or(&[]);
        let eot = if configured.is_empty() {
            KNOWN_EOT
                .iter()
                .filter(|t| tok.token_id(t).is_some())
                .map(|t| t.to_string())
                .collect()
        } else {
            configured.to_vec()
        };
        Ok((tok, template, eot))
    }
}

impl Stage for Tokenize {
    const KIND: StageKind = StageKind::Tokenize;
    // v2: the key is the canonical encoding of the typed inputs (kiln.stage/2); output unchanged.
    // v3: records the format cannot use are dropped and counted in stats.json (they failed the
    // stage before); stats.json gains `dropped_unusable` and `unusable`; `{% generation %}`
    // blocks give the trained spans; strftime_now honours its format.
    const VERSION: u32 = 3;

    type Neutral = TokenizeNeutral;

    fn run(&self, neutral: &TokenizeNeutral, cx: &mut RunCx<'_>) -> Result<(), StageError> {
        let [model, data] = cx.upstream else {
            return Err(StageError::Invalid(
                "tokenize needs the model and one dataset upstream".into(),
            ));
        };
        let (tok, template, eot) = self.load_text(&neutral.label, &model.dir)?;
        let mut records = Vec::new();
        for f in &data.manifest.files {
            let shown = neutral
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
                dataset: format!("{} ({})", neutral.label, neutral.path_display),
                message: "is empty: no records".into(),
            }));
        }
        let fctx = FormatCtx {
            template: template.as_ref(),
            eos_token: tok.eos_token.as_deref(),
            eot_tokens: &eot,
            default_system_message: self
                .chat
                .as_ref()
                .and_then(|c| c.default_system_message.as_deref()),
        };
        let opts = TokenizeOpts {
            dataset_index: 0,
            dataset_name: &neutral.label,
            dataset_path: &neutral.path_display,
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
        let first_unusable = stats
            .unusable
            .first()
            .map(|u| format!("; the first unusable one, {u}"))
            .unwrap_or_default();
        if set.is_empty() {
            return Err(StageError::Data(crate::data::DataError::Dataset {
                dataset: format!("{} ({})", neutral.label, neutral.path_display),
                message: format!(
                    "no usable samples out of {} records ({} the format cannot use, {} longer than sequence_len {}, {} shorter than min_sample_len, {} with no trained tokens){first_unusable}",
                    stats.records, stats.dropped_unusable, stats.dropped_too_long, self.sequence_len, stats.dropped_too_short, stats.dropped_untrained
                ),
            }));
        }
        if stats.dropped_unusable > 0 {
            (cx.emit)(crate::events::Event::Warning {
                message: format!(
                    "{} ({}): {} of {} records dropped: the format cannot use them ({}{})",
                    neutral.label,
                    neutral.path_display,
                    stats.dropped_unusable,
                    stats.records,
                    stats.unusable.join("; "),
                    if stats.dropped_unusable as usize > stats.unusable.len() {
                        "; …"
                    } else {
                        ""
                    }
                ),
            });
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
