//! `kiln bench`: generated data of a fixed shape and the measurements kiln's targets are stated
//! in (cold and repeated preprocess, no-op plan/run, tokenization throughput). Returns figures;
//! the CLI prints them.

use crate::rng::SplitMix64;
use crate::scheduler::RunOptions;
use crate::workspace::{KilnError, Workspace};
use std::path::{Path, PathBuf};
use std::time::Instant;

const WORDS: &[&str] = &[
    "model", "data", "river", "system", "quickly", "market", "energy", "history", "network",
    "garden", "value", "process", "light", "student", "planet", "memory", "signal", "policy",
    "kitchen", "engine", "ocean", "theory", "window", "language", "pattern", "budget", "mountain",
    "record", "balance", "village", "the", "of", "and", "to", "in", "is", "that", "for", "with",
    "as", "on", "by", "it", "an", "be", "this",
];

const FAMILIES: &[(&str, bool)] = &[
    ("Summarize the following paragraph in one sentence.", true),
    ("Translate the text into French.", true),
    (
        "Classify the sentiment of this review as positive or negative.",
        true,
    ),
    ("Write a short poem about the topic.", true),
    ("Extract every person's name from the passage.", true),
    ("Give three tips for staying healthy.", false),
    ("Explain the concept to a ten-year-old.", true),
    ("Rewrite the sentence in the passive voice.", true),
    ("List the main causes of the event described.", true),
    ("Answer the question using the context.", true),
    ("Generate a catchy title for the article.", true),
    ("Describe the process step by step.", false),
    ("Correct the grammar in the following text.", true),
    ("Convert the list into a table.", true),
    ("Name five animals that live in the ocean.", false),
    ("Compare the two options and recommend one.", true),
    ("Write a product description for the item.", true),
    ("Identify the odd one out and explain why.", true),
    ("Propose a plan to reduce energy use at home.", false),
    ("Continue the story in two sentences.", true),
];

fn words(rng: &mut SplitMix64, n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
    }
    s
}

/// Alpaca rows from 20 task families, ~44–290 tokens each with a byte-level BPE tokenizer.
pub fn alpaca_rows(n: usize, seed: u64) -> String {
    let mut rng = SplitMix64::new(seed);
    let mut out = String::with_capacity(n * 600);
    for i in 0..n {
        let (instr, has_input) = FAMILIES[i % FAMILIES.len()];
        let n_in = 5 + rng.below(120) as usize;
        let input = if has_input {
            words(&mut rng, n_in)
        } else {
            String::new()
        };
        let n_out = 3 + rng.below(110) as usize;
        let output = words(&mut rng, n_out);
        out.push_str(
            &serde_json::json!({"instruction": instr, "input": input, "output": output})
                .to_string(),
        );
        out.push('\n');
    }
    out
}

/// `kiln bench generate --case`: which weights to decode with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GenerateCase {
    /// The model in f32, as kiln loads a trained model.
    F32,
    /// kiln's q8_0 GGUF export.
    #[value(name = "q8_0")]
    Q8_0,
    /// kiln's q4_0 GGUF export.
    #[value(name = "q4_0")]
    Q4_0,
    /// kiln's q4_k_m GGUF export.
    #[value(name = "q4_k_m")]
    Q4KM,
    /// The --model GGUF file itself.
    Source,
}

/// `kiln bench train --case`: which step to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TrainCase {
    #[value(name = "lora-256")]
    Lora256,
    #[value(name = "lora-512")]
    Lora512,
    #[value(name = "full-256")]
    Full256,
    /// LoRA on an NF4 base (double-quantised scales): QLoRA as Axolotl's examples configure it.
    #[value(name = "qlora-256")]
    Qlora256,
    #[value(name = "qlora-512")]
    Qlora512,
    /// LoRA on a bf16 base.
    #[value(name = "lora-bf16-512")]
    LoraBf16_512,
    /// Full fine-tuning with bitsandbytes' 8-bit AdamW moments.
    #[value(name = "full-8bit-256")]
    Full8bit256,
    /// A DPO step (LoRA r16, β 0.1) on one preference pair: a 128-token prompt with a
    /// 128-token chosen and a 128-token rejected completion, so two 256-token sequences; the
    /// reference scores read as the train stage reads them from refscore (their one forward pass
    /// timed apart). `--against torch` runs TRL's DPOTrainer (scripts/bench-trl-dpo.py).
    #[value(name = "dpo-256")]
    Dpo256,
}

/// A training case's settings.
pub struct CaseShape {
    pub full: bool,
    pub seq: usize,
    pub base: crate::config::precision::BaseWeights,
    pub states: crate::config::precision::OptimStates,
    /// A DPO step on one pair of `seq`-token sequences (half prompt, half completion).
    pub dpo: bool,
}

impl TrainCase {
    pub const ALL: [TrainCase; 8] = [
        TrainCase::Lora256,
        TrainCase::Lora512,
        TrainCase::Full256,
        TrainCase::Qlora256,
        TrainCase::Qlora512,
        TrainCase::LoraBf16_512,
        TrainCase::Full8bit256,
        TrainCase::Dpo256,
    ];

    pub fn shape(self) -> CaseShape {
        use crate::config::precision::{BaseWeights as B, OptimStates as O};
        let (full, seq, base, states) = match self {
            TrainCase::Lora256 => (false, 256, B::F32, O::F32),
            TrainCase::Lora512 => (false, 512, B::F32, O::F32),
            TrainCase::Full256 => (true, 256, B::F32, O::F32),
            TrainCase::Qlora256 => (false, 256, B::Nf4DoubleQuant, O::F32),
            TrainCase::Qlora512 => (false, 512, B::Nf4DoubleQuant, O::F32),
            TrainCase::LoraBf16_512 => (false, 512, B::Bf16, O::F32),
            TrainCase::Full8bit256 => (true, 256, B::F32, O::Bnb8bit),
            TrainCase::Dpo256 => (false, 256, B::F32, O::F32),
        };
        CaseShape {
            full,
            seq,
            base,
            states,
            dpo: self == TrainCase::Dpo256,
        }
    }

    /// The name `--case` takes.
    pub fn name(self) -> String {
        use clap::ValueEnum;
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }
}

/// A peer measured beside kiln in the same run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PeerKind {
    /// llama.cpp through llama-cpp-python (`scripts/bench-llamacpp.py`).
    Llamacpp,
    /// PyTorch + PEFT (`scripts/bench-torch-train.py`).
    Torch,
}

/// A peer ready to run: its script and the version of the package it measures.
#[derive(Debug, Clone)]
pub struct Peer {
    pub kind: PeerKind,
    pub python: PathBuf,
    pub script: PathBuf,
    /// e.g. `llama-cpp-python 0.3.36`, `torch 2.5.1, peft 0.13.2`: printed beside its figures.
    pub version: String,
}

impl Peer {
    /// Finds the peer's script under `scripts` and asks `python` for the installed versions; an
    /// error says what to install when the peer is missing.
    pub fn find(kind: PeerKind, python: &Path, scripts: &Path) -> Result<Self, KilnError> {
        let (script, modules, install) = match kind {
            PeerKind::Llamacpp => (
                "bench-llamacpp.py",
                &["llama_cpp"][..],
                "pip install llama-cpp-python",
            ),
            PeerKind::Torch => (
                "bench-torch-train.py",
                &["torch", "transformers", "peft"][..],
                "pip install torch transformers peft",
            ),
        };
        let script = scripts.join(script);
        if !script.is_file() {
            return Err(KilnError::BadFlag {
                flag: "--against".into(),
                message: format!(
                    "{} not found; run from kiln's repository or pass --scripts DIR",
                    script.display()
                ),
            });
        }
        let version = probe_versions(python, modules, install)?;
        Ok(Peer {
            kind,
            python: python.to_path_buf(),
            script,
            version,
        })
    }

    /// The same Python with another script of the peer's directory, probed for `modules`.
    fn with_script(&self, script: &str, modules: &[&str]) -> Result<Self, KilnError> {
        let path = self.script.with_file_name(script);
        if !path.is_file() {
            return Err(KilnError::Bench(format!("{} not found", path.display())));
        }
        let install = format!("pip install {}", modules.join(" "));
        let version = probe_versions(&self.python, modules, &install)?;
        Ok(Peer {
            kind: self.kind,
            python: self.python.clone(),
            script: path,
            version,
        })
    }

    /// Runs the peer's script with `args`; its standard output.
    fn run(&self, args: &[String]) -> Result<String, KilnError> {
        let out = std::process::Command::new(&self.python)
            .arg(&self.script)
            .args(args)
            .output()
            .map_err(|e| KilnError::Bench(format!("{}: {e}", self.script.display())))?;
        if !out.status.success() {
            return Err(KilnError::Bench(format!(
                "{} failed: {}",
                self.script.display(),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }
}

/// The installed versions of `modules` as `python` imports them (`torch 2.15.0, peft 0.21.2`);
/// an error naming `install` when one is missing.
fn probe_versions(python: &Path, modules: &[&str], install: &str) -> Result<String, KilnError> {
    let probe = format!(
        "import importlib.metadata as m\nprint(', '.join(n + ' ' + m.version(n.replace('_', '-') if n != 'llama_cpp' else 'llama-cpp-python') for n in {modules:?}))"
    );
    let out = std::process::Command::new(python)
        .args(["-c", &probe])
        .output()
        .map_err(|e| KilnError::Bench(format!("{}: {e}", python.display())))?;
    if !out.status.success() {
        return Err(KilnError::BadFlag {
            flag: "--against".into(),
            message: format!(
                "{} cannot import {}: `{install}` first",
                python.display(),
                modules.join(", ")
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The number written just before the first `unit` in `s` (`... 42.5 tokens/s` → 42.5).
fn number_before(s: &str, unit: &str) -> Option<f64> {
    let head = &s[..s.find(unit)?];
    head.split_whitespace().last()?.parse().ok()
}

#[derive(Debug, Clone)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    pub note: String,
}

fn fig(name: &str, value: f64, unit: &'static str, note: &str) -> Figure {
    Figure {
        name: name.into(),
        value,
        unit,
        note: note.into(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs the preprocess benchmark in `work` with the model at `model` (a .gguf or HF directory).
/// `kiln_exe` is the binary to time for no-op commands (process start included).
pub fn preprocess(
    work: &Path,
    model: &Path,
    kiln_exe: Option<&Path>,
) -> Result<Vec<Figure>, KilnError> {
    let io = |e: std::io::Error| KilnError::Bench(e.to_string());
    std::fs::create_dir_all(work).map_err(io)?;
    let work = &std::fs::canonicalize(work).map_err(io)?;
    let mut figs = Vec::new();
    let model = std::fs::canonicalize(model).map_err(io)?;

    // 1. 2,000 rows, sequence_len 512: cold (fresh cache, model fetch + tokenizer load), then again.
    std::fs::write(work.join("rows2k.jsonl"), alpaca_rows(2000, 1)).map_err(io)?;
    let cfg = work.join("bench2k.yml");
    std::fs::write(
        &cfg,
        format!(
            "base_model: {}\ndatasets:\n  - path: rows2k.jsonl\n    type: alpaca\nsequence_len: 512\nsample_packing: true\nval_set_size: 0.02\ncache_dir: cache2k\n",
            model.display()
        ),
    )
    .map_err(io)?;
    let _ = std::fs::remove_dir_all(work.join("cache2k"));
    let t = Instant::now();
    let ws = Workspace::open(&cfg, &[])?;
    // Up to `pack`, as `kiln preprocess` does (the config implies a train stage too).
    let to_pack = RunOptions {
        targets: vec!["pack".into()],
        ..Default::default()
    };
    ws.scheduler().run(&to_pack, &mut |_| {})?;
    let cold = t.elapsed().as_secs_f64();
    let tok_ms = ws
        .index
        .stage(&stage_key(&ws, "tokenize[0]")?)?
        .map(|r| r.2)
        .unwrap_or(0);
    figs.push(fig(
        "preprocess 2k rows, cold",
        cold,
        "s",
        "Axolotl 0.19: 33.5 s; target < 2 s",
    ));
    figs.push(fig(
        "  of which tokenize stage",
        tok_ms as f64 / 1000.0,
        "s",
        "",
    ));
    let mut again = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let ws = Workspace::open(&cfg, &[])?;
        ws.scheduler().run(&to_pack, &mut |_| {})?;
        again.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    figs.push(fig(
        "preprocess 2k rows, again (in-process)",
        median(again),
        "ms",
        "Axolotl 0.19: 31.5 s; target < 30 ms",
    ));
    if let Some(exe) = kiln_exe {
        for (what, args) in [
            (
                "no-op `kiln run --target pack` (process)",
                &["run", "--target", "pack"][..],
            ),
            ("`kiln plan` (process)", &["plan"][..]),
        ] {
            let mut v = Vec::new();
            for _ in 0..5 {
                let t = Instant::now();
                let out = std::process::Command::new(exe)
                    .args(args)
                    .arg(&cfg)
                    .current_dir(work)
                    .output()
                    .map_err(io)?;
                if !out.status.success() {
                    return Err(KilnError::Bench(format!(
                        "kiln {} failed: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&out.stderr)
                    )));
                }
                v.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            figs.push(fig(
                what,
                median(v),
                "ms",
                "DVC 3.67: 770 ms repro / 620 ms status; target < 30 ms",
            ));
        }
    }

    // 2. 20,000 rows: format + tokenize + mask throughput (the tokenize stage alone).
    std::fs::write(work.join("rows20k.jsonl"), alpaca_rows(20000, 2)).map_err(io)?;
    let cfg = work.join("bench20k.yml");
    std::fs::write(
        &cfg,
        format!(
            "base_model: {}\ndatasets:\n  - path: rows20k.jsonl\n    type: alpaca\nsequence_len: 512\ncache_dir: cache20k\n",
            model.display()
        ),
    )
    .map_err(io)?;
    let _ = std::fs::remove_dir_all(work.join("cache20k"));
    let ws = Workspace::open(&cfg, &[])?;
    ws.scheduler().run(
        &RunOptions {
            targets: vec!["tokenize[0]".into()],
            force: vec![],
            ..Default::default()
        },
        &mut |_| {},
    )?;
    let key = stage_key(&ws, "tokenize[0]")?;
    let ms = ws.index.stage(&key)?.map(|r| r.2).unwrap_or(0) as f64;
    let stats: crate::data::tokenize::TokenizeStats = serde_json::from_slice(
        &std::fs::read(ws.cache.entry_dir(&key).join("stats.json")).map_err(io)?,
    )
    .map_err(|e| KilnError::Bench(e.to_string()))?;
    figs.push(fig(
        "tokenize 20k alpaca rows",
        ms / 1000.0,
        "s",
        &format!("{} tokens", stats.tokens),
    ));
    figs.push(fig(
        "  throughput",
        stats.tokens as f64 / (ms / 1000.0),
        "tokens/s",
        "HF datasets.map 1 proc: 342k tokens/s; target ≥ 1.71M (5×)",
    ));
    Ok(figs)
}

fn stage_key(ws: &Workspace, name: &str) -> Result<String, KilnError> {
    ws.scheduler()
        .assess()?
        .into_iter()
        .find(|s| s.name == name)
        .and_then(|s| s.key)
        .ok_or_else(|| KilnError::Bench(format!("{name} has no key")))
}

/// `kiln bench generate`: prompt processing and decode speed for a ~200-token ChatML prompt and
/// 128 greedy tokens (no early stop) on kiln's inference engine: with the model's weights in
/// f32 (as kiln loads a trained model), and from GGUF files kiln exports of the same model
/// (q8_0, q4_0, q4_k_m), whose quantized weights the engine keeps as they are; for a .gguf
/// model also from that file itself. Each figure is the median of three runs after a warm-up.
///
///
/// With `peer` (`--against llamacpp`), each GGUF case is also run through llama.cpp
/// (`scripts/bench-llamacpp.py`, llama-cpp-python) right after kiln's run of the same file, so the
/// two are measured on this machine, alternating; nothing is printed that was not measured now.
pub fn generate(
    model: &Path,
    cases: &[GenerateCase],
    peer: Option<&Peer>,
) -> Result<Vec<Figure>, KilnError> {
    if let Some(p) = peer {
        if p.kind != PeerKind::Llamacpp {
            return Err(KilnError::BadFlag {
                flag: "--against".into(),
                message: "bench generate compares with llamacpp".into(),
            });
        }
    }
    let tmp = std::env::temp_dir().join(format!("kiln-bench-generate-{}", std::process::id()));
    let res = generate_in(model, cases, peer, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    res
}

fn generate_in(
    model: &Path,
    cases: &[GenerateCase],
    peer: Option<&Peer>,
    tmp: &Path,
) -> Result<Vec<Figure>, KilnError> {
    let wanted = |c: GenerateCase| cases.is_empty() || cases.contains(&c);
    use crate::model::engine::Engine;
    use crate::model::generate::{generate, Sampler, SamplingOptions};
    use crate::model::gguf_export::{write_gguf, Quant};
    use crate::stages::StageError;
    let device = candle_core::Device::Cpu;
    let dir = model_dir(model, tmp)?;
    let m = crate::stages::train::load_model(&dir, &device)?;
    let tok = crate::text::TextTokenizer::load_dir(&dir).map_err(StageError::from)?;
    let mut rng = SplitMix64::new(7);
    let mut user = String::new();
    while tok
        .tokenizer
        .encode(user.as_str(), false)
        .map(|e| e.len())
        .unwrap_or(0)
        < 185
    {
        user.push_str(&words(&mut rng, 10));
        user.push_str(". ");
    }
    let prompt = format!(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nSummarize: {user}<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok
        .tokenizer
        .encode(prompt.as_str(), false)
        .map_err(|e| KilnError::Bench(e.to_string()))?
        .get_ids()
        .to_vec();
    let mut figures = Vec::new();
    let mut measure = |e: &Engine, label: &str, file: Option<&Path>| -> Result<(), KilnError> {
        let label = format!(
            "{label}, {:.0} MiB",
            e.weight_bytes() as f64 / (1024.0 * 1024.0)
        );
        // One warm-up pass, then three measured ones.
        let (mut prompt, mut decode) = (Vec::new(), Vec::new());
        let (mut pt, mut gt) = (0, 0);
        for round in 0..4 {
            let mut cache = e.new_cache();
            let st = generate(
                e,
                &mut cache,
                &ids,
                if round == 0 { 8 } else { 128 },
                &[],
                &mut Sampler::new(SamplingOptions::default()),
                &mut |_| true,
            )
            .map_err(StageError::from)?;
            if round > 0 {
                prompt.push(st.prompt_tokens as f64 / st.prompt_seconds.max(1e-9));
                decode.push(st.generated_tokens as f64 / st.decode_seconds.max(1e-9));
                (pt, gt) = (st.prompt_tokens, st.generated_tokens);
            }
        }
        figures.push(Figure {
            name: format!("{label}: prompt ({pt} tokens)"),
            value: median(prompt),
            unit: "tokens/s",
            note: String::new(),
        });
        figures.push(Figure {
            name: format!("{label}: decode ({gt} tokens)"),
            value: median(decode),
            unit: "tokens/s",
            note: String::new(),
        });
        if let (Some(p), Some(file)) = (peer, file) {
            let out = p.run(&[file.display().to_string()])?;
            let (prompt, decode) = (
                number_before(&out, "tokens/s,"),
                number_before(out.rsplit("decode").next().unwrap_or(""), "tokens/s"),
            );
            for (what, v) in [("prompt", prompt), ("decode", decode)] {
                let v = v.ok_or_else(|| {
                    KilnError::Bench(format!("cannot read llama.cpp's figures from: {out}"))
                })?;
                figures.push(Figure {
                    name: format!("  llama.cpp, same file: {what}"),
                    value: v,
                    unit: "tokens/s",
                    note: p.version.clone(),
                });
            }
        }
        Ok(())
    };
    let source = dir.join("model.gguf");
    // kiln's f32 engine runs the model as loaded; llama.cpp runs kiln's f32 export of it.
    if wanted(GenerateCase::F32) {
        let f32 = Engine::from_llama(&m).map_err(StageError::from)?;
        let file = match peer {
            Some(_) => {
                let path = tmp.join("export-f32.gguf");
                write_gguf(
                    &m,
                    &dir,
                    source.exists().then_some(source.as_path()),
                    None,
                    Quant::F32,
                    &[],
                    &path,
                )
                .map_err(StageError::from)?;
                Some(path)
            }
            None => None,
        };
        measure(&f32, "f32", file.as_deref())?;
        if let Some(f) = file {
            let _ = std::fs::remove_file(f);
        }
    }
    for (q, case) in [
        (Quant::Q8_0, GenerateCase::Q8_0),
        (Quant::Q4_0, GenerateCase::Q4_0),
        (Quant::Q4KM, GenerateCase::Q4KM),
    ] {
        if !wanted(case) {
            continue;
        }
        let path = tmp.join(format!("export-{}.gguf", q.as_str()));
        write_gguf(
            &m,
            &dir,
            source.exists().then_some(source.as_path()),
            None,
            q,
            &[],
            &path,
        )
        .map_err(StageError::from)?;
        let e = Engine::from_gguf(&path).map_err(StageError::from)?;
        measure(&e, &format!("{} (kiln export)", q.as_str()), Some(&path))?;
        let _ = std::fs::remove_file(&path);
    }
    if source.exists() && wanted(GenerateCase::Source) {
        let e = Engine::from_gguf(&source).map_err(StageError::from)?;
        let label = format!("source GGUF ({})", e.weight_formats());
        measure(&e, &label, Some(&source))?;
    }
    Ok(figures)
}

/// `kiln bench plan`: planning a 64-variant sweep (4 learning rates × 4 ranks × 4 warmups over
/// a built data pipeline): the in-process median of 5 plans after a warm-up, and `kiln plan` as
/// a separate process.
/// What a file in `output_dir` looks like on disk: any write, rename over it or touch changes it.
fn disk_stamps(
    dirs: &[std::path::PathBuf],
) -> std::collections::BTreeMap<std::path::PathBuf, (u64, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    fn walk(
        d: &Path,
        out: &mut std::collections::BTreeMap<std::path::PathBuf, (u64, u64, i64, i64)>,
    ) {
        let Ok(rd) = std::fs::read_dir(d) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            match std::fs::symlink_metadata(&p) {
                Ok(md) if md.is_dir() => walk(&p, out),
                Ok(md) => {
                    out.insert(
                        p,
                        (
                            md.ino(),
                            md.len(),
                            md.mtime() * 1_000_000_000 + md.mtime_nsec(),
                            md.ctime() * 1_000_000_000 + md.ctime_nsec(),
                        ),
                    );
                }
                Err(_) => {}
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    for d in dirs {
        walk(d, &mut out);
    }
    out
}

/// `kiln bench noop CONFIG`: a no-op `kiln run` of a built pipeline (built first when it is
/// not), as a process: the whole command's wall time (median of 7), and how many files of
/// `output_dir` each no-op run rewrote (inode, size, mtime and ctime compared).
pub fn noop(config: &Path, kiln_exe: &Path) -> Result<Vec<Figure>, KilnError> {
    let run = || -> Result<(f64, String), KilnError> {
        let t = Instant::now();
        let out = std::process::Command::new(kiln_exe)
            .arg("run")
            .arg(config)
            .output()
            .map_err(|e| KilnError::Bench(format!("cannot start {}: {e}", kiln_exe.display())))?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if !out.status.success() {
            return Err(KilnError::Bench(format!(
                "kiln run {} failed: {}",
                config.display(),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok((ms, String::from_utf8_lossy(&out.stdout).into_owned()))
    };
    let (first_ms, _) = run()?;
    let ws = Workspace::open(config, &[])?;
    let dirs = ws.output_dirs();
    let stages = ws.plan.stages.len();
    drop(ws);
    let before = disk_stamps(&dirs);
    let bytes: u64 = before.values().map(|s| s.1).sum();
    let mut times = Vec::new();
    let mut rewritten = 0usize;
    for _ in 0..7 {
        let (ms, stdout) = run()?;
        if !stdout.contains("nothing to do") {
            return Err(KilnError::Bench(format!(
                "kiln run {} was not a no-op:\n{stdout}",
                config.display()
            )));
        }
        times.push(ms);
        let now = disk_stamps(&dirs);
        rewritten = rewritten.max(
            now.iter()
                .filter(|(p, s)| before.get(*p) != Some(*s))
                .count()
                + before.keys().filter(|p| !now.contains_key(*p)).count(),
        );
    }
    Ok(vec![
        fig(
            "first `kiln run` (builds what is stale)",
            first_ms / 1000.0,
            "s",
            "",
        ),
        fig(
            &format!(
                "no-op `kiln run` ({stages} stages, {} output files), process",
                before.len()
            ),
            median(times),
            "ms",
            "median of 7, whole command; target ≤ 30 ms (quickstart), ≤ 100 ms (100-variant sweep)",
        ),
        fig(
            "  output_dir size",
            bytes as f64 / (1u64 << 20) as f64,
            "MiB",
            "",
        ),
        fig(
            "  output_dir files rewritten by a no-op run",
            rewritten as f64,
            "files",
            "worst of 7; target 0",
        ),
    ])
}

/// A pipeline of `variants` sweep variants in `work` (each trains a LoRA for 2 steps and merges
/// it) on a generated 2-layer model with random weights and `model`'s tokenizer, for
/// `kiln bench noop --sweep N`: the sweep's no-op cost is planning, verifying and publishing
/// `variants` pipelines, which a tiny model builds in seconds. Returns the config's path.
pub fn tiny_sweep(work: &Path, model: &Path, variants: usize) -> Result<PathBuf, KilnError> {
    let io = |e: std::io::Error| KilnError::Bench(e.to_string());
    // Files are rewritten only when their bytes change: a fresh mtime would make the next runs
    // re-hash them ("racily clean" for two seconds) and the no-op figure would measure that.
    let write = |path: &Path, bytes: &[u8]| -> Result<(), KilnError> {
        if std::fs::read(path).ok().as_deref() != Some(bytes) {
            std::fs::write(path, bytes).map_err(io)?;
        }
        Ok(())
    };
    let tmp = work.join("tiny-model-src");
    let src = model_dir(model, &tmp)?;
    let dir = work.join("tiny-model");
    std::fs::create_dir_all(&dir).map_err(io)?;
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        write(&dir.join(f), &std::fs::read(src.join(f)).map_err(io)?)?;
    }
    let tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).map_err(io)?)
            .map_err(|e| KilnError::Bench(format!("tokenizer.json: {e}")))?;
    let vocab = tok["model"]["vocab"]
        .as_object()
        .map(|v| v.len())
        .unwrap_or(0)
        .max(
            tok["added_tokens"]
                .as_array()
                .and_then(|a| a.iter().filter_map(|t| t["id"].as_u64()).max())
                .map(|m| m as usize + 1)
                .unwrap_or(0),
        );
    let cfg = crate::model::LlamaConfig {
        architecture: "llama".into(),
        vocab_size: vocab,
        hidden_size: 16,
        intermediate_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 512,
        tie_word_embeddings: true,
        attention_bias: false,
        sliding_window: None,
    };
    let dev = candle_core::Device::Cpu;
    let mut rng = SplitMix64::new(5);
    let mut tensors = std::collections::HashMap::new();
    let mut add = |name: String, shape: &[usize], ones: bool| -> Result<(), KilnError> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                if ones {
                    1.0
                } else {
                    ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
                }
            })
            .collect();
        let t = candle_core::Tensor::from_vec(v, shape, &dev)
            .map_err(|e| KilnError::Bench(e.to_string()))?;
        tensors.insert(name, t);
        Ok(())
    };
    let (h, i, kv) = (16, 32, 8);
    add("model.embed_tokens.weight".into(), &[vocab, h], false)?;
    add("model.norm.weight".into(), &[h], true)?;
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        for (n, shape) in [
            ("self_attn.q_proj", [h, h]),
            ("self_attn.k_proj", [kv, h]),
            ("self_attn.v_proj", [kv, h]),
            ("self_attn.o_proj", [h, h]),
            ("mlp.gate_proj", [i, h]),
            ("mlp.up_proj", [i, h]),
            ("mlp.down_proj", [h, i]),
        ] {
            add(format!("{p}.{n}.weight"), &shape, false)?;
        }
        add(format!("{p}.input_layernorm.weight"), &[h], true)?;
        add(format!("{p}.post_attention_layernorm.weight"), &[h], true)?;
    }
    let fresh = dir.join("model.safetensors.new");
    candle_core::safetensors::save(&tensors, &fresh)
        .map_err(|e| KilnError::Bench(e.to_string()))?;
    write(
        &dir.join("model.safetensors"),
        &std::fs::read(&fresh).map_err(io)?,
    )?;
    std::fs::remove_file(&fresh).map_err(io)?;
    let cfg_json =
        serde_json::to_vec_pretty(&cfg.to_hf()).map_err(|e| KilnError::Bench(e.to_string()))?;
    write(&dir.join("config.json"), &cfg_json)?;
    write(&work.join("rows40.jsonl"), alpaca_rows(40, 7).as_bytes())?;
    let seeds: Vec<String> = (0..variants).map(|v| v.to_string()).collect();
    let config = work.join(format!("sweep{variants}.yml"));
    write(
        &config,
        format!(
            "base_model: tiny-model\ndatasets:\n  - path: rows40.jsonl\n    type: alpaca\nsequence_len: 256\nsample_packing: true\nval_set_size: 0.1\nadapter: lora\nlora_r: 4\nlora_target_linear: true\nmax_steps: 2\nmerge_lora: true\ncache_dir: cache-sweep{variants}\noutput_dir: out-sweep{variants}\nsweep:\n  seed: [{}]\n",
            seeds.join(", ")
        )
        .as_bytes(),
    )?;
    Ok(config)
}

pub fn plan(work: &Path, model: &Path, kiln_exe: Option<&Path>) -> Result<Vec<Figure>, KilnError> {
    let io = |e: std::io::Error| KilnError::Bench(e.to_string());
    std::fs::create_dir_all(work).map_err(io)?;
    let work = &std::fs::canonicalize(work).map_err(io)?;
    let model = std::fs::canonicalize(model).map_err(io)?;
    std::fs::write(work.join("rows500.jsonl"), alpaca_rows(500, 3)).map_err(io)?;
    let cfg = work.join("sweep64.yml");
    std::fs::write(
        &cfg,
        format!(
            "base_model: {}\ndatasets:\n  - path: rows500.jsonl\n    type: alpaca\nsequence_len: 512\nsample_packing: true\nval_set_size: 0.05\ncache_dir: cache-sweep\nadapter: lora\nmerge_lora: true\nevaluate: true\nsweep:\n  learning_rate: [1e-4, 2e-4, 3e-4, 4e-4]\n  lora_r: [4, 8, 16, 32]\n  warmup_ratio: [0.0, 0.1, 0.2, 0.3]\n",
            model.display()
        ),
    )
    .map_err(io)?;
    // Build the shared data stages once, so the plan sees a realistic, partly built cache.
    let ws = Workspace::open(&cfg, &[])?;
    let opts = RunOptions {
        targets: vec!["pack".into()],
        force: vec![],
        ..Default::default()
    };
    ws.scheduler().run(&opts, &mut |_| {})?;
    let stages = ws.plan.stages.len();
    drop(ws);
    let mut times = Vec::new();
    for _ in 0..6 {
        let t = Instant::now();
        let ws = Workspace::open(&cfg, &[])?;
        let st = ws.scheduler().assess()?;
        std::hint::black_box(st);
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.remove(0);
    times.sort_by(|a, b| a.total_cmp(b));
    let mut figs = vec![fig(
        &format!("plan 64-variant sweep ({stages} stages), in-process"),
        times[times.len() / 2],
        "ms",
        "median of 5; target < 200 ms",
    )];
    if let Some(exe) = kiln_exe {
        let t = Instant::now();
        let out = std::process::Command::new(exe)
            .arg("plan")
            .arg(&cfg)
            .output()
            .map_err(io)?;
        if out.status.success() {
            figs.push(fig(
                "  `kiln plan` as a process",
                t.elapsed().as_secs_f64() * 1000.0,
                "ms",
                "startup, config, hashing fast path, assess, print",
            ));
        }
    }
    Ok(figs)
}

/// `kiln bench train`: optimizer steps on the model as the train stage runs it — micro-batches
/// of one packed row of generated ids, LoRA r16 on every linear layer, or full fine-tuning —
/// after one warm-up step: tokens/s and the process's peak RSS. `cases` picks rows; empty runs
/// them all. With `peer` (`--against torch`), each case is also run in PyTorch
/// (`scripts/bench-torch-train.py` on an HF copy of the same weights) right after kiln's, so both
/// are measured on this machine in the same run.
pub fn train(
    model: &Path,
    cases: &[TrainCase],
    peer: Option<&Peer>,
    with_reference: bool,
    checkpointing: bool,
) -> Result<Vec<Figure>, KilnError> {
    if let Some(p) = peer {
        if p.kind != PeerKind::Torch {
            return Err(KilnError::BadFlag {
                flag: "--against".into(),
                message: "bench train compares with torch".into(),
            });
        }
    }
    use crate::stages::StageError;
    use crate::train::{attach_full, attach_lora, train_step, AdamW, Batch, LoraSpec};
    let device = candle_core::Device::Cpu;
    let tmp = std::env::temp_dir().join(format!("kiln-bench-train-{}", std::process::id()));
    let dir = model_dir(model, &tmp)?;
    // Rows of pseudo-random ids (every token trained), one sample per step.
    let mut rng = SplitMix64::new(11);
    let mut figs = Vec::new();
    let (peak, reference) = matmul_reference()?;
    if with_reference {
        figs.extend(reference);
    }
    // PyTorch reads an HF directory: the model's own, or the same weights written once as
    // safetensors.
    let hf_dir = match peer {
        Some(_) if dir.join("config.json").exists() => Some(dir.clone()),
        Some(_) => {
            let m = crate::stages::train::load_model(&dir, &device)?;
            let out = tmp.join("hf");
            std::fs::create_dir_all(&out).map_err(|e| KilnError::Bench(e.to_string()))?;
            crate::stages::merge::write_hf_model(
                &m,
                &dir,
                &out,
                crate::config::DEFAULT_MAX_SHARD,
                candle_core::DType::F32,
                None,
            )?;
            Some(out)
        }
        None => None,
    };
    for case in TrainCase::ALL {
        if !cases.is_empty() && !cases.contains(&case) {
            continue;
        }
        let CaseShape {
            full,
            seq,
            base,
            states,
            dpo,
        } = case.shape();
        let (mut m, stored) = crate::stages::train::load_model_as(&dir, base)?;
        let (loaded_rss, loaded_peak) = (
            crate::stages::train::rss_bytes().unwrap_or(0),
            crate::stages::train::peak_rss_bytes().unwrap_or(0),
        );
        let vocab = m.cfg.vocab_size as u64;
        // Weights that multiply: all but an untied embedding (a lookup); a tied embedding is
        // also the head, so it counts once.
        // Counted from the shapes: widening a packed base to count it would hold it at f32.
        let packed: usize = m
            .linears()
            .iter()
            .map(|(_, l)| match &l.weight {
                crate::model::packed::BaseWeight::Packed(p) => p.n * p.k,
                crate::model::packed::BaseWeight::Dense(_) => 0,
            })
            .sum();
        let params: usize = m
            .dense_weights()
            .map_err(crate::stages::StageError::from)?
            .values()
            .map(|t| t.elem_count())
            .sum::<usize>()
            + packed
            - if m.lm_head.is_some() {
                m.embed_tokens.elem_count()
            } else {
                0
            };
        let ids: Vec<u32> = (0..seq).map(|_| rng.below(vocab) as u32).collect();
        let rows = if dpo {
            // One packed row: prompt + chosen, then prompt + rejected (positions restart), only
            // the completions trained — as the pack stage lays out a pair.
            let half = seq / 2;
            let rejected: Vec<u32> = (0..seq - half).map(|_| rng.below(vocab) as u32).collect();
            let mut row: (Vec<u32>, Vec<u8>, Vec<u32>) = Default::default();
            for completion in [&ids[half..], &rejected[..]] {
                row.0.extend(&ids[..half]);
                row.0.extend(completion);
                row.1.extend((0..seq).map(|i| (i >= half) as u8));
                row.2.extend(0..seq as u32);
            }
            vec![row]
        } else {
            vec![(ids, vec![1u8; seq], (0..seq as u32).collect::<Vec<u32>>())]
        };
        // DPO's reference scores: one forward pass of the base per pair (the refscore stage's
        // work, done once per pair for every variant and rerun), timed on its own.
        let reference = if dpo {
            let batch = Batch::new(&rows, &device).map_err(StageError::from)?;
            let t = Instant::now();
            let r = crate::train::pref::pair_logps(&m, &batch).map_err(StageError::from)?;
            figs.push(fig(
                "refscore: reference forward, one pair",
                t.elapsed().as_secs_f64(),
                "s",
                "once per pair, cached for every variant and rerun",
            ));
            r
        } else {
            Vec::new()
        };
        let dpo_loss = crate::config::pref::PrefLoss::Sigmoid {
            beta: 0.1,
            label_smoothing: 0.0,
        };
        let step_tokens = rows[0].0.len();
        let vars = if full {
            attach_full(&mut m).map_err(StageError::from)?
        } else {
            let spec = LoraSpec {
                r: 16,
                alpha: 32.0,
                target_modules: vec![],
                target_linear: true,
                rslora: false,
                dora: false,
            };
            attach_lora(&mut m, &spec, 1, &device).map_err(StageError::from)?
        };
        if checkpointing {
            m.checkpoint = Some(Default::default());
        }
        let mut opt = AdamW::new(vars.iter().map(|(_, v)| v.clone()).collect(), 0.0)
            .and_then(|o| o.with_states(states))
            .map_err(StageError::from)?;
        let mut secs = 0.0;
        let steps = 3;
        let (mut faults, mut cpu) = (0, 0.0);
        for step in 0..=steps {
            let batch = Batch::new(&rows, &device).map_err(StageError::from)?;
            let (t, u0) = (Instant::now(), usage());
            if dpo {
                let micro = [crate::train::pref::PrefMicro {
                    batch,
                    reference: reference.clone(),
                    labels: Vec::new(),
                }];
                crate::train::pref::pref_step(&m, &mut opt, &micro, &dpo_loss, 1e-5, 1.0)
                    .map_err(StageError::from)?;
            } else {
                train_step(&m, &mut opt, &[batch], 1e-5, 1.0).map_err(StageError::from)?;
            }
            if step > 0 {
                secs += t.elapsed().as_secs_f64();
                let u1 = usage();
                faults += u1.0 - u0.0;
                cpu += u1.1 - u0.1;
            }
        }
        let per_step = secs / steps as f64;
        let ckpt = if checkpointing {
            ", gradient checkpointing"
        } else {
            ""
        };
        let label = match (full, stored.is_some(), states.is_f32()) {
            _ if dpo => "DPO, LoRA r16, all linear layers".to_string(),
            (true, _, true) => "full fine-tuning".to_string(),
            (true, _, false) => format!("full fine-tuning, {states:?} moments"),
            (false, false, _) => "LoRA r16, all linear layers".to_string(),
            (false, true, _) => format!("LoRA r16 on a {base:?} base"),
        };
        let shape = if dpo {
            format!("2×{seq} tokens (one pair)")
        } else {
            format!("1×{seq} tokens")
        };
        figs.push(fig(
            &format!("train step, {label}{ckpt}, {shape}"),
            step_tokens as f64 / per_step,
            "tokens/s",
            "",
        ));
        figs.push(fig("  seconds per step", per_step, "s", ""));
        figs.push(fig(
            "  base linear weights",
            m.layers
                .iter()
                .flat_map(|l| {
                    [
                        &l.attn.q_proj,
                        &l.attn.k_proj,
                        &l.attn.v_proj,
                        &l.attn.o_proj,
                        &l.mlp.gate_proj,
                        &l.mlp.up_proj,
                        &l.mlp.down_proj,
                    ]
                })
                .map(|lin| match &lin.weight {
                    crate::model::packed::BaseWeight::Packed(p) => p.bytes(),
                    crate::model::packed::BaseWeight::Dense(t) => {
                        t.elem_count() * t.dtype().size_in_bytes()
                    }
                })
                .sum::<usize>() as f64
                / 1e6,
            "MB",
            &format!("{base:?}"),
        ));
        figs.push(fig(
            "  optimizer moments",
            opt.state_bytes() as f64 / 1e6,
            "MB",
            &format!("{states:?}"),
        ));
        // Forward 2·P·T; backward 2·P·T for input gradients, + 2·P·T for weight gradients
        // when every weight trains (attention's t² terms left out).
        let flops = if full { 6.0 } else { 4.0 } * params as f64 * step_tokens as f64;
        figs.push(fig(
            "  achieved rate",
            flops / per_step / 1e9,
            "GFLOP/s",
            &format!(
                "{:.0}% of the matmul rate",
                100.0 * flops / per_step / 1e9 / peak
            ),
        ));
        figs.push(fig(
            "  cores busy",
            cpu / secs,
            "",
            &format!("of {} threads", rayon::current_num_threads()),
        ));
        figs.push(fig(
            "  page faults per step",
            (faults / steps as u64) as f64,
            "",
            "fresh pages the kernel zeroes (a 2 MiB huge page counts once)",
        ));
        let gib = |b: u64| b as f64 / (1024.0 * 1024.0 * 1024.0);
        figs.push(fig(
            "  RSS once loaded",
            gib(loaded_rss),
            "GiB",
            &format!("peak while loading {:.3} GiB", gib(loaded_peak)),
        ));
        figs.push(fig(
            "  peak RSS (this process)",
            crate::stages::train::peak_rss_bytes().unwrap_or(0) as f64 / (1024.0 * 1024.0 * 1024.0),
            "GiB",
            "",
        ));
        // The peer trains an f32 base in full precision: its row stands beside each case. For
        // DPO it is TRL's DPOTrainer, whose step includes the reference's forward pass (the
        // adapter disabled), as TRL trains by default.
        if let (Some(p), Some(hf)) = (peer, &hf_dir) {
            let (peer, mut args, who) = if dpo {
                let trl = p.with_script(
                    "bench-trl-dpo.py",
                    &["torch", "transformers", "peft", "trl"],
                )?;
                (
                    trl,
                    vec![hf.display().to_string(), seq.to_string()],
                    "TRL DPOTrainer",
                )
            } else {
                let mode = if full { "full" } else { "lora" };
                let args = vec![hf.display().to_string(), seq.to_string(), mode.to_string()];
                (p.clone(), args, "PyTorch")
            };
            if checkpointing {
                args.push("ckpt".into());
            }
            let out = peer.run(&args)?;
            let rate = number_before(&out, "tokens/s").ok_or_else(|| {
                KilnError::Bench(format!("cannot read {who}'s figures from: {out}"))
            })?;
            figs.push(fig(
                &format!("  {who}, same step"),
                rate,
                "tokens/s",
                &peer.version,
            ));
            if let Some(gib) = number_before(out.rsplit("peak").next().unwrap_or(""), "GiB") {
                figs.push(fig(
                    &format!("  {who} peak RSS (its own process)"),
                    gib,
                    "GiB",
                    "",
                ));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(figs)
}

/// The machine's f32 matmul rate (the reference for a step's achieved rate), and figures for
/// it and for kiln's sgemm on 1024³ and on a LoRA step's shapes.
pub fn matmul_reference() -> Result<(f64, Vec<Figure>), KilnError> {
    use crate::stages::StageError;
    let device = candle_core::Device::Cpu;
    let mut figs = Vec::new();
    let peak = {
        let n = 1024;
        let a = candle_core::Tensor::ones((n, n), candle_core::DType::F32, &device)
            .map_err(StageError::from)?;
        let _ = a.matmul(&a).map_err(StageError::from)?;
        let t = Instant::now();
        for _ in 0..4 {
            let _ = a.matmul(&a).map_err(StageError::from)?;
        }
        4.0 * 2.0 * (n * n * n) as f64 / t.elapsed().as_secs_f64() / 1e9
    };
    figs.push(fig(
        "f32 matmul 1024³ (this machine's reference rate)",
        peak,
        "GFLOP/s",
        "candle's matmul (the gemm crate)",
    ));
    // kiln's own product (model/sgemm.rs) on 1024³ and on the step's shapes: (m, k, n,
    // B transposed, label).
    for (m, k, n, bt, label) in [
        (1024, 1024, 1024, false, "1024³"),
        (256, 576, 1536, true, "x·Wᵀ 256×576 · 576×1536"),
        (256, 1536, 576, false, "dY·W 256×1536 · 1536×576"),
        (256, 576, 49152, true, "head 256×576 · 576×49152"),
    ] {
        use crate::model::sgemm::{gemm, Mat, MatMut};
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let mut c = vec![0f32; m * n];
        let bm = if bt {
            Mat::transposed(&b, k, n)
        } else {
            Mat::rows(&b, k, n)
        };
        let mut run = || {
            gemm(
                1.0,
                Mat::rows(&a, m, k),
                bm,
                MatMut::rows(&mut c, m, n),
                false,
                true,
            )
        };
        run();
        let reps = (4 * 1024 * 1024 * 1024 / (m * k * n)).max(1);
        let t = Instant::now();
        for _ in 0..reps {
            run();
        }
        let rate = reps as f64 * 2.0 * (m * k * n) as f64 / t.elapsed().as_secs_f64() / 1e9;
        figs.push(fig(&format!("  kiln sgemm {label}"), rate, "GFLOP/s", ""));
    }
    Ok((peak, figs))
}

/// Model shapes `kiln bench train --shape` builds with random weights (written once under the
/// bench's scratch directory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelShape {
    /// SmolLM2-135M's config (30 layers, hidden 576, MLP 1536, 9 heads / 3 KV heads, vocab
    /// 49152, tied): 135M parameters.
    #[value(name = "smollm2-135m")]
    Smollm2_135m,
    /// SmolLM2-1.7B's config (Llama: 24 layers, hidden 2048, MLP 8192, 32 heads, vocab 49152,
    /// tied embeddings): 1.71B parameters.
    #[value(name = "smollm2-1.7b")]
    Smollm2_1_7b,
}

impl ModelShape {
    fn config(self) -> crate::model::LlamaConfig {
        match self {
            ModelShape::Smollm2_135m => crate::model::LlamaConfig {
                architecture: "llama".into(),
                vocab_size: 49152,
                hidden_size: 576,
                intermediate_size: 1536,
                num_hidden_layers: 30,
                num_attention_heads: 9,
                num_key_value_heads: 3,
                rms_norm_eps: 1e-5,
                rope_theta: 100000.0,
                max_position_embeddings: 8192,
                tie_word_embeddings: true,
                attention_bias: false,
                sliding_window: None,
            },
            ModelShape::Smollm2_1_7b => crate::model::LlamaConfig {
                architecture: "llama".into(),
                vocab_size: 49152,
                hidden_size: 2048,
                intermediate_size: 8192,
                num_hidden_layers: 24,
                num_attention_heads: 32,
                num_key_value_heads: 32,
                rms_norm_eps: 1e-5,
                rope_theta: 130000.0,
                max_position_embeddings: 8192,
                tie_word_embeddings: true,
                attention_bias: false,
                sliding_window: None,
            },
        }
    }
}

/// An HF-layout model directory with `shape`'s config and random bf16 weights (N(0, 0.02)-like,
/// norms 1), under `work`; reused when it is already there.
pub fn random_model(work: &Path, shape: ModelShape) -> Result<std::path::PathBuf, KilnError> {
    use clap::ValueEnum;
    let name = shape
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default();
    let dir = work.join(format!("{name}-random"));
    let done = dir.join(".complete");
    if done.exists() {
        return Ok(dir);
    }
    let io = |e: std::io::Error| KilnError::Bench(e.to_string());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(io)?;
    let cfg = shape.config();
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let kv = cfg.num_key_value_heads * cfg.head_dim();
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![v, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
        ] {
            shapes.push((format!("{p}.{n}"), s));
        }
    }
    // Written as safetensors one tensor at a time (the header first), never all in memory.
    shapes.sort();
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut off = 0usize;
    for (name, s) in &shapes {
        let bytes = s.iter().product::<usize>() * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": s, "data_offsets": [off, off + bytes]}),
        );
        off += bytes;
    }
    let mut head = serde_json::Value::Object(header).to_string().into_bytes();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    use std::io::Write;
    let path = dir.join("model.safetensors");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).map_err(io)?);
    f.write_all(&(head.len() as u64).to_le_bytes())
        .map_err(io)?;
    f.write_all(&head).map_err(io)?;
    for (k, (_, s)) in shapes.iter().enumerate() {
        let n: usize = s.iter().product();
        let vals: Vec<u8> = if s.len() == 1 {
            half::bf16::ONE.to_le_bytes().repeat(n)
        } else {
            use rayon::prelude::*;
            (0..n)
                .into_par_iter()
                .flat_map_iter(|j| {
                    // Sum of two uniforms: a triangle around 0 with std ≈ 0.02.
                    let mut r = SplitMix64::new((k as u64) << 40 ^ j as u64);
                    let u = (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32
                        + (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32
                        - 1.0;
                    half::bf16::from_f32(u * 0.049).to_le_bytes()
                })
                .collect()
        };
        f.write_all(&vals).map_err(io)?;
    }
    f.flush().map_err(io)?;
    crate::stages::write_json(&dir.join("config.json"), &cfg.to_hf())?;
    std::fs::write(&done, b"").map_err(io)?;
    Ok(dir)
}

/// The process's minor page faults and CPU seconds (user + system) so far; zeros where
/// getrusage fails.
fn usage() -> (u64, f64) {
    // SAFETY: getrusage fills the zeroed struct it is given.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut u) != 0 {
            return (0, 0.0);
        }
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        (u.ru_minflt as u64, secs(u.ru_utime) + secs(u.ru_stime))
    }
}

/// A directory `load_model` and the tokenizer loader read: `model` itself, or for a .gguf file a
/// scratch directory holding a link to it and the tokenizer files rebuilt from its metadata.
fn model_dir(model: &Path, tmp: &Path) -> Result<std::path::PathBuf, KilnError> {
    if !model.is_file() {
        return Ok(model.to_path_buf());
    }
    let io = |e: std::io::Error| KilnError::Bench(e.to_string());
    std::fs::create_dir_all(tmp).map_err(io)?;
    let link = tmp.join("model.gguf");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(std::fs::canonicalize(model).map_err(io)?, &link).map_err(io)?;
    let t = crate::text::gguf::tokenizer_files(&link).map_err(crate::stages::StageError::from)?;
    crate::stages::write_json(&tmp.join("tokenizer.json"), &t.tokenizer_json)?;
    crate::stages::write_json(&tmp.join("tokenizer_config.json"), &t.tokenizer_config)?;
    Ok(tmp.to_path_buf())
}
