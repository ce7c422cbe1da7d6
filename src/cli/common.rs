//! What every command group shares: the config arguments, opening a workspace (with `--set` and
//! `--variant`), thread setup, the usage error (exit code 2) and small formatting helpers.

use anyhow::Result;
use kiln::workspace::Workspace;
use std::path::PathBuf;

#[derive(clap::Args, Clone)]
pub struct Common {
    /// The pipeline config (Axolotl-style YAML).
    pub config: PathBuf,
    /// Override a config key without editing the file (repeatable): `--set learning_rate=1e-4`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// In a sweep, work on this variant only (its id, or a unique prefix; see `kiln plan`).
    #[arg(long)]
    pub variant: Option<String>,
}

/// The user's input (a flag, the config, the command for this config) is wrong: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// `Err(Usage(..))` as an anyhow error, for `return Err(usage(..))`.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Usage(msg.into()))
}

pub fn init_threads(ws: Option<&Workspace>) {
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

/// The `--set` overrides that turn sweep variant `id` into a plain config: its values, its
/// output_dir, no sweep. Its stages have the same keys as in the sweep, so everything built
/// there is reused.
pub fn variant_sets(c: &Common, id: &str) -> Result<Vec<String>> {
    let all = kiln::config::load_variants(&c.config, &c.set)?;
    let hits: Vec<_> = all
        .iter()
        .filter_map(|(v, l)| v.as_ref().map(|v| (v, l)))
        .filter(|(v, _)| v.id.starts_with(id))
        .collect();
    let [(v, l)] = hits[..] else {
        let ids: Vec<String> = all
            .iter()
            .filter_map(|(v, _)| v.as_ref().map(|v| format!("{} ({})", v.id, v.label)))
            .collect();
        return Err(usage(format!(
            "--variant {id}: {} variants match; the sweep has: {}",
            hits.len(),
            if ids.is_empty() {
                "no variants (not a sweep)".to_string()
            } else {
                ids.join(", ")
            }
        )));
    };
    let mut sets = Vec::new();
    for (k, val) in &v.sets {
        sets.push(format!("{k}={}", serde_json::to_string(val)?));
    }
    sets.push(format!("output_dir={}", l.settings.output_dir.display()));
    sets.push("sweep=null".into());
    Ok(sets)
}

/// Opens the config's workspace (printing its warnings) and sets up compute threads.
pub fn open(c: &Common) -> Result<Workspace> {
    let mut sets = c.set.clone();
    if let Some(id) = &c.variant {
        sets.extend(variant_sets(c, id)?);
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
pub fn open_single(c: &Common) -> Result<Workspace> {
    let ws = open(c)?;
    if ws.is_sweep() {
        let ids: Vec<String> = ws
            .variants
            .iter()
            .map(|v| format!("{} ({})", v.id.as_deref().unwrap_or("-"), v.label))
            .collect();
        return Err(usage(format!(
            "{} is a sweep of {} variants: {}; this command works on one — pick it with --variant ID",
            c.config.display(),
            ws.variants.len(),
            ids.join(", ")
        )));
    }
    Ok(ws)
}

/// The first 12 hex digits of a key, or dashes when it is not known yet.
pub fn short(k: &Option<String>) -> String {
    k.as_deref()
        .map(|k| k[..12.min(k.len())].to_string())
        .unwrap_or_else(|| "-".repeat(12))
}

pub fn human_bytes(b: u64) -> String {
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

pub fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// When the command started (the first call, made at the top of `main`): the time kiln reports
/// is the whole command's, not one phase's.
pub fn started() -> std::time::Instant {
    *STARTED.get_or_init(std::time::Instant::now)
}
