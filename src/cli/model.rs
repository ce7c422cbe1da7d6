//! `merge-lora`, `evaluate` and `export`: the trained model as a standalone model, its validation
//! figures, and deployable files.

use super::build::run_target;
use super::common::{human_bytes, open_single, usage, Common};
use anyhow::{Context, Result};
use kiln::config::ExportFormat;
use kiln::workspace::KilnError;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct MergeArgs {
    #[command(flatten)]
    common: Common,
    /// Merge this PEFT adapter directory instead of the config's train stage (not cached).
    #[arg(long)]
    lora_model_dir: Option<PathBuf>,
    /// Where to write the merged model (default: `output_dir/merged`).
    #[arg(long)]
    output_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct EvaluateArgs {
    #[command(flatten)]
    common: Common,
}

/// `kiln export --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    /// A GGUF file for llama.cpp.
    Gguf,
    /// An HF-layout safetensors directory.
    Safetensors,
}

/// `kiln export --quant`: a GGUF quant type, or a safetensors dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantArg {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_k_m")]
    Q4KM,
}

impl QuantArg {
    fn as_str(self) -> &'static str {
        match self {
            QuantArg::F32 => "f32",
            QuantArg::F16 => "f16",
            QuantArg::Bf16 => "bf16",
            QuantArg::Q8_0 => "q8_0",
            QuantArg::Q4_0 => "q4_0",
            QuantArg::Q4KM => "q4_k_m",
        }
    }
}

#[derive(clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, value_enum, default_value = "gguf")]
    format: FormatArg,
    /// GGUF: f32, f16, q8_0, q4_0, q4_k_m (default q8_0); safetensors: f32, f16, bf16 (default f32).
    #[arg(long, value_enum)]
    quant: Option<QuantArg>,
}

pub fn merge_lora(a: MergeArgs) -> Result<()> {
    let MergeArgs {
        mut common,
        lora_model_dir,
        output_dir,
    } = a;
    let common = &mut common;
    common.set.push("merge_lora=true".into());
    let ws = open_single(common)?;
    let lora_model_dir = lora_model_dir.or_else(|| ws.settings.lora_model_dir.clone());
    if ws.settings.train.adapter.is_none() && lora_model_dir.is_none() {
        return Err(usage(format!(
            "{}: nothing to merge: full fine-tuning writes complete weights (model.safetensors in output_dir); set `adapter: lora` or pass --lora-model-dir",
            common.config.display()
        )));
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
            let tmp = kiln::workspace::unique_tmp(&dest);
            std::fs::create_dir_all(&tmp).map_err(kiln::workspace::io_write(&tmp))?;
            let t = Instant::now();
            let merged = kiln::stages::merge::merge_dirs(
                &model_dir,
                &adapter,
                &tmp,
                ws.settings.max_shard_size,
                kiln::plan::configured_template(&ws.settings.chat_template).as_deref(),
                ws.settings.train.base_weights,
            );
            if merged.is_err() {
                // No half-written model left behind, hidden or not.
                let _ = std::fs::remove_dir_all(&tmp);
            }
            let note = merged
                .map_err(KilnError::from)
                .with_context(|| format!("merging {}", adapter.display()))?;
            if let Some(n) = note {
                println!("{n}");
            }
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
            ws.publish_entry("merge", &dest, &mut Default::default())?;
        }
    }
    println!("merged model in {}", dest.display());
    Ok(())
}

pub fn evaluate(a: EvaluateArgs) -> Result<()> {
    let mut common = a.common;
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
    Ok(())
}

pub fn export(a: ExportArgs) -> Result<()> {
    let mut common = a.common;
    let format = match a.format {
        FormatArg::Gguf => "gguf",
        FormatArg::Safetensors => "safetensors",
    };
    let quant = a.quant.map(QuantArg::as_str);
    let f = ExportFormat::parse(format, quant).map_err(|e| usage(format!("kiln export: {e}")))?;
    let q = quant.map(|q| format!(", quant: {q}")).unwrap_or_default();
    common.set.push(format!("export=[{{format: {format}{q}}}]"));
    let ws = open_single(&common)?;
    let name = format!("export.{}", f.label());
    run_target(&ws, &name)?;
    let dir = ws.entry_of(&name)?;
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("export.json"))?)?;
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
    Ok(())
}
