//! The `kiln` command line: parse arguments, call the library, print. The only place that prints.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kiln::cache::{dir_size, Cache};
use kiln::events::Event;
use kiln::scheduler::{RunOptions, SchedError, State};
use kiln::workspace::{cache_root, KilnError, Workspace};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

// Tokenization allocates many small buffers per record; mimalloc's thread-local free lists cut
// allocator time (about 40% of the tokenize stage under glibc malloc, measured with perf).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Fine-tune Llama-family LLMs from one YAML file, built like a build system"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// The pipeline config (Axolotl-style YAML).
    config: PathBuf,
    /// Override a config key without editing the file (repeatable): `--set learning_rate=1e-4`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// In a sweep, work on this variant only (its id, or a unique prefix; see `kiln plan`).
    #[arg(long)]
    variant: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check the config: types, unknown keys, unsupported keys. Builds nothing.
    Validate(Common),
    /// Show every stage: short key, fresh or stale, and why.
    Plan {
        #[command(flatten)]
        common: Common,
        /// Print {"stages": [...]} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the stage graph.
    Dag {
        #[command(flatten)]
        common: Common,
        /// Graphviz output (the default).
        #[arg(long, default_value_t = true)]
        dot: bool,
    },
    /// Build every stale stage (or only what --target needs); reuse the rest.
    Run {
        #[command(flatten)]
        common: Common,
        /// A stage name (`tokenize[0]`) or kind (`pack`); builds it and what it needs.
        #[arg(long)]
        target: Vec<String>,
        /// Rebuild this stage (name or kind) even if fresh.
        #[arg(long)]
        force: Vec<String>,
        /// Check mode for CI: build nothing; fail, naming each stage and why, if anything would
        /// rebuild or differs from kiln.lock.
        #[arg(long)]
        locked: bool,
        /// --locked, and never touch the network (hub revisions from the local HF cache only).
        #[arg(long)]
        frozen: bool,
        /// Keep building what does not depend on a failed stage (a failed sweep variant does not
        /// stop the others); exit 1 at the end listing the failures.
        #[arg(long)]
        keep_going: bool,
        /// Build up to N independent stages at once.
        #[arg(long, short = 'j', default_value_t = 1)]
        jobs: usize,
        /// Of those, at most this many train stages (each uses every core).
        #[arg(long, default_value_t = 1)]
        train_jobs: usize,
    },
    /// Validate, fetch, tokenize and pack, then print dataset statistics.
    Preprocess {
        #[command(flatten)]
        common: Common,
        /// Show tokenized examples with their trained/masked tokens.
        #[arg(long)]
        debug: bool,
        #[arg(long = "debug-num-examples", default_value_t = 3)]
        debug_num_examples: usize,
        /// With --debug: one JSON object per example.
        #[arg(long)]
        json: bool,
    },
    /// Print benchmark figures (preprocess: cold/again/no-op/throughput) on generated data.
    Bench {
        /// What to measure: `preprocess`, `generate`, `plan` or `train`.
        #[arg(default_value = "preprocess")]
        what: String,
        /// The model whose tokenizer to use (.gguf or HF directory).
        #[arg(long, default_value = "cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")]
        model: PathBuf,
        /// Scratch directory for generated data and caches.
        #[arg(long, default_value = "cache/bench")]
        work: PathBuf,
        /// Run just these cases (repeatable). `train`: `lora-256`, `lora-512`, `full-256`;
        /// `generate`: `f32`, `q8_0`, `q4_0`, `q4_k_m`, `source` (the --model GGUF itself).
        #[arg(long = "case", value_name = "CASE")]
        cases: Vec<String>,
    },
    /// Build up to the train stage (fine-tune) and write the adapter to `output_dir`.
    Train {
        #[command(flatten)]
        common: Common,
        /// One step only: time, memory, loss, and a decoded sample with its loss mask; builds
        /// the data stages but publishes no train entry.
        #[arg(long)]
        debug: bool,
        /// Start from this `checkpoint-N/` directory (Axolotl's `resume_from_checkpoint`; the
        /// checkpoint's files become hashed inputs of the train stage).
        #[arg(long, value_name = "DIR")]
        resume_from_checkpoint: Option<PathBuf>,
    },
    /// Merge the trained LoRA adapter into the base model: a standalone HF-layout model in
    /// `output_dir/merged` (the cached `merge` stage).
    #[command(name = "merge-lora")]
    MergeLora {
        #[command(flatten)]
        common: Common,
        /// Merge this PEFT adapter directory instead of the config's train stage (not cached).
        #[arg(long)]
        lora_model_dir: Option<PathBuf>,
        /// Where to write the merged model (default: `output_dir/merged`).
        #[arg(long)]
        output_dir: Option<PathBuf>,
    },
    /// Chat with the trained model in the terminal (streaming; `/reset`, `/exit`), or answer
    /// one `--prompt` and exit.
    Inference {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        gen: GenArgs,
        /// Answer this prompt and exit.
        #[arg(long)]
        prompt: Option<String>,
        /// Apply this PEFT adapter directory instead of the config's train stage.
        #[arg(long)]
        lora_model_dir: Option<PathBuf>,
        /// Use this base model instead of the config's (hub id, directory or .gguf).
        #[arg(long)]
        base_model: Option<String>,
        /// Chat with this GGUF file (e.g. one `kiln export` wrote), its weights kept quantized;
        /// tokenizer and chat template from its metadata.
        #[arg(long, conflicts_with_all = ["lora_model_dir", "base_model"])]
        gguf: Option<PathBuf>,
        /// Feed the prompt as plain text (no chat template), for base models.
        #[arg(long)]
        raw: bool,
        /// A system message for the conversation.
        #[arg(long)]
        system: Option<String>,
    },
    /// Validation loss and perplexity of the trained model (and answers to `evaluate.prompts`),
    /// cached: an unchanged model and eval set are not evaluated again.
    Evaluate {
        #[command(flatten)]
        common: Common,
    },
    /// Export the fine-tuned model: a GGUF for llama.cpp or an HF safetensors directory, with
    /// its size and validation perplexity next to the unquantized model's.
    Export {
        #[command(flatten)]
        common: Common,
        /// gguf or safetensors.
        #[arg(long, default_value = "gguf")]
        format: String,
        /// GGUF: f32, f16, q8_0, q4_0, q4_k_m; safetensors: f32, f16, bf16.
        #[arg(long)]
        quant: Option<String>,
    },
    /// Serve the fine-tuned model: a chat page at / and an OpenAI-compatible API
    /// (POST /v1/chat/completions, streaming or not; GET /v1/models).
    Serve {
        #[command(flatten)]
        common: Common,
        /// Address to bind (default: `gradio_server_name`, else 127.0.0.1 — this machine only).
        #[arg(long)]
        host: Option<String>,
        /// Port (default: `gradio_server_port`, else 7860; 0 picks a free one).
        #[arg(long)]
        port: Option<u16>,
        /// Apply this PEFT adapter directory instead of the config's train stage.
        #[arg(long)]
        lora_model_dir: Option<PathBuf>,
        /// Serve this GGUF file (e.g. one `kiln export` wrote), its weights kept quantized.
        #[arg(long, conflicts_with = "lora_model_dir")]
        gguf: Option<PathBuf>,
        /// Default answer length (default: `gradio_max_new_tokens`, else 256).
        #[arg(long)]
        max_new_tokens: Option<usize>,
        /// Default temperature (default: `gradio_temperature`, else 0 = greedy).
        #[arg(long)]
        temperature: Option<f64>,
        /// Requests that may wait for the model (more get 503).
        #[arg(long, default_value_t = 16)]
        queue: usize,
        /// Largest request body in bytes (more get 413).
        #[arg(long, default_value_t = 1_000_000)]
        max_body_bytes: usize,
    },
    /// A params × metrics table of a sweep's variants (final train loss, best eval loss,
    /// perplexity, tokens/s, train time), sorted by a metric.
    Compare {
        #[command(flatten)]
        common: Common,
        /// final_loss, best_eval_loss (default), eval_perplexity, tokens_per_s, train_seconds.
        #[arg(long, default_value = "best_eval_loss")]
        sort: String,
        #[arg(long)]
        json: bool,
        #[arg(long, conflicts_with = "json")]
        csv: bool,
    },
    /// Rebuild locked stages in a scratch cache and compare their outputs with kiln.lock:
    /// "train: reproduced bit-for-bit" or which files differ.
    Verify {
        #[command(flatten)]
        common: Common,
        /// Stage names or kinds to rebuild (repeatable; default: every locked stage but fetch).
        #[arg(long)]
        stages: Vec<String>,
    },
    /// Train (solid) and eval (dashed) loss curves of every built variant on one SVG chart.
    Plot {
        #[command(flatten)]
        common: Common,
        /// Output file: .svg or .png (the extension picks the format).
        #[arg(short = 'o', long, default_value = "curves.svg")]
        output: PathBuf,
    },
    /// Why a stage is stale or fresh, traced back to the input that changed.
    Why {
        /// The stage (`train`, `tokenize[0]`, `train@1a2b3c4d`).
        stage: String,
        #[command(flatten)]
        common: Common,
    },
    /// What produced an artifact: stages, parameters, input files and kiln version, from a
    /// path kiln wrote (output_dir, merged/, export/...), any file in the cache, or a key.
    Lineage {
        /// A path or a cache key (at least 6 hex digits).
        target: String,
        /// The reverse: every stage and config that used this entry.
        #[arg(long)]
        used_by: bool,
        #[arg(long)]
        json: bool,
        /// Cache directory (default: $KILN_CACHE or ./cache).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Past runs recorded in the cache index: config, stages built vs reused, duration, outcome.
    Runs {
        /// How many of the newest runs to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Cache directory (default: $KILN_CACHE or ./cache).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Inspect and maintain the cache.
    Cache {
        #[command(subcommand)]
        cmd: CacheCmd,
        /// Cache directory (default: $KILN_CACHE or ./cache).
        #[arg(long, global = true)]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CacheCmd {
    /// List entries: key, stage, kind, size, age.
    Ls,
    /// Disk usage by stage kind.
    Du,
    /// Remove entries no given config references (and/or older than a date).
    Gc {
        /// Keep every entry these configs' current plans reference (repeatable).
        #[arg(long)]
        keep: Vec<PathBuf>,
        /// Remove entries created before this date (YYYY-MM-DD) or age (`30d`).
        #[arg(long)]
        older_than: Option<String>,
        /// Show what would be removed without removing it.
        #[arg(long)]
        dry_run: bool,
    },
    /// Re-hash every entry against its manifest; report corruption (and quarantine with --fix).
    Verify {
        #[arg(long)]
        fix: bool,
    },
}

#[derive(clap::Args, Clone)]
struct GenArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// 0 = no top-k limit.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

impl GenArgs {
    fn settings(&self) -> kiln::infer::GenSettings {
        kiln::infer::GenSettings {
            sampling: kiln::model::generate::SamplingOptions {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                seed: self.seed,
            },
            max_new_tokens: self.max_new_tokens,
        }
    }
}

fn init_threads(ws: Option<&Workspace>) {
    let n = std::env::var("KILN_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .or_else(|| ws.and_then(|w| w.settings.num_threads).map(|n| n as usize));
    if let Some(n) = n {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global();
    }
}

fn open(c: &Common) -> Result<Workspace> {
    let mut sets = c.set.clone();
    if let Some(id) = &c.variant {
        // The variant as a plain config: its values set, its output_dir, no sweep. Its stages
        // have the same keys as in the sweep, so everything built there is reused.
        let all = kiln::config::load_variants(&c.config, &c.set)?;
        let hits: Vec<_> = all
            .iter()
            .filter_map(|(v, l)| v.as_ref().map(|v| (v, l)))
            .filter(|(v, _)| v.id.starts_with(id.as_str()))
            .collect();
        let [(v, l)] = hits[..] else {
            let ids: Vec<String> = all
                .iter()
                .filter_map(|(v, _)| v.as_ref().map(|v| format!("{} ({})", v.id, v.label)))
                .collect();
            anyhow::bail!(
                "--variant {id}: {} variants match; the sweep has: {}",
                hits.len(),
                if ids.is_empty() {
                    "no variants (not a sweep)".to_string()
                } else {
                    ids.join(", ")
                }
            );
        };
        for (k, val) in &v.sets {
            sets.push(format!("{k}={}", serde_json::to_string(val)?));
        }
        sets.push(format!("output_dir={}", l.settings.output_dir.display()));
        sets.push("sweep=null".into());
    }
    let mut ws = Workspace::open(&c.config, &sets)?;
    if let Some(id) = &c.variant {
        ws.variant = ws
            .output_dir()
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .or(Some(id.clone()));
    }
    for w in &ws.warnings {
        eprintln!("warning: {}", w.to_string().replace('\n', "\n  "));
    }
    init_threads(Some(&ws));
    Ok(ws)
}

/// For commands that act on one configuration (train, inference, merge-lora, evaluate, export,
/// serve, preprocess): a sweep must be narrowed first.
fn open_single(c: &Common) -> Result<Workspace> {
    let ws = open(c)?;
    if ws.is_sweep() {
        let ids: Vec<String> = ws
            .variants
            .iter()
            .map(|v| format!("{} ({})", v.id.as_deref().unwrap_or("-"), v.label))
            .collect();
        anyhow::bail!(
            "{} is a sweep of {} variants: {}; this command works on one — pick it with --variant ID",
            c.config.display(),
            ws.variants.len(),
            ids.join(", ")
        );
    }
    Ok(ws)
}

fn short(k: &Option<String>) -> String {
    k.as_deref()
        .map(|k| k[..12.min(k.len())].to_string())
        .unwrap_or_else(|| "-".repeat(12))
}

fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn print_event(e: &Event, tty: bool) {
    match e {
        Event::StageFresh { name, key } => println!("  fresh  {name:<22} {}", &key[..12]),
        Event::StageStarted { name, key, reason } => {
            println!("  build  {name:<22} {}  ({reason})", &key[..12])
        }
        Event::Progress {
            name,
            done,
            total,
            unit,
        } => {
            if tty && done < total {
                eprintln!("         {name}: {done}/{total} {unit}");
            }
        }
        Event::StageFinished {
            name,
            duration_ms,
            bytes,
            ..
        } => {
            println!(
                "  built  {name:<22} {:.2}s  {}",
                *duration_ms as f64 / 1000.0,
                human_bytes(*bytes)
            )
        }
        Event::EarlyCutoff { name } => {
            println!("         {name}: output unchanged, downstream stays fresh")
        }
        Event::StageFailed { name, .. } => eprintln!("  FAIL   {name}"),
        Event::Corrupt { name, key, damage } => {
            eprintln!(
                "  corrupt cache entry for {name} ({}): {}; quarantined, rebuilding",
                &key[..12],
                damage.join(", ")
            )
        }
        Event::Warning { message } => eprintln!("warning: {message}"),
        // A train log's own figures are printed by its TrainLog line.
        Event::Metric { name, .. } if TRAIN_LOG_METRICS.contains(&name.as_str()) => {}
        Event::Metric {
            stage,
            step,
            name,
            value,
        } => {
            println!("         {stage} step {step:>5}  {name:<12} {value:.6}")
        }
        Event::TrainLog(l) => println!(
            "         {} step {}/{}  {}",
            l.stage,
            l.step,
            l.total,
            train_figures(l)
        ),
    }
}

/// The metrics a train stage sends with each [`Event::TrainLog`].
const TRAIN_LOG_METRICS: &[&str] = &["loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s"];

fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// A train log's figures on one line.
fn train_figures(l: &kiln::events::TrainLog) -> String {
    let mem = l
        .peak_rss_bytes
        .map(|b| format!("  peak {}", human_bytes(b)))
        .unwrap_or_default();
    format!(
        "loss {:.4}  lr {:.2e}  grad_norm {:.3}  {:.1} tokens/s  {:.2} samples/s  elapsed {}  eta {}{mem}",
        l.loss,
        l.lr,
        l.grad_norm,
        l.tokens_per_s,
        l.samples_per_s,
        clock(l.elapsed_s),
        clock(l.eta_s)
    )
}

/// Prints run events. In a terminal a train stage's logs drive a progress bar on stderr (other
/// lines print above it); otherwise each log is a plain line.
struct Printer {
    tty: bool,
    /// The bar, for which stage, and its last log (printed as a line when the bar goes).
    bar: Option<(String, indicatif::ProgressBar, kiln::events::TrainLog)>,
}

impl Printer {
    fn new(tty: bool) -> Self {
        Self { tty, bar: None }
    }

    fn event(&mut self, e: &Event) {
        match e {
            Event::TrainLog(l) if self.tty => {
                if self.bar.as_ref().is_none_or(|(s, _, _)| *s != l.stage) {
                    self.clear();
                    let bar = indicatif::ProgressBar::new(l.total);
                    let style = indicatif::ProgressStyle::with_template(
                        "  {prefix} [{bar:20}] {pos}/{len} {wide_msg}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> ");
                    bar.set_style(style);
                    bar.set_prefix(l.stage.clone());
                    self.bar = Some((l.stage.clone(), bar, l.clone()));
                }
                if let Some((_, bar, last)) = &mut self.bar {
                    bar.set_position(l.step);
                    let mem = l
                        .peak_rss_bytes
                        .map(|b| format!(" {}", human_bytes(b)))
                        .unwrap_or_default();
                    bar.set_message(format!(
                        "loss {:.4} lr {:.1e} gn {:.2} {:.0} tok/s {}<{}{mem}",
                        l.loss,
                        l.lr,
                        l.grad_norm,
                        l.tokens_per_s,
                        clock(l.elapsed_s),
                        clock(l.eta_s)
                    ));
                    *last = l.clone();
                }
            }
            Event::StageFinished { .. } | Event::StageFailed { .. } => {
                self.clear();
                print_event(e, self.tty);
            }
            _ => match &self.bar {
                Some((_, bar, _)) => bar.suspend(|| print_event(e, self.tty)),
                None => print_event(e, self.tty),
            },
        }
    }

    fn clear(&mut self) {
        if let Some((_, bar, last)) = self.bar.take() {
            bar.finish_and_clear();
            print_event(&Event::TrainLog(last), false);
        }
    }
}

fn do_run(ws: &Workspace, opts: &RunOptions) -> Result<kiln::scheduler::RunSummary, KilnError> {
    let tty = std::io::stderr().is_terminal();
    let t = Instant::now();
    let run_id = ws.index.start_run(&ws.config_id, &ws.run_label())?;
    let mut printer = Printer::new(tty);
    let res = ws.scheduler().run(opts, &mut |e| printer.event(&e));
    printer.clear();
    match &res {
        Ok(s) => {
            let outcome = if s.failed.is_empty() { "ok" } else { "failed" };
            ws.index
                .finish_run(run_id, outcome, s.built.len() as u64, s.fresh.len() as u64)?;
            if let Some(p) = kiln::lock::write(ws)? {
                println!("updated {}", p.display());
            }
            if s.built.is_empty() && s.failed.is_empty() {
                println!(
                    "nothing to do: all {} stages fresh ({:.0} ms)",
                    s.fresh.len(),
                    t.elapsed().as_secs_f64() * 1000.0
                );
            } else {
                println!(
                    "built {}, reused {} in {:.2}s",
                    s.built.len(),
                    s.fresh.len(),
                    t.elapsed().as_secs_f64()
                );
            }
        }
        Err(_) => ws.index.finish_run(run_id, "failed", 0, 0)?,
    }
    Ok(res?)
}

/// Builds one stage (name or kind) and what it needs, reporting like `kiln run`.
fn run_target(ws: &Workspace, target: &str) -> Result<kiln::scheduler::RunSummary, KilnError> {
    do_run(
        ws,
        &RunOptions {
            targets: vec![target.into()],
            ..Default::default()
        },
    )
}

fn print_stats(ws: &Workspace) -> Result<(), KilnError> {
    let st = ws.pack_stats()?;
    println!();
    for (label, d) in &st.datasets {
        println!("{label}: {} records → {} samples", d.records, d.samples);
        let dropped = d.dropped_too_long + d.dropped_too_short + d.dropped_untrained;
        if dropped + d.truncated > 0 {
            println!(
                "  dropped {dropped} ({} longer than sequence_len, {} shorter than min_sample_len, {} with no trained tokens); truncated {}",
                d.dropped_too_long, d.dropped_too_short, d.dropped_untrained, d.truncated
            );
        }
        println!(
            "  tokens {} · trained {} ({:.1}%) · length min {} / mean {:.1} / p50 {} / p95 {} / max {}",
            d.tokens,
            d.trained_tokens,
            100.0 * d.trained_tokens as f64 / d.tokens.max(1) as f64,
            d.length.min,
            d.length.mean,
            d.length.p50,
            d.length.p95,
            d.length.max
        );
    }
    let s = &ws.settings;
    for (name, h) in [("train", &st.train), ("val", &st.val)] {
        println!(
            "{name}: {} samples, {} tokens ({} trained), {} {} of {} tokens, efficiency {:.1}%",
            h.samples,
            h.tokens,
            h.trained_tokens,
            h.bins,
            if h.packed { "packed bins" } else { "rows" },
            if h.packed { h.sequence_len } else { 0 },
            100.0 * h.efficiency
        );
    }
    let mbs = s.train.micro_batch_size;
    let batches = st.train.bins.div_ceil(mbs);
    println!(
        "batches per epoch: {batches} (micro_batch_size {mbs}); optimizer steps per epoch: {} (gradient_accumulation_steps {})",
        batches.div_ceil(s.train.gradient_accumulation_steps),
        s.train.gradient_accumulation_steps
    );
    Ok(())
}

fn print_debug(ws: &Workspace, n: usize, json: bool) -> Result<(), KilnError> {
    let tty = std::io::stdout().is_terminal();
    for ex in ws.debug_examples(n)? {
        if json {
            println!("{}", serde_json::to_string(&ex).unwrap_or_default());
            continue;
        }
        println!(
            "── {} record {} ({} tokens)",
            ex.dataset,
            ex.index,
            ex.input_ids.len()
        );
        let mut line = String::new();
        for ((piece, id), label) in ex.pieces.iter().zip(&ex.input_ids).zip(&ex.labels) {
            let p = piece.replace('\n', "\\n");
            if *label == -100 {
                if tty {
                    line.push_str(&format!("\x1b[2m{p}({id}, -100)\x1b[0m "));
                } else {
                    line.push_str(&format!("{p}({id}, -100) "));
                }
            } else if tty {
                line.push_str(&format!("\x1b[32m{p}({id}, {label})\x1b[0m "));
            } else {
                line.push_str(&format!("{p}({id}, {label}) "));
            }
        }
        println!("{}\n", line.trim_end());
    }
    Ok(())
}

fn parse_cutoff(s: &str) -> Result<i64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    if let Some(d) = s.strip_suffix('d') {
        let days: i64 = d
            .parse()
            .context("--older-than: expected e.g. 30d or 2026-01-31")?;
        return Ok(now - days * 86400);
    }
    let parts: Vec<i64> = s
        .split('-')
        .map(|p| p.parse::<i64>())
        .collect::<Result<_, _>>()
        .context("--older-than: expected YYYY-MM-DD or 30d")?;
    let [y, m, d] = parts[..] else {
        anyhow::bail!("--older-than: expected YYYY-MM-DD or 30d")
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Ok((era * 146097 + doe - 719468) * 86400)
}

fn cache_cmd(cmd: CacheCmd, dir: Option<PathBuf>) -> Result<ExitCode> {
    let root = dir.unwrap_or_else(|| cache_root(None));
    let cache = Cache::open(&root)?;
    let index = cache.index()?;
    let keys = cache.keys()?;
    match cmd {
        CacheCmd::Ls => {
            println!(
                "{:<14} {:<22} {:<9} {:>10}  created",
                "key", "stage", "kind", "size"
            );
            for k in &keys {
                let m = cache.manifest(k)?;
                let rec = index.stage(k)?;
                let (name, kind) = m
                    .as_ref()
                    .map(|m| (m.name.clone(), m.kind.clone()))
                    .unwrap_or_default();
                let created = rec.map(|r| r.1).unwrap_or(0);
                println!(
                    "{:<14} {:<22} {:<9} {:>10}  {}",
                    &k[..12.min(k.len())],
                    name,
                    kind,
                    human_bytes(dir_size(&cache.entry_dir(k))),
                    created
                );
            }
            println!("{} entries in {}", keys.len(), root.display());
        }
        CacheCmd::Du => {
            let mut by_kind: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
            for k in &keys {
                let kind = cache
                    .manifest(k)?
                    .map(|m| m.kind)
                    .unwrap_or_else(|| "?".into());
                let e = by_kind.entry(kind).or_default();
                e.0 += 1;
                e.1 += dir_size(&cache.entry_dir(k));
            }
            let mut total = 0;
            for (kind, (n, b)) in &by_kind {
                println!("{kind:<10} {n:>5} entries {:>12}", human_bytes(*b));
                total += b;
            }
            println!(
                "{:<10} {:>5} entries {:>12}",
                "total",
                keys.len(),
                human_bytes(total)
            );
        }
        CacheCmd::Gc {
            keep,
            older_than,
            dry_run,
        } => {
            if keep.is_empty() && older_than.is_none() {
                anyhow::bail!("cache gc: say what to keep (--keep CONFIG, repeatable) and/or --older-than DATE");
            }
            let mut live = std::collections::HashSet::new();
            for c in &keep {
                let ws =
                    Workspace::open(c, &[]).with_context(|| format!("--keep {}", c.display()))?;
                for s in ws.scheduler().assess()? {
                    if let Some(k) = s.key {
                        live.insert(k);
                    }
                }
            }
            let cutoff = older_than.as_deref().map(parse_cutoff).transpose()?;
            let mut removed = 0u64;
            let mut freed = 0u64;
            for k in &keys {
                let referenced = !keep.is_empty() && live.contains(k);
                let created = index.stage(k)?.map(|r| r.1).unwrap_or(0);
                let old_enough = cutoff.map(|c| created < c).unwrap_or(true);
                let unreferenced = keep.is_empty() || !referenced;
                if unreferenced && old_enough {
                    let size = dir_size(&cache.entry_dir(k));
                    let name = cache.manifest(k)?.map(|m| m.name).unwrap_or_default();
                    println!(
                        "{} {:<14} {name:<22} {}",
                        if dry_run { "would remove" } else { "removed" },
                        &k[..12.min(k.len())],
                        human_bytes(size)
                    );
                    if !dry_run {
                        cache.remove(k)?;
                        index.forget_stage(k)?;
                    }
                    removed += 1;
                    freed += size;
                }
            }
            let tmp = if dry_run { 0 } else { cache.clean_tmp()? };
            println!(
                "{} {removed} entries, {} ({} stale build directories cleaned)",
                if dry_run { "would remove" } else { "removed" },
                human_bytes(freed),
                tmp
            );
        }
        CacheCmd::Verify { fix } => {
            let mut bad = 0;
            for k in &keys {
                let damage = cache.verify(k);
                if !damage.is_empty() {
                    bad += 1;
                    let name = cache
                        .manifest(k)
                        .ok()
                        .flatten()
                        .map(|m| m.name)
                        .unwrap_or_default();
                    println!(
                        "CORRUPT {} {name}: {}",
                        &k[..12.min(k.len())],
                        damage
                            .iter()
                            .map(|d| d.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    if fix {
                        cache.quarantine(k)?;
                        index.forget_stage(k)?;
                        println!("        quarantined; the next run rebuilds it");
                    }
                }
            }
            println!(
                "verified {} entries: {} ok, {bad} corrupt",
                keys.len(),
                keys.len() - bad
            );
            if bad > 0 && !fix {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn chat_loop(chat: &mut kiln::infer::ChatSession, prompt: Option<String>) -> Result<()> {
    use std::io::{BufRead, Write};
    let mut print = |piece: &str| {
        print!("{piece}");
        let _ = std::io::stdout().flush();
        true
    };
    if let Some(p) = prompt {
        let r = chat.say(&p, &mut print)?;
        println!();
        eprintln!(
            "[{} prompt tokens in {:.2}s; {} tokens at {:.1} tokens/s; {}]",
            r.stats.prompt_tokens,
            r.stats.prompt_seconds,
            r.stats.generated_tokens,
            r.stats.generated_tokens as f64 / r.stats.decode_seconds.max(1e-9),
            r.stats.finish_reason
        );
        return Ok(());
    }
    let tty = std::io::stdin().is_terminal();
    if tty {
        eprintln!("type a message; /reset clears the conversation, /exit quits");
    }
    let stdin = std::io::stdin();
    loop {
        if tty {
            eprint!("> ");
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                chat.reset();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        let r = chat.say(line, &mut print)?;
        println!();
        if r.stats.finish_reason == "length" {
            eprintln!(
                "(stopped at --max-new-tokens {})",
                chat.settings.max_new_tokens
            );
        }
    }
    Ok(())
}

fn print_lineage(
    n: &kiln::lineage::Node,
    depth: usize,
    seen: &mut std::collections::HashSet<String>,
) {
    let pad = "  ".repeat(depth);
    let mut extra = Vec::new();
    if n.version > 0 {
        extra.push(format!("v{}", n.version));
    }
    if let Some(s) = n.size {
        extra.push(human_bytes(s as u64));
    }
    if !n.present {
        extra.push("removed from the cache".into());
    }
    println!(
        "{pad}{} {}  {} ({})",
        n.name,
        &n.key[..12.min(n.key.len())],
        n.kind,
        extra.join(", ")
    );
    if !seen.insert(n.key.clone()) {
        println!("{pad}  (see above)");
        return;
    }
    if let serde_json::Value::Object(p) = &n.params {
        let shown: Vec<String> = p
            .iter()
            .filter(|(k, v)| !v.is_null() && *k != "files" && *k != "chat_template")
            .map(|(k, v)| {
                let s = v.to_string();
                let s = if s.len() > 40 {
                    format!("{}…", &s[..40])
                } else {
                    s
                };
                format!("{k}={s}")
            })
            .collect();
        if !shown.is_empty() {
            println!("{pad}  params: {}", shown.join(" "));
        }
    }
    if let serde_json::Value::Object(inputs) = &n.inputs {
        for (id, i) in inputs {
            let label = i.get("label").and_then(|l| l.as_str()).unwrap_or("");
            let digest = i.get("digest").and_then(|d| d.as_str()).unwrap_or("");
            println!(
                "{pad}  input {id}: {label} blake3 {}",
                &digest[..16.min(digest.len())]
            );
        }
    }
    for u in &n.upstream {
        print_lineage(u, depth + 1, seen);
    }
}

fn merge_lora(
    common: &mut Common,
    lora_model_dir: Option<PathBuf>,
    output_dir: Option<PathBuf>,
) -> Result<()> {
    common.set.push("merge_lora=true".into());
    let ws = open_single(common)?;
    let lora_model_dir = lora_model_dir.or_else(|| ws.settings.lora_model_dir.clone());
    if ws.settings.train.adapter.is_none() && lora_model_dir.is_none() {
        anyhow::bail!(
            "{}: nothing to merge: full fine-tuning writes complete weights (model.safetensors in output_dir); set `adapter: lora` or pass --lora-model-dir",
            common.config.display()
        );
    }
    let dest = output_dir.unwrap_or_else(|| ws.output_dir().join("merged"));
    match lora_model_dir {
        Some(adapter) => {
            run_target(&ws, "fetch.model")?;
            let model_dir = ws.entry_of("fetch.model")?;
            // Build beside the destination and rename: never a half-written model that looks whole.
            let parent = dest.parent().unwrap_or(std::path::Path::new("."));
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
            let tmp = parent.join(format!(
                ".{}.kiln-partial",
                dest.file_name().unwrap_or_default().to_string_lossy()
            ));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp)?;
            let t = Instant::now();
            kiln::stages::merge::merge_dirs(
                &model_dir,
                &adapter,
                &tmp,
                ws.settings.max_shard_size,
                kiln::plan::configured_template(&ws.settings.chat_template).as_deref(),
            )
            .map_err(KilnError::from)
            .with_context(|| format!("merging {}", adapter.display()))?;
            if dest.exists() {
                std::fs::remove_dir_all(&dest)
                    .with_context(|| format!("replacing {}", dest.display()))?;
            }
            std::fs::rename(&tmp, &dest)?;
            println!(
                "merged {} into the base model in {:.2}s",
                adapter.display(),
                t.elapsed().as_secs_f64()
            );
        }
        None => {
            run_target(&ws, "merge")?;
            ws.materialize_outputs()?;
            kiln::workspace::copy_entry(&ws.entry_of("merge")?, &dest)?;
        }
    }
    println!("merged model in {}", dest.display());
    Ok(())
}

fn real_main() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Validate(c) => {
            let loaded = kiln::config::load(&c.config, &c.set)?;
            for w in &loaded.warnings {
                eprintln!("warning: {}", w.to_string().replace('\n', "\n  "));
            }
            println!(
                "{}: ok ({} datasets, {} warnings)",
                c.config.display(),
                loaded.settings.datasets.len(),
                loaded.warnings.len()
            );
        }
        Cmd::Plan { common, json } => {
            let ws = open(&common)?;
            let st = ws.scheduler().assess()?;
            if json {
                let mut out = serde_json::json!({ "stages": st });
                if ws.is_sweep() {
                    out["variants"] = ws
                        .variants
                        .iter()
                        .map(|v| {
                            serde_json::json!({
                                "id": v.id, "label": v.label,
                                "stages": v.names.iter().map(|(_, m)| m.clone()).collect::<Vec<_>>(),
                            })
                        })
                        .collect();
                }
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                if ws.is_sweep() {
                    println!("sweep: {} variants", ws.variants.len());
                    for v in &ws.variants {
                        println!("  {}  {}", v.id.as_deref().unwrap_or("-"), v.label);
                    }
                    let shared = ws
                        .plan
                        .stages
                        .iter()
                        .filter(|s| !s.name.contains('@'))
                        .count();
                    println!(
                        "{shared} stages shared by every variant, {} specific to one (name@variant)",
                        ws.plan.stages.len() - shared
                    );
                    println!();
                }
                for s in &st {
                    let state = match s.state {
                        State::Fresh => "fresh",
                        State::Stale => "stale",
                    };
                    match &s.reason {
                        Some(r) => println!("  {state}  {:<22} {}  {r}", s.name, short(&s.key)),
                        None => println!("  {state}  {:<22} {}", s.name, short(&s.key)),
                    }
                }
                let stale = st.iter().filter(|s| s.state == State::Stale).count();
                println!(
                    "{} stages: {} fresh, {stale} stale",
                    st.len(),
                    st.len() - stale
                );
            }
        }
        Cmd::Dag { common, .. } => {
            let ws = open(&common)?;
            let st = ws.scheduler().assess()?;
            let labels: Vec<String> = ws
                .plan
                .stages
                .iter()
                .map(|p| {
                    st.iter()
                        .find(|s| s.name == p.name)
                        .map(|s| {
                            format!(
                                "{} {}",
                                short(&s.key),
                                if s.state == State::Fresh {
                                    "fresh"
                                } else {
                                    "stale"
                                }
                            )
                        })
                        .unwrap_or_default()
                })
                .collect();
            print!("{}", ws.plan.dot(&labels));
        }
        Cmd::Run {
            common,
            target,
            force,
            locked,
            frozen,
            keep_going,
            jobs,
            train_jobs,
        } => {
            if frozen {
                std::env::set_var("HF_HUB_OFFLINE", "1");
            }
            let ws = open(&common)?;
            if locked || frozen {
                let problems = kiln::lock::check(&ws)?;
                let (path, _) = kiln::lock::location(&common.config);
                if problems.is_empty() {
                    println!(
                        "locked: all {} stages fresh and as in {}",
                        ws.plan.stages.len(),
                        path.display()
                    );
                    return Ok(ExitCode::SUCCESS);
                }
                for p in &problems {
                    eprintln!("  {:<22} {}", p.stage, p.reason);
                }
                anyhow::bail!(
                    "--locked: {} of {} stages would rebuild or differ from {}",
                    problems.len(),
                    ws.plan.stages.len(),
                    path.display()
                );
            }
            let summary = do_run(
                &ws,
                &RunOptions {
                    targets: target,
                    force,
                    keep_going,
                    jobs,
                    train_jobs,
                },
            )?;
            if let Some(out) = ws.materialize_outputs()? {
                println!("outputs in {}", out.display());
            }
            if !summary.failed.is_empty() {
                for (name, err) in &summary.failed {
                    eprintln!("  FAILED {name}: {err}");
                }
                if !summary.skipped.is_empty() {
                    eprintln!("  not attempted: {}", summary.skipped.join(", "));
                }
                anyhow::bail!(
                    "{} stages failed ({} built, {} reused); rerun to retry only what did not finish",
                    summary.failed.len(),
                    summary.built.len(),
                    summary.fresh.len()
                );
            }
        }
        Cmd::Preprocess {
            common,
            debug,
            debug_num_examples,
            json,
        } => {
            let ws = open_single(&common)?;
            let quiet_json = debug && json;
            if quiet_json {
                ws.scheduler().run(
                    &RunOptions {
                        targets: vec!["pack".into()],
                        force: vec![],
                        ..Default::default()
                    },
                    &mut |_| {},
                )?;
            } else {
                run_target(&ws, "pack")?;
                print_stats(&ws)?;
            }
            if debug {
                if !quiet_json {
                    println!();
                }
                print_debug(&ws, debug_num_examples, json)?;
            }
        }
        Cmd::Cache { cmd, dir } => return cache_cmd(cmd, dir),
        Cmd::Runs { limit, dir, json } => {
            let cache = Cache::open(&dir.unwrap_or_else(|| cache_root(None)))?;
            let runs = cache.index()?.runs(limit)?;
            if !json {
                println!(
                    "{:>5}  {:<8} {:>5} {:>6} {:>9}  config",
                    "run", "outcome", "built", "reused", "seconds"
                );
            }
            for r in runs {
                let secs = r.finished.map(|f| f - r.started);
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"id": r.id, "config": r.config, "variant": r.variant, "started": r.started, "seconds": secs, "outcome": r.outcome, "built": r.built, "reused": r.reused})
                    );
                } else {
                    let secs = secs.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
                    let variant = if r.variant.is_empty() {
                        String::new()
                    } else {
                        format!("  [{}]", r.variant)
                    };
                    println!(
                        "{:>5}  {:<8} {:>5} {:>6} {:>9}  {}{variant}",
                        r.id, r.outcome, r.built, r.reused, secs, r.config
                    );
                }
            }
        }
        Cmd::Train {
            mut common,
            debug,
            resume_from_checkpoint,
        } => {
            if let Some(dir) = resume_from_checkpoint {
                let dir = std::path::absolute(&dir)
                    .with_context(|| format!("--resume-from-checkpoint {}", dir.display()))?;
                common
                    .set
                    .push(format!("resume_from_checkpoint={}", dir.display()));
            }
            let ws = open_single(&common)?;
            if ws.plan.index_of("train").is_none() {
                anyhow::bail!(
                    "{}: nothing to train: the config's adapter is not trainable here (use `adapter: lora`, or no adapter for full fine-tuning)",
                    common.config.display()
                );
            }
            if debug {
                run_target(&ws, "pack")?;
                let d = ws.debug_train_step()?;
                println!(
                    "debug step: loss {:.4}, grad norm {:.4}, {:.2} s for {} tokens ({:.1} tokens/s), {} trainable parameters, peak RSS {}",
                    d.loss,
                    d.grad_norm,
                    d.seconds,
                    d.tokens,
                    d.tokens as f64 / d.seconds.max(1e-9),
                    d.trainable_params,
                    d.peak_rss_bytes.map(human_bytes).unwrap_or_else(|| "unknown".into())
                );
                println!();
                print_debug(&ws, 1, false)?;
                return Ok(ExitCode::SUCCESS);
            }
            run_target(&ws, "train")?;
            if let Some(out) = ws.materialize_outputs()? {
                println!("outputs in {}", out.display());
            }
        }
        Cmd::Inference {
            mut common,
            gen,
            prompt,
            lora_model_dir,
            base_model,
            gguf,
            raw,
            system,
        } => {
            if let Some(b) = base_model {
                common.set.push(format!("base_model={b}"));
            }
            let ws = open_single(&common)?;
            let lora_model_dir = lora_model_dir.or_else(|| ws.settings.lora_model_dir.clone());
            let (model, tok, what) = match &gguf {
                Some(p) => kiln::workspace::Workspace::load_gguf_chat_model(p)?,
                None => ws.load_chat_model(lora_model_dir.as_deref())?,
            };
            eprintln!("loaded {what}");
            let template = kiln::plan::configured_template(&ws.settings.chat_template);
            let mut chat = kiln::infer::ChatSession::new(model, tok, template, raw, gen.settings())
                .map_err(anyhow::Error::from)?;
            chat.system = system.or_else(|| ws.settings.default_system_message.clone());
            chat_loop(&mut chat, prompt)?;
        }
        Cmd::Evaluate { mut common } => {
            let mut ws = open_single(&common)?;
            if ws.settings.evaluate.is_none() {
                common.set.push("evaluate=true".into());
                ws = open_single(&common)?;
            }
            run_target(&ws, "evaluate")?;
            let dir = ws.entry_of("evaluate")?;
            let r: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join("eval_results.json"))?)?;
            match (r["eval_loss"].as_f64(), r["eval_perplexity"].as_f64()) {
                (Some(l), Some(p)) => println!(
                    "eval loss {l:.4}, perplexity {p:.3} on {} val samples ({} trained tokens)",
                    r["samples"], r["trained_tokens"]
                ),
                _ => println!("no validation split: no loss computed"),
            }
            if let Some(out) = ws.materialize_outputs()? {
                let eval = out.join("eval");
                if let Some(n) = r["generations"].as_u64() {
                    println!(
                        "{n} answers in {}",
                        eval.join("generations.jsonl").display()
                    );
                }
                println!("results in {}", eval.join("eval_results.json").display());
            }
        }
        Cmd::Export {
            mut common,
            format,
            quant,
        } => {
            let f = kiln::stages::export::ExportFormat::parse(&format, quant.as_deref())
                .map_err(|e| anyhow::anyhow!("kiln export: {e}"))?;
            let q = quant.map(|q| format!(", quant: {q}")).unwrap_or_default();
            common.set.push(format!("export=[{{format: {format}{q}}}]"));
            let ws = open_single(&common)?;
            let name = format!("export.{}", f.label());
            run_target(&ws, &name)?;
            let dir = ws.entry_of(&name)?;
            let r: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join("export.json"))?)?;
            let out = ws
                .materialize_outputs()?
                .map(|o| o.join("export").join(f.label()));
            let size = r["bytes"].as_u64().map(human_bytes).unwrap_or_default();
            println!("{}: {size}", f.label());
            if let (Some(a), Some(b)) = (
                r["val_perplexity_f32"].as_f64(),
                r["val_perplexity"].as_f64(),
            ) {
                println!(
                    "val perplexity: {b:.4} exported vs {a:.4} unquantized ({:+.2}%)",
                    100.0 * (b - a) / a
                );
            }
            if let Some(o) = out {
                match r["file"].as_str() {
                    Some(file) => println!("wrote {}", o.join(file).display()),
                    None => println!("wrote {}", o.display()),
                }
            }
        }
        Cmd::Serve {
            common,
            host,
            port,
            lora_model_dir,
            gguf,
            max_new_tokens,
            temperature,
            queue,
            max_body_bytes,
        } => {
            let ws = open_single(&common)?;
            let lora_model_dir = lora_model_dir.or_else(|| ws.settings.lora_model_dir.clone());
            let (model, tok, what) = match &gguf {
                Some(p) => kiln::workspace::Workspace::load_gguf_chat_model(p)?,
                None => ws.load_chat_model(lora_model_dir.as_deref())?,
            };
            let sv = &ws.settings.serve;
            let defaults = kiln::serve::default_settings(
                max_new_tokens.unwrap_or(sv.max_new_tokens as usize),
                temperature.unwrap_or(sv.temperature),
            );
            let template = kiln::plan::configured_template(&ws.settings.chat_template);
            let mut chat =
                kiln::infer::ChatSession::new(model, tok, template, false, defaults.clone())
                    .map_err(anyhow::Error::from)?;
            chat.system = ws.settings.default_system_message.clone();
            let model_name = ws
                .output_dir()
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_else(|| "kiln".into());
            let opts = kiln::serve::ServeOptions {
                host: host.unwrap_or_else(|| sv.host.clone()),
                port: port.unwrap_or(sv.port),
                max_body_bytes,
                queue: queue.max(1),
                model_name,
                title: sv.title.clone(),
                defaults,
            };
            kiln::serve::serve(chat, opts, |addr| {
                eprintln!("loaded {what}");
                println!("serving on http://{addr}/  (OpenAI API at http://{addr}/v1)");
                use std::io::Write;
                let _ = std::io::stdout().flush();
            })?;
        }
        Cmd::Compare {
            common,
            sort,
            json,
            csv,
        } => {
            if !kiln::compare::METRICS.contains(&sort.as_str()) {
                anyhow::bail!(
                    "--sort: unknown metric `{sort}`; use one of {}",
                    kiln::compare::METRICS.join(", ")
                );
            }
            let ws = open(&common)?;
            let rows = kiln::compare::rows(&ws, &sort)?;
            let keys: Vec<String> = ws
                .variants
                .first()
                .map(|v| v.values.iter().map(|(k, _)| k.clone()).collect())
                .unwrap_or_default();
            let fmt = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_default();
            if json {
                for r in &rows {
                    let mut o = serde_json::json!({"variant": r.variant, "built": r.built});
                    for (k, v) in &r.values {
                        o[k] = serde_json::Value::String(v.clone());
                    }
                    for (k, v) in &r.metrics {
                        o[k] = serde_json::json!(v);
                    }
                    println!("{o}");
                }
            } else if csv {
                let mut head = vec!["variant".to_string()];
                head.extend(keys.iter().cloned());
                head.extend(kiln::compare::METRICS.iter().map(|s| s.to_string()));
                println!("{}", head.join(","));
                for r in &rows {
                    let mut cells = vec![r.variant.clone()];
                    cells.extend(r.values.iter().map(|(_, v)| v.clone()));
                    cells.extend(r.metrics.iter().map(|(_, v)| fmt(*v)));
                    println!("{}", cells.join(","));
                }
            } else {
                let mut head = vec!["variant".to_string()];
                head.extend(keys.iter().cloned());
                head.extend(kiln::compare::METRICS.iter().map(|s| s.to_string()));
                let mut table = vec![head];
                for r in &rows {
                    let mut cells = vec![r.variant.clone()];
                    cells.extend(r.values.iter().map(|(_, v)| v.clone()));
                    if r.built {
                        cells.extend(r.metrics.iter().map(|(_, v)| fmt(*v)));
                    } else {
                        cells.push("(not built)".into());
                    }
                    table.push(cells);
                }
                let cols = table.iter().map(|r| r.len()).max().unwrap_or(0);
                let widths: Vec<usize> = (0..cols)
                    .map(|c| {
                        table
                            .iter()
                            .filter_map(|r| r.get(c))
                            .map(|s| s.len())
                            .max()
                            .unwrap_or(0)
                    })
                    .collect();
                for r in &table {
                    let line: Vec<String> = r
                        .iter()
                        .enumerate()
                        .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
                        .collect();
                    println!("{}", line.join("  ").trim_end());
                }
            }
        }
        Cmd::Verify { common, stages } => {
            let ws = open(&common)?;
            let tty = std::io::stderr().is_terminal();
            let verdicts =
                kiln::lock::verify(&ws, &common.config, &common.set, &stages, &mut |e| {
                    if matches!(e, Event::StageStarted { .. } | Event::Progress { .. }) {
                        print_event(&e, tty)
                    }
                })?;
            let mut bad = 0;
            for v in &verdicts {
                if v.reproduced {
                    println!("{}: reproduced bit-for-bit ({:.1}s)", v.stage, v.seconds);
                } else {
                    bad += 1;
                    let files = if v.differing.is_empty() {
                        String::new()
                    } else {
                        format!("; differing files: {}", v.differing.join(", "))
                    };
                    println!(
                        "{}: MISMATCH: the rebuilt output differs from kiln.lock{files}",
                        v.stage
                    );
                }
            }
            if bad > 0 {
                anyhow::bail!(
                    "verify: {bad} of {} stages did not reproduce (see docs/caching.md for what breaks bit-reproducibility: thread count, CPU features, kiln version)",
                    verdicts.len()
                );
            }
        }
        Cmd::Plot { common, output } => {
            let ext = output
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or("")
                .to_ascii_lowercase();
            if ext != "svg" && ext != "png" {
                anyhow::bail!(
                    "kiln plot: {}: cannot write .{ext}; name the output .svg or .png",
                    output.display()
                );
            }
            let ws = open(&common)?;
            let series = kiln::plot::series(&ws)?;
            if series.is_empty() {
                anyhow::bail!(
                    "kiln plot: no variant of {} has a built train stage yet; run it first",
                    common.config.display()
                );
            }
            let title = format!("{} — loss", common.config.display());
            let svg = kiln::plot::svg(&series, &title);
            let bytes = if ext == "png" {
                kiln::plot::png(&svg, 2.0).context("kiln plot")?
            } else {
                svg.into_bytes()
            };
            kiln::workspace::write_atomic(&output, &bytes)
                .with_context(|| format!("writing {}", output.display()))?;
            println!("{} curves in {}", series.len(), output.display());
        }
        Cmd::Why { stage, common } => {
            let ws = open(&common)?;
            let st = ws.scheduler().assess()?;
            let find = |n: &str| st.iter().find(|s| s.name == n);
            let Some(mut cur) = find(&stage) else {
                let names: Vec<&str> = st.iter().map(|s| s.name.as_str()).collect();
                anyhow::bail!("no stage `{stage}`; stages: {}", names.join(", "));
            };
            if cur.state == State::Fresh {
                println!(
                    "{stage} is fresh: its key {} is in the cache (parameters, inputs and upstream outputs unchanged)",
                    short(&cur.key)
                );
                return Ok(ExitCode::SUCCESS);
            }
            let mut depth = 0;
            loop {
                let reason = cur.reason.clone().unwrap_or_default();
                println!("{}{}: {reason}", "  ".repeat(depth), cur.name);
                let next = reason
                    .strip_prefix("waiting on ")
                    .or_else(|| {
                        reason
                            .strip_prefix("upstream ")
                            .and_then(|r| r.strip_suffix(" changed"))
                    })
                    .and_then(&find);
                match next {
                    Some(n) if depth < 64 => {
                        cur = n;
                        depth += 1;
                    }
                    _ => break,
                }
            }
        }
        Cmd::Lineage {
            target,
            used_by,
            json,
            dir,
        } => {
            let cache = Cache::open(&dir.unwrap_or_else(|| cache_root(None)))?;
            let index = cache.index()?;
            let key = kiln::lineage::resolve(&cache, &target)?;
            if used_by {
                let uses = kiln::lineage::used_by(&cache, &index, &key)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&uses)?);
                } else {
                    println!("used by {} entries:", uses.len());
                    for u in &uses {
                        let cfgs: Vec<String> = u
                            .configs
                            .iter()
                            .map(|(c, n)| format!("{c} ({n})"))
                            .collect();
                        println!(
                            "  {:<22} {}{}  {}",
                            u.name,
                            &u.key[..12.min(u.key.len())],
                            if u.present { "" } else { " (removed)" },
                            cfgs.join(", ")
                        );
                    }
                }
            } else {
                let n = kiln::lineage::lineage(&cache, &index, &key)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&n)?);
                } else {
                    print_lineage(&n, 0, &mut std::collections::HashSet::new());
                }
            }
        }
        Cmd::MergeLora {
            mut common,
            lora_model_dir,
            output_dir,
        } => merge_lora(&mut common, lora_model_dir, output_dir)?,
        Cmd::Bench {
            what,
            model,
            work,
            cases,
        } => {
            if !["preprocess", "generate", "plan", "train"].contains(&what.as_str()) {
                anyhow::bail!(
                    "kiln bench: unknown benchmark `{what}` (available: preprocess, generate, plan, train)"
                );
            }
            if !cases.is_empty() && !["generate", "train"].contains(&what.as_str()) {
                anyhow::bail!("kiln bench {what}: --case applies to `generate` and `train` only");
            }
            init_threads(None);
            if !model.exists() {
                anyhow::bail!(
                    "kiln bench: {} not found; run scripts/fetch-smollm2.sh or pass --model",
                    model.display()
                );
            }
            let exe = std::env::current_exe().ok();
            println!(
                "kiln bench {what} ({} threads)",
                rayon::current_num_threads()
            );
            let figures = if what == "generate" {
                kiln::bench::generate(&model, &cases)?
            } else if what == "train" {
                kiln::bench::train(&model, &cases)?
            } else if what == "plan" {
                kiln::bench::plan(&work, &model, exe.as_deref())?
            } else {
                kiln::bench::preprocess(&work, &model, exe.as_deref())?
            };
            for f in figures {
                let v = if f.value >= 1e5 {
                    format!("{:.0}", f.value)
                } else if f.value >= 100.0 {
                    format!("{:.1}", f.value)
                } else {
                    format!("{:.3}", f.value)
                };
                println!("  {:<42} {:>12} {:<9} {}", f.name, v, f.unit, f.note);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// mimalloc v3's `mi_option_purge_delay` (its `mi_option_e` enum; checked by a test below).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // A train step allocates and frees tensors of tens of MB per op. mimalloc purges freed
    // memory back to the OS, so later ops faulted it back in, zeroed by the kernel (17% of a
    // SmolLM2 LoRA step in clear_page). The test below checks the option's index. Keeping them: LoRA steps 51 -> 68 tokens/s,
    // full fine-tuning 30 -> 44, peak RSS +3% / +10%. MIMALLOC_PURGE_DELAY still overrides.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a plain integer option; mimalloc reads options atomically.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    // candle sizes every matmul's thread pool from RAYON_NUM_THREADS, and without it re-reads
    // /proc/cpuinfo on each call (measured: ~6% of decode time). Pin it once, before any thread
    // starts: KILN_NUM_THREADS, else the available cores.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::env::var("KILN_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n > 0)
            .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
            .unwrap_or(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    // candle's elementwise ops run on its own spin-waiting barrier pool; after the fused ops
    // the ones left (gradient sums, residual adds) are small, and on a busy machine the pool's
    // barrier waits cost more than they save (perf: 15–20% of a LoRA step in
    // BarrierGuard::drop; 29–50 → 55–63 tokens/s with a second job running). One candle
    // thread keeps them on the calling thread; kiln's own kernels still use every core.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    match real_main() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            let mut src = e.source();
            while let Some(s) = src {
                let msg = s.to_string();
                if !e.to_string().contains(&msg) {
                    eprintln!("  caused by: {msg}");
                }
                src = s.source();
            }
            let usage = match e.downcast_ref::<KilnError>() {
                Some(KilnError::Config(_)) | Some(KilnError::Plan(_)) => true,
                Some(KilnError::Sched(SchedError::Plan(_))) => true,
                _ => e.downcast_ref::<kiln::config::ConfigError>().is_some(),
            };
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn purge_delay_is_mimallocs_option_15() {
        // mimalloc v3's default purge delay is 1000 ms; no other option defaults to 1000.
        // SAFETY: reads an integer option.
        let v = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(v, 1000);
    }
}
