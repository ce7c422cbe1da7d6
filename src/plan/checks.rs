//! The config checked against a local base model before any work starts (`kiln validate`, and
//! `kiln run` when something will build): `sequence_len` against the model's context, LoRA
//! target modules against the layers the model has, and `config.json` against the weights'
//! shapes (read from the safetensors headers only; a GGUF file is one self-describing unit).
//! A hub model is checked once it is fetched (its files are then local).

use crate::config::{DatasetSpec, ModelSource, Problem, Settings};
use crate::model::llama::LINEAR_LAYERS;
use crate::model::LlamaConfig;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What the checks know about the model: its config and where it came from, and its tensors'
/// shapes when they could be read without loading weights.
struct Facts {
    from: PathBuf,
    cfg: LlamaConfig,
    shapes: Option<(PathBuf, BTreeMap<String, Vec<u64>>)>,
}

/// Problems of `s` against its local base model: (errors, warnings). Nothing when the model is
/// on the hub (not fetched yet) or cannot be read (the fetch stage reports that).
pub fn model_problems(s: &Settings) -> (Vec<Problem>, Vec<Problem>) {
    let mut errors = Vec::new();
    let warnings = Vec::new();
    let Some(f) = facts(&s.base_model) else {
        return (errors, warnings);
    };
    let problem = |key: &str, message: String, fix: String| Problem {
        file: s.config_path.clone(),
        key: key.to_string(),
        line: s.key_lines.get(key).copied(),
        column: None,
        message,
        fix: Some(fix),
    };
    let ctx = f.cfg.max_position_embeddings as u64;
    if s.sequence_len > ctx {
        errors.push(problem(
            "sequence_len",
            format!(
                "{} is longer than the model's context: max_position_embeddings is {ctx} in {}",
                s.sequence_len,
                f.from.display()
            ),
            format!(
                "lower sequence_len to {ctx} or less (kiln does not implement rope_scaling yet)"
            ),
        ));
    }
    let lora = &s.train.lora;
    if s.train.adapter.is_some() && !lora.lora_target_linear {
        let unknown: Vec<&String> = lora
            .lora_target_modules
            .iter()
            .filter(|m| !LINEAR_LAYERS.contains(&m.as_str()))
            .collect();
        if !unknown.is_empty() {
            let names: Vec<String> = unknown.iter().map(|m| format!("`{m}`")).collect();
            errors.push(problem(
                "lora_target_modules",
                format!(
                    "{} {} no layer of this {} model (a LoRA there would train nothing)",
                    names.join(", "),
                    if names.len() == 1 { "matches" } else { "match" },
                    f.cfg.architecture
                ),
                format!(
                    "its linear layers are {}; or set lora_target_linear: true",
                    LINEAR_LAYERS.join(", ")
                ),
            ));
        }
    }
    if let Some((file, shapes)) = &f.shapes {
        if let Some(m) = shape_mismatch(&f.cfg, shapes) {
            errors.push(problem(
                "base_model",
                format!("{}: {m}", file.display()),
                format!(
                    "{} does not describe these weights: use the config.json that came with them",
                    f.from.display()
                ),
            ));
        }
    }
    if let Some(e) = memory_problem(s, &f.cfg, machine_memory()) {
        errors.push(problem(e.0, e.1, e.2));
    }
    (errors, warnings)
}

/// A lower bound, in bytes, of one training step's memory: the weights in f32, plus what the
/// backward pass keeps per token (each layer's norm, attention and MLP inputs and outputs; the
/// attention op keeps only its output) and the logits with their gradient. Real use is higher
/// (optimizer state, allocator slack), so a config refused by this bound cannot fit.
pub fn step_memory_bound(cfg: &LlamaConfig, micro_batch: u64, sequence_len: u64) -> u128 {
    let (h, i, l, v) = (
        cfg.hidden_size as u128,
        cfg.intermediate_size as u128,
        cfg.num_hidden_layers as u128,
        cfg.vocab_size as u128,
    );
    let kv = (cfg.num_key_value_heads * cfg.head_dim()) as u128;
    let per_layer = h * h * 2 + h * kv * 2 + h * i * 3;
    let embed = v * h * if cfg.tie_word_embeddings { 1 } else { 2 };
    let weights = (per_layer * l + embed) * 4;
    let tokens = micro_batch as u128 * sequence_len as u128;
    let per_token = (l * (h * 4 + i * 2) + v * 2) * 4;
    weights + tokens * per_token
}

/// Memory this process may use: the cgroup limit when one is set, else physical memory.
fn machine_memory() -> Option<u128> {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u128>().ok())
            .map(|kb| kb * 1024)
    });
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|v| v.trim().parse::<u128>().ok());
    match (total, cgroup) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}

/// The refusal when a training step cannot fit in `available` bytes: (key, message, fix).
fn memory_problem(
    s: &Settings,
    cfg: &LlamaConfig,
    available: Option<u128>,
) -> Option<(&'static str, String, String)> {
    let available = available?;
    s.train.adapter.as_ref()?;
    let mbs = s.train.steps.micro_batch_size;
    let need = step_memory_bound(cfg, mbs, s.sequence_len);
    if need <= available {
        return None;
    }
    let gib = |b: u128| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64);
    let key = if s.sequence_len > 1 && mbs <= 1 {
        "sequence_len"
    } else {
        "micro_batch_size"
    };
    Some((
        key,
        format!(
            "a training step of {mbs} × {} tokens needs at least {} for this model, and this machine has {}",
            s.sequence_len,
            gib(need),
            gib(available)
        ),
        "lower micro_batch_size or sequence_len (raise gradient_accumulation_steps to keep the batch)"
            .to_string(),
    ))
}

/// Problems in the config's local datasets (`kiln validate`): (errors, warnings). A file that
/// cannot be read as data (malformed JSON, named by line) is an error; each record is parsed as
/// its format's tokenize stage would parse it, and the first few it cannot use are warnings named
/// by file and line (the tokenize stage drops and counts them). Hub datasets are checked when
/// tokenized.
pub fn data_problems<'a>(
    datasets: impl IntoIterator<Item = &'a DatasetSpec>,
) -> (Vec<Problem>, Vec<Problem>) {
    const PER_DATASET: usize = crate::data::tokenize::UNUSABLE_SHOWN;
    let mut errors = Vec::new();
    let mut out = Vec::new();
    for d in datasets {
        let crate::config::DataSource::Local(files) = &d.source else {
            continue;
        };
        let mut bad = 0usize;
        for f in files {
            // `./data/x.jsonl` as the user wrote it: `data/x.jsonl`.
            let shown = f.strip_prefix(".").unwrap_or(f);
            let records = match crate::data::read::read_records_as(f, shown) {
                Ok(r) => r,
                Err(e) => {
                    errors.push(Problem {
                        file: shown.to_path_buf(),
                        key: String::new(),
                        line: None,
                        column: None,
                        message: e.to_string(),
                        fix: None,
                    });
                    continue;
                }
            };
            for (n, r) in records.iter().enumerate() {
                let Err(m) = crate::data::format::check_record(&d.format, &r.value) else {
                    continue;
                };
                bad += 1;
                if bad <= PER_DATASET {
                    out.push(Problem {
                        file: shown.to_path_buf(),
                        key: String::new(),
                        line: (r.line > 0).then_some(r.line),
                        column: None,
                        message: if r.line > 0 {
                            format!("{m}; the record will be dropped")
                        } else {
                            format!("record {}: {m}; the record will be dropped", n + 1)
                        },
                        fix: None,
                    });
                }
            }
        }
        if bad > PER_DATASET {
            out.push(Problem {
                file: PathBuf::from(&d.path),
                key: String::new(),
                line: None,
                column: None,
                message: format!(
                    "{} more records the format cannot use, not shown (dropped too)",
                    bad - PER_DATASET
                ),
                fix: Some("fix the records above and run `kiln validate` again".into()),
            });
        }
    }
    (errors, out)
}

/// Jinja templates that do not compile, named by where they were written: the config key and
/// the config's line of the error (a `|` block's text starts on the line after its key), the
/// template file and its line, or the local model's `tokenizer_config.json`.
pub fn template_problems(s: &Settings) -> Vec<Problem> {
    let mut out = Vec::new();
    let config_lines: Vec<String> = std::fs::read_to_string(&s.config_path)
        .map(|t| t.lines().map(String::from).collect())
        .unwrap_or_default();
    for o in &s.jinja {
        let Some((line, what)) = crate::text::template::syntax_error(&o.source) else {
            continue;
        };
        let at = match (o.line, o.in_config) {
            (Some(k), true) => {
                let block = config_lines.get(k.saturating_sub(1)).is_some_and(|l| {
                    l.split_once(':').is_some_and(|(_, rest)| {
                        let r = rest.trim_start();
                        r.starts_with('|') || r.starts_with('>')
                    })
                });
                Some(if block { k + line.unwrap_or(1) } else { k })
            }
            (Some(k), false) => Some(k + line.unwrap_or(1) - 1),
            (None, _) => None,
        };
        let p = Problem {
            file: o.file.clone(),
            key: o.key.clone(),
            line: at,
            column: None,
            message: format!(
                "the chat template does not parse{}: {what}",
                line.map(|l| format!(" (its line {l})")).unwrap_or_default()
            ),
            fix: Some(
                "fix the Jinja syntax (templates are Hugging Face Jinja: `{% ... %}`, `{{ ... }}`)"
                    .into(),
            ),
        };
        if !out.contains(&p) {
            out.push(p);
        }
    }
    let uses_tokenizer_template = s.datasets.iter().chain(&s.test_datasets).any(|d| {
        d.format.chat_template().is_some_and(|t| {
            matches!(
                t.unwrap_or(&s.chat_template),
                crate::config::TemplateChoice::TokenizerDefault
            )
        })
    });
    if let (true, ModelSource::LocalDir(dir)) = (uses_tokenizer_template, &s.base_model) {
        out.extend(tokenizer_template_problem(
            &dir.join("tokenizer_config.json"),
        ));
    }
    out
}

/// A `chat_template` in a tokenizer_config.json that does not compile (a string, or Hugging
/// Face's list of named templates).
fn tokenizer_template_problem(file: &Path) -> Option<Problem> {
    let text = std::fs::read_to_string(file).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let templates: Vec<(String, String)> = match v.get("chat_template")? {
        serde_json::Value::String(t) => vec![("chat_template".into(), t.clone())],
        serde_json::Value::Array(list) => list
            .iter()
            .filter_map(|t| {
                let name = t.get("name")?.as_str()?;
                let body = t.get("template")?.as_str()?;
                Some((format!("chat_template[{name}]"), body.to_string()))
            })
            .collect(),
        _ => return None,
    };
    let json_line = text
        .lines()
        .position(|l| l.contains("\"chat_template\""))
        .map(|i| i + 1);
    templates.into_iter().find_map(|(key, body)| {
        let (line, what) = crate::text::template::syntax_error(&body)?;
        Some(Problem {
            file: file.to_path_buf(),
            key,
            line: json_line,
            column: None,
            message: format!(
                "the model's chat template does not parse{}: {what}",
                line.map(|l| format!(" (its line {l})")).unwrap_or_default()
            ),
            fix: Some("fix the template there, or set `chat_template:` in the config (e.g. chatml) to use another".into()),
        })
    })
}

fn facts(src: &ModelSource) -> Option<Facts> {
    match src {
        ModelSource::LocalDir(dir) => {
            let from = dir.join("config.json");
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&from).ok()?).ok()?;
            let cfg = LlamaConfig::from_hf(&v).ok()?;
            Some(Facts {
                shapes: dir_shapes(dir),
                from,
                cfg,
            })
        }
        ModelSource::Gguf(p) => {
            let mut f = std::io::BufReader::new(std::fs::File::open(p).ok()?);
            let c = candle_core::quantized::gguf_file::Content::read(&mut f).ok()?;
            let cfg =
                LlamaConfig::from_gguf(&c, c.tensor_infos.contains_key("output.weight")).ok()?;
            Some(Facts {
                from: p.clone(),
                cfg,
                shapes: None,
            })
        }
        ModelSource::Hub { .. } => None,
    }
}

/// Tensor shapes of a directory's safetensors files, from their headers (8-byte length, JSON).
fn dir_shapes(dir: &Path) -> Option<(PathBuf, BTreeMap<String, Vec<u64>>)> {
    let single = dir.join("model.safetensors");
    let files: Vec<PathBuf> = if single.exists() {
        vec![single.clone()]
    } else {
        let idx = dir.join("model.safetensors.index.json");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(idx).ok()?).ok()?;
        let mut names: Vec<String> = v["weight_map"]
            .as_object()?
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
        names.sort();
        names.dedup();
        names.into_iter().map(|n| dir.join(n)).collect()
    };
    let mut shapes = BTreeMap::new();
    for f in &files {
        use std::io::Read;
        let mut r = std::fs::File::open(f).ok()?;
        let mut len = [0u8; 8];
        r.read_exact(&mut len).ok()?;
        let n = u64::from_le_bytes(len);
        if n > 100 << 20 {
            return None;
        }
        let mut head = vec![0u8; n as usize];
        r.read_exact(&mut head).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&head).ok()?;
        for (name, t) in v.as_object()? {
            if let Some(shape) = t["shape"].as_array() {
                shapes.insert(
                    name.clone(),
                    shape.iter().filter_map(|d| d.as_u64()).collect(),
                );
            }
        }
    }
    let shown = if files.len() == 1 {
        files[0].clone()
    } else {
        dir.to_path_buf()
    };
    Some((shown, shapes))
}

/// The first tensor whose shape disagrees with what `cfg` implies (or that is missing).
fn shape_mismatch(cfg: &LlamaConfig, shapes: &BTreeMap<String, Vec<u64>>) -> Option<String> {
    let (h, v, i) = (
        cfg.hidden_size as u64,
        cfg.vocab_size as u64,
        cfg.intermediate_size as u64,
    );
    let hd = cfg.head_dim() as u64;
    let q = cfg.num_attention_heads as u64 * hd;
    let kv = cfg.num_key_value_heads as u64 * hd;
    let mut want: Vec<(String, Vec<u64>, &str)> = vec![(
        "model.embed_tokens.weight".into(),
        vec![v, h],
        "vocab_size × hidden_size",
    )];
    if !cfg.tie_word_embeddings {
        want.push((
            "lm_head.weight".into(),
            vec![v, h],
            "vocab_size × hidden_size",
        ));
    }
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        want.extend([
            (
                format!("{p}.self_attn.q_proj.weight"),
                vec![q, h],
                "heads·head_dim × hidden_size",
            ),
            (
                format!("{p}.self_attn.k_proj.weight"),
                vec![kv, h],
                "kv_heads·head_dim × hidden_size",
            ),
            (
                format!("{p}.self_attn.v_proj.weight"),
                vec![kv, h],
                "kv_heads·head_dim × hidden_size",
            ),
            (
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, q],
                "hidden_size × heads·head_dim",
            ),
            (
                format!("{p}.mlp.gate_proj.weight"),
                vec![i, h],
                "intermediate_size × hidden_size",
            ),
            (
                format!("{p}.mlp.up_proj.weight"),
                vec![i, h],
                "intermediate_size × hidden_size",
            ),
            (
                format!("{p}.mlp.down_proj.weight"),
                vec![h, i],
                "hidden_size × intermediate_size",
            ),
        ]);
    }
    // Weights named otherwise (no `model.` prefix, another family's layout) are not judged.
    if !shapes.contains_key("model.embed_tokens.weight") {
        return None;
    }
    for (name, shape, what) in want {
        match shapes.get(&name) {
            None => {
                return Some(format!(
                    "no tensor {name}, which config.json's num_hidden_layers {} implies",
                    cfg.num_hidden_layers
                ))
            }
            Some(got) if *got != shape => {
                return Some(format!(
                    "{name} is {got:?}, but config.json implies {shape:?} ({what})"
                ))
            }
            Some(_) => {}
        }
    }
    None
}
