//! `bench`: print figures measured now, on this machine. A peer (llama.cpp, PyTorch) appears only
//! when `--against` runs it in the same run, alternating with kiln.

use super::common::{init_threads, usage};
use anyhow::Result;
use kiln::bench::{GenerateCase, Peer, PeerKind, TrainCase};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: Option<BenchCmd>,
    #[command(flatten)]
    shared: Shared,
}

#[derive(clap::Args, Clone)]
struct Shared {
    /// The model whose tokenizer (and weights) to use (.gguf or HF directory).
    #[arg(
        long,
        global = true,
        default_value = "cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    model: PathBuf,
    /// Scratch directory for generated data and caches.
    #[arg(long, global = true, default_value = "cache/bench")]
    work: PathBuf,
    /// The Python that runs a peer's script (`--against`).
    #[arg(long, global = true, default_value = "python3")]
    python: PathBuf,
    /// Where the peers' scripts are (kiln's `scripts/`).
    #[arg(long, global = true, default_value = "scripts")]
    scripts: PathBuf,
}

#[derive(clap::Subcommand)]
enum BenchCmd {
    /// Preprocessing: cold, again, no-op and throughput on generated data (the default).
    Preprocess,
    /// Planning a 64-variant sweep, in process and as `kiln plan`.
    Plan,
    /// A no-op `kiln run` of a built pipeline (built first if needed): wall time, and files of
    /// output_dir it rewrote.
    Noop {
        /// The pipeline (default: the quickstart).
        #[arg(default_value = "pipelines/quickstart.yml")]
        config: PathBuf,
        /// Instead, an N-variant sweep (LoRA, merge) on a generated 2-layer model with the
        /// --model's tokenizer, written under --work.
        #[arg(long, value_name = "N")]
        sweep: Option<usize>,
    },
    /// Prompt processing and decode speed on kiln's inference engine.
    Generate {
        /// Run just these cases (repeatable; default: all).
        #[arg(long = "case", value_enum)]
        cases: Vec<GenerateCase>,
        /// Also measure llama.cpp on the same files, alternating with kiln.
        #[arg(long, value_enum)]
        against: Option<PeerKind>,
    },
    /// Training steps as the train stage runs them: tokens/s, achieved rate, memory. With more
    /// than one case, each runs in its own process, so each peak RSS is that case's.
    Train {
        /// Run just these cases (repeatable; default: all).
        #[arg(long = "case", value_enum)]
        cases: Vec<TrainCase>,
        /// Also measure PyTorch (+ PEFT) on the same steps, alternating with kiln.
        #[arg(long, value_enum)]
        against: Option<PeerKind>,
        /// Instead of --model, a model of this shape with random weights, written once under
        /// --work (bf16 safetensors).
        #[arg(long, value_enum)]
        shape: Option<kiln::bench::ModelShape>,
        /// Train with gradient checkpointing (each layer recomputed in backward).
        #[arg(long)]
        gradient_checkpointing: bool,
        /// Leave out the matmul reference rows (the per-case child processes).
        #[arg(long, hide = true)]
        no_reference: bool,
    },
}

impl BenchCmd {
    fn name(&self) -> &'static str {
        match self {
            BenchCmd::Preprocess => "preprocess",
            BenchCmd::Plan => "plan",
            BenchCmd::Noop { .. } => "noop",
            BenchCmd::Generate { .. } => "generate",
            BenchCmd::Train { .. } => "train",
        }
    }
}

fn peer(kind: Option<PeerKind>, s: &Shared) -> Result<Option<Peer>> {
    kind.map(|k| Peer::find(k, &s.python, &s.scripts))
        .transpose()
        .map_err(Into::into)
}

/// One train case as `kiln bench train --case C` in a child process (its own peak RSS), its
/// figures passed through.
fn train_case_in_child(
    exe: &Path,
    model: &Path,
    case: TrainCase,
    against: Option<PeerKind>,
    checkpointing: bool,
    s: &Shared,
) -> Result<()> {
    let mut cmd = std::process::Command::new(exe);
    cmd.args([
        "bench",
        "train",
        "--no-reference",
        "--case",
        &case.name(),
        "--model",
    ])
    .arg(model)
    .arg("--work")
    .arg(&s.work)
    .arg("--python")
    .arg(&s.python)
    .arg("--scripts")
    .arg(&s.scripts);
    if against.is_some() {
        cmd.args(["--against", "torch"]);
    }
    if checkpointing {
        cmd.arg("--gradient-checkpointing");
    }
    let out = cmd.stderr(std::process::Stdio::inherit()).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Everything but the child's own header line.
    for line in text.lines().skip(1) {
        println!("{line}");
    }
    if !out.status.success() {
        anyhow::bail!("bench train --case {} failed", case.name());
    }
    Ok(())
}

fn print_figure(f: &kiln::bench::Figure) {
    let v = if f.value >= 1e5 {
        format!("{:.0}", f.value)
    } else if f.value >= 100.0 {
        format!("{:.1}", f.value)
    } else {
        format!("{:.3}", f.value)
    };
    println!("  {:<42} {:>12} {:<9} {}", f.name, v, f.unit, f.note);
}

pub fn bench(a: BenchArgs) -> Result<()> {
    let what = a.what.unwrap_or(BenchCmd::Preprocess);
    let s = &a.shared;
    init_threads(None);
    if !s.model.exists() {
        return Err(usage(format!(
            "kiln bench: {} not found; run scripts/fetch-smollm2.sh or pass --model",
            s.model.display()
        )));
    }
    let exe = std::env::current_exe().ok();
    println!(
        "kiln bench {} ({} threads)",
        what.name(),
        rayon::current_num_threads()
    );
    let model: &Path = &s.model;
    let figures = match what {
        BenchCmd::Generate { cases, against } => {
            let p = peer(against, s)?;
            kiln::bench::generate(model, &cases, p.as_ref())?
        }
        BenchCmd::Train {
            cases,
            against,
            shape,
            no_reference,
            gradient_checkpointing,
        } => {
            let model = match shape {
                Some(sh) => {
                    std::fs::create_dir_all(&s.work)?;
                    kiln::bench::random_model(&s.work, sh)?
                }
                None => model.to_path_buf(),
            };
            let cases = if cases.is_empty() {
                TrainCase::ALL.to_vec()
            } else {
                cases
            };
            if cases.len() > 1 {
                let exe =
                    exe.ok_or_else(|| anyhow::anyhow!("cannot find kiln's own executable"))?;
                for f in kiln::bench::matmul_reference()?.1 {
                    print_figure(&f);
                }
                for c in cases {
                    train_case_in_child(&exe, &model, c, against, gradient_checkpointing, s)?;
                }
                return Ok(());
            }
            let p = peer(against, s)?;
            kiln::bench::train(
                &model,
                &cases,
                p.as_ref(),
                !no_reference,
                gradient_checkpointing,
            )?
        }
        BenchCmd::Plan => kiln::bench::plan(&s.work, model, exe.as_deref())?,
        BenchCmd::Noop { config, sweep } => {
            let exe = exe.ok_or_else(|| anyhow::anyhow!("cannot find kiln's own executable"))?;
            let config = match sweep {
                Some(n) => {
                    std::fs::create_dir_all(&s.work)?;
                    kiln::bench::tiny_sweep(&std::fs::canonicalize(&s.work)?, model, n)?
                }
                None => config,
            };
            kiln::bench::noop(&config, &exe)?
        }
        BenchCmd::Preprocess => kiln::bench::preprocess(&s.work, model, exe.as_deref())?,
    };
    for f in &figures {
        print_figure(f);
    }
    Ok(())
}
