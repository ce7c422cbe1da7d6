//! The `kiln` command line: parse arguments and dispatch to the command groups in `src/cli/`.
//! Exit codes: 0 ok, 1 a build or run failed, 2 the user's input (config, flags) is wrong.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cli;

use clap::{Parser, Subcommand};
use cli::{bench, build, cache, chat, common, lock, model, sweep, train};
use kiln::workspace::KilnError;
use std::process::ExitCode;

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

#[derive(Subcommand)]
enum Cmd {
    /// Check the config: types, unknown keys, unsupported keys. Builds nothing.
    Validate(common::Common),
    /// Show every stage: short key, fresh or stale, and why.
    Plan(build::PlanArgs),
    /// Print the stage graph.
    Dag(build::DagArgs),
    /// Build every stale stage (or only what --target needs); reuse the rest.
    Run(build::RunArgs),
    /// Validate, fetch, tokenize and pack, then print dataset statistics.
    Preprocess(train::PreprocessArgs),
    /// Print benchmark figures measured on this machine (preprocess, plan, generate, train).
    Bench(bench::BenchArgs),
    /// Build up to the train stage (fine-tune) and write the adapter to `output_dir`.
    Train(train::TrainArgs),
    /// Merge the trained LoRA adapter into the base model: a standalone HF-layout model in
    /// `output_dir/merged` (the cached `merge` stage).
    #[command(name = "merge-lora")]
    MergeLora(model::MergeArgs),
    /// Chat with the trained model in the terminal (streaming; `/reset`, `/exit`), or answer
    /// one `--prompt` and exit.
    Inference(chat::InferenceArgs),
    /// Validation loss and perplexity of the trained model (and answers to `evaluate.prompts`),
    /// cached: an unchanged model and eval set are not evaluated again.
    Evaluate(model::EvaluateArgs),
    /// Export the fine-tuned model: a GGUF for llama.cpp or an HF safetensors directory, with
    /// its size and validation perplexity next to the unquantized model's.
    Export(model::ExportArgs),
    /// Serve the fine-tuned model: a chat page at / and an OpenAI-compatible API
    /// (POST /v1/chat/completions, streaming or not; GET /v1/models).
    Serve(chat::ServeArgs),
    /// A params × metrics table of a sweep's variants (final train loss, best eval loss,
    /// perplexity, tokens/s, train time), sorted by a metric.
    Compare(sweep::CompareArgs),
    /// Rebuild locked stages in a scratch cache and compare their outputs with kiln.lock:
    /// "train: reproduced bit-for-bit" or which files differ.
    Verify(lock::VerifyArgs),
    /// Train (solid) and eval (dashed) loss curves of every built variant on one SVG chart.
    Plot(sweep::PlotArgs),
    /// Why a stage is stale or fresh, traced back to the input that changed.
    Why(build::WhyArgs),
    /// What produced an artifact: stages, parameters, input files and kiln version, from a
    /// path kiln wrote (output_dir, merged/, export/...), any file in the cache, or a key.
    Lineage(cache::LineageArgs),
    /// Past runs recorded in the cache index: config, stages built vs reused, duration, outcome.
    Runs(cache::RunsArgs),
    /// Inspect and maintain the cache.
    Cache(cache::CacheArgs),
}

fn dispatch(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Validate(c) => build::validate(c)?,
        Cmd::Plan(a) => build::plan(a)?,
        Cmd::Dag(a) => build::dag(a)?,
        Cmd::Run(a) => build::run(a)?,
        Cmd::Why(a) => build::why(a)?,
        Cmd::Preprocess(a) => train::preprocess(a)?,
        Cmd::Train(a) => train::train(a)?,
        Cmd::Bench(a) => bench::bench(a)?,
        Cmd::MergeLora(a) => model::merge_lora(a)?,
        Cmd::Evaluate(a) => model::evaluate(a)?,
        Cmd::Export(a) => model::export(a)?,
        Cmd::Inference(a) => chat::inference(a)?,
        Cmd::Serve(a) => chat::serve(a)?,
        Cmd::Compare(a) => sweep::compare(a)?,
        Cmd::Plot(a) => sweep::plot(a)?,
        Cmd::Verify(a) => lock::verify(a)?,
        Cmd::Lineage(a) => cache::lineage(a)?,
        Cmd::Runs(a) => cache::runs(a)?,
        Cmd::Cache(a) => return cache::cache(a),
    }
    Ok(ExitCode::SUCCESS)
}

/// 2 when the user's input is wrong (a config problem, a bad flag or target, a command this
/// config cannot do), else 1.
fn exit_code(e: &anyhow::Error) -> u8 {
    let usage = e.chain().any(|c| {
        c.downcast_ref::<common::Usage>().is_some()
            || c.downcast_ref::<kiln::config::ConfigError>().is_some()
            || c.downcast_ref::<kiln::plan::PlanError>().is_some()
            || matches!(
                c.downcast_ref::<kiln::scheduler::SchedError>(),
                Some(kiln::scheduler::SchedError::Plan(_))
            )
            || c.downcast_ref::<KilnError>()
                .is_some_and(KilnError::is_usage)
    });
    if usage {
        2
    } else {
        1
    }
}

/// mimalloc v3's `mi_option_purge_delay` (its `mi_option_e` enum; checked by a test below).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    common::started();
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
    match dispatch(Cli::parse().cmd) {
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
            ExitCode::from(exit_code(&e))
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
