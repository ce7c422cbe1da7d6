//! `verify`: rebuild locked stages in a scratch cache and compare their outputs with kiln.lock.
//! (`run --locked`, the check that nothing would rebuild, is in `build`.)

use super::common::{open, Common};
use super::print::print_event;
use anyhow::Result;
use kiln::events::Event;
use std::io::IsTerminal;

#[derive(clap::Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    common: Common,
    /// Stage names or kinds to rebuild (repeatable; default: every locked stage but fetch).
    #[arg(long)]
    stages: Vec<String>,
}

pub fn verify(a: VerifyArgs) -> Result<()> {
    let ws = open(&a.common)?;
    let tty = std::io::stderr().is_terminal();
    let verdicts = kiln::lock::verify(&ws, &a.common.config, &a.common.set, &a.stages, &mut |e| {
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
    Ok(())
}
