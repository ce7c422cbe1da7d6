//! Printing run events: one line per stage event, and in a terminal a progress bar for a train
//! stage's logs.

use super::common::{clock, human_bytes};
use kiln::events::Event;

pub fn print_event(e: &Event, tty: bool) {
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
        Event::Note { message } => println!("         {message}"),
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
pub struct Printer {
    tty: bool,
    /// The bar, for which stage, and its last log (printed as a line when the bar goes).
    bar: Option<(String, indicatif::ProgressBar, kiln::events::TrainLog)>,
}

impl Printer {
    pub fn new(tty: bool) -> Self {
        Self { tty, bar: None }
    }

    pub fn event(&mut self, e: &Event) {
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

    pub fn clear(&mut self) {
        if let Some((_, bar, last)) = self.bar.take() {
            bar.finish_and_clear();
            print_event(&Event::TrainLog(last), false);
        }
    }
}
