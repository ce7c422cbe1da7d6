//! `cache`, `runs` and `lineage`: inspect and maintain the cache, past runs, and what produced
//! an artifact.

use super::common::{human_bytes, usage};
use anyhow::{Context, Result};
use kiln::cache::{dir_size, Cache, Index};
use kiln::workspace::{cache_root, Workspace};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    cmd: CacheCmd,
    /// Cache directory (default: $KILN_CACHE or ./cache).
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
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

#[derive(clap::Args)]
pub struct RunsArgs {
    /// How many of the newest runs to show.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Cache directory (default: $KILN_CACHE or ./cache).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print JSON lines.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct LineageArgs {
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
}

fn parse_cutoff(s: &str) -> Result<i64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    if let Some(d) = s.strip_suffix('d') {
        let days: i64 = d
            .parse()
            .map_err(|_| usage("--older-than: expected e.g. 30d or 2026-01-31"))?;
        return Ok(now - days * 86400);
    }
    let parts: Vec<i64> = s
        .split('-')
        .map(|p| p.parse::<i64>())
        .collect::<Result<_, _>>()
        .map_err(|_| usage("--older-than: expected YYYY-MM-DD or 30d"))?;
    let [y, m, d] = parts[..] else {
        return Err(usage("--older-than: expected YYYY-MM-DD or 30d"));
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Ok((era * 146097 + doe - 719468) * 86400)
}

/// What every cache subcommand works on.
struct Opened {
    root: PathBuf,
    cache: Cache,
    index: Index,
    keys: Vec<String>,
}

pub fn cache(a: CacheArgs) -> Result<ExitCode> {
    let root = a.dir.unwrap_or_else(|| cache_root(None));
    let cache = Cache::open(&root)?;
    let index = cache.index()?;
    let keys = cache.keys()?;
    let o = Opened {
        root,
        cache,
        index,
        keys,
    };
    match a.cmd {
        CacheCmd::Ls => ls(&o)?,
        CacheCmd::Du => du(&o)?,
        CacheCmd::Gc {
            keep,
            older_than,
            dry_run,
        } => gc(&o, &keep, older_than.as_deref(), dry_run)?,
        CacheCmd::Verify { fix } => return verify(&o, fix),
    }
    Ok(ExitCode::SUCCESS)
}

fn ls(o: &Opened) -> Result<()> {
    let Opened {
        root,
        cache,
        index,
        keys,
    } = o;
    println!(
        "{:<14} {:<22} {:<9} {:>10}  created",
        "key", "stage", "kind", "size"
    );
    for k in keys.iter() {
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
    Ok(())
}

fn du(o: &Opened) -> Result<()> {
    let Opened { cache, keys, .. } = o;
    let mut by_kind: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for k in keys.iter() {
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
    Ok(())
}

fn gc(o: &Opened, keep: &[PathBuf], older_than: Option<&str>, dry_run: bool) -> Result<()> {
    let Opened {
        cache, index, keys, ..
    } = o;
    if keep.is_empty() && older_than.is_none() {
        return Err(usage(
            "cache gc: say what to keep (--keep CONFIG, repeatable) and/or --older-than DATE",
        ));
    }
    let mut live = std::collections::HashSet::new();
    for c in keep {
        let ws = Workspace::open(c, &[]).with_context(|| format!("--keep {}", c.display()))?;
        for s in ws.scheduler().assess()? {
            if let Some(k) = s.key {
                live.insert(k);
            }
        }
    }
    let cutoff = older_than.map(parse_cutoff).transpose()?;
    let mut removed = 0u64;
    let mut freed = 0u64;
    for k in keys.iter() {
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
    Ok(())
}

fn verify(o: &Opened, fix: bool) -> Result<ExitCode> {
    let Opened {
        cache, index, keys, ..
    } = o;
    let mut bad = 0;
    for k in keys.iter() {
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
    Ok(ExitCode::SUCCESS)
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

pub fn runs(a: RunsArgs) -> Result<()> {
    let cache = Cache::open(&a.dir.unwrap_or_else(|| cache_root(None)))?;
    let runs = cache.index()?.runs(a.limit)?;
    if !a.json {
        println!(
            "{:>5}  {:<8} {:>5} {:>6} {:>9}  config",
            "run", "outcome", "built", "reused", "seconds"
        );
    }
    for r in runs {
        let secs = r.finished.map(|f| f - r.started);
        if a.json {
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
    Ok(())
}

fn print_used_by(cache: &Cache, index: &Index, key: &str, json: bool) -> Result<()> {
    let uses = kiln::lineage::used_by(cache, index, key)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&uses)?);
        return Ok(());
    }
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
    Ok(())
}

pub fn lineage(a: LineageArgs) -> Result<()> {
    let cache = Cache::open(&a.dir.unwrap_or_else(|| cache_root(None)))?;
    let index = cache.index()?;
    let key = kiln::lineage::resolve(&cache, &a.target)?;
    if a.used_by {
        return print_used_by(&cache, &index, &key, a.json);
    }
    let n = kiln::lineage::lineage(&cache, &index, &key)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&n)?);
    } else {
        print_lineage(&n, 0, &mut std::collections::HashSet::new());
    }
    Ok(())
}
