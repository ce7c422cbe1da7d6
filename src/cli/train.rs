//! `preprocess` and `train`: build the data stages (with statistics and a view of trained
//! tokens), and fine-tune.

use super::build::run_target;
use super::common::{human_bytes, open_single, usage, Common};
use anyhow::{Context, Result};
use kiln::scheduler::RunOptions;
use kiln::workspace::{KilnError, Workspace};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct PreprocessArgs {
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
}

#[derive(clap::Args)]
pub struct TrainArgs {
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
}

pub fn print_stats(ws: &Workspace) -> Result<(), KilnError> {
    let st = ws.pack_stats()?;
    println!();
    for (label, d) in &st.datasets {
        println!("{label}: {} records → {} samples", d.records, d.samples);
        let dropped =
            d.dropped_unusable + d.dropped_too_long + d.dropped_too_short + d.dropped_untrained;
        if dropped + d.truncated > 0 {
            println!(
                "  dropped {dropped} ({} the format cannot use, {} longer than sequence_len, {} shorter than min_sample_len, {} with no trained tokens); truncated {}",
                d.dropped_unusable, d.dropped_too_long, d.dropped_too_short, d.dropped_untrained, d.truncated
            );
            for u in &d.unusable {
                println!("    unusable: {u}");
            }
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
        if let Some(p) = &d.pairs {
            let l = |x: &kiln::data::tokenize::LengthStats| {
                format!("mean {:.1} / p50 {} / max {}", x.mean, x.p50, x.max)
            };
            match p.desirable {
                Some(d) => println!(
                    "  {} KTO completions ({d} desirable) · prompt {} · completion {}",
                    p.pairs,
                    l(&p.prompt),
                    l(&p.chosen)
                ),
                None => println!(
                    "  {} preference pairs · prompt {} · chosen {} · rejected {}",
                    p.pairs,
                    l(&p.prompt),
                    l(&p.chosen),
                    l(&p.rejected)
                ),
            }
        }
    }
    let s = &ws.settings;
    for (name, h) in [("train", &st.train), ("val", &st.val)] {
        if h.packed {
            println!(
                "{name}: {} samples, {} tokens ({} trained), {} packed bins of {} tokens, efficiency {:.1}%",
                h.samples,
                h.tokens,
                h.trained_tokens,
                h.bins,
                h.sequence_len,
                100.0 * h.efficiency
            );
        } else {
            println!(
                "{name}: {} samples, {} tokens ({} trained), {} rows (one sample each, up to {} tokens)",
                h.samples, h.tokens, h.trained_tokens, h.bins, h.sequence_len
            );
        }
    }
    let mbs = s.train.steps.micro_batch_size;
    let batches = st.train.bins.div_ceil(mbs);
    println!(
        "batches per epoch: {batches} (micro_batch_size {mbs}); optimizer steps per epoch: {} (gradient_accumulation_steps {})",
        batches.div_ceil(s.train.steps.gradient_accumulation_steps),
        s.train.steps.gradient_accumulation_steps
    );
    Ok(())
}

pub fn print_debug(ws: &Workspace, n: usize, json: bool) -> Result<(), KilnError> {
    let tty = std::io::stdout().is_terminal();
    for ex in ws.debug_examples(n)? {
        if json {
            println!("{}", serde_json::to_string(&ex).unwrap_or_default());
            continue;
        }
        println!(
            "── {} record {}{} ({} tokens)",
            ex.dataset,
            ex.index,
            ex.part.map(|p| format!(", {p}")).unwrap_or_default(),
            ex.input_ids.len()
        );
        // A character split over byte tokens is one piece with all its ids.
        let mut groups: Vec<(String, Vec<u32>, i64)> = Vec::new();
        for ((piece, id), label) in ex.pieces.iter().zip(&ex.input_ids).zip(&ex.labels) {
            match groups.last_mut() {
                Some(g) if piece.is_empty() && !g.1.is_empty() => g.1.push(*id),
                _ => groups.push((piece.clone(), vec![*id], *label)),
            }
        }
        let mut line = String::new();
        for (piece, ids, label) in groups {
            let p = piece.replace('\n', "\\n");
            let id = ids
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(" ");
            let label = if label == -100 {
                "-100".to_string()
            } else {
                label.to_string()
            };
            match (tty, label == "-100") {
                (true, true) => line.push_str(&format!("\x1b[2m{p}({id}, {label})\x1b[0m ")),
                (true, false) => line.push_str(&format!("\x1b[32m{p}({id}, {label})\x1b[0m ")),
                (false, _) => line.push_str(&format!("{p}({id}, {label}) ")),
            }
        }
        println!("{}\n", line.trim_end());
    }
    Ok(())
}

pub fn preprocess(a: PreprocessArgs) -> Result<()> {
    let ws = open_single(&a.common)?;
    let quiet_json = a.debug && a.json;
    if quiet_json {
        ws.scheduler().run(
            &RunOptions {
                targets: vec!["pack".into()],
                ..Default::default()
            },
            &mut |_| {},
        )?;
    } else {
        run_target(&ws, "pack")?;
        print_stats(&ws)?;
    }
    if a.debug {
        if !quiet_json {
            println!();
        }
        print_debug(&ws, a.debug_num_examples, a.json)?;
    }
    Ok(())
}

fn debug_step(ws: &Workspace) -> Result<()> {
    run_target(ws, "pack")?;
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
    print_debug(ws, 1, false)?;
    Ok(())
}

pub fn train(mut a: TrainArgs) -> Result<()> {
    if let Some(dir) = &a.resume_from_checkpoint {
        let dir = std::path::absolute(dir)
            .with_context(|| format!("--resume-from-checkpoint {}", dir.display()))?;
        a.common
            .set
            .push(format!("resume_from_checkpoint={}", dir.display()));
    }
    let ws = open_single(&a.common)?;
    if ws.plan.index_of("train").is_none() {
        return Err(usage(format!(
            "{}: nothing to train: the config's adapter is not trainable here (use `adapter: lora`, or no adapter for full fine-tuning)",
            a.common.config.display()
        )));
    }
    if a.debug {
        return debug_step(&ws);
    }
    run_target(&ws, "train")?;
    if let Some(out) = ws.materialize_outputs()? {
        println!("outputs in {}", out.display());
    }
    Ok(())
}
