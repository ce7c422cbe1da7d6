//! `validate`, `plan`, `dag`, `run` and `why`: what the build would do, doing it, and why a stage
//! is stale.

use super::common::{open, short, usage, Common};
use super::print::Printer;
use anyhow::Result;
use kiln::scheduler::{RunOptions, RunSummary, StageStatus, State};
use kiln::workspace::{KilnError, Workspace};
use std::io::IsTerminal;

#[derive(clap::Args)]
pub struct PlanArgs {
    #[command(flatten)]
    common: Common,
    /// Print {"stages": [...]} as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct DagArgs {
    #[command(flatten)]
    common: Common,
    /// Graphviz output (the default).
    #[arg(long, default_value_t = true)]
    dot: bool,
}

#[derive(clap::Args)]
pub struct RunArgs {
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
}

#[derive(clap::Args)]
pub struct WhyArgs {
    /// The stage (`train`, `tokenize[0]`, `train@1a2b3c4d`).
    stage: String,
    #[command(flatten)]
    common: Common,
}

pub fn validate(c: Common) -> Result<()> {
    // A sweep is validated variant by variant (or the one --variant picks); problems shared by
    // the variants (the same data, the same template) are reported once.
    let mut sets = c.set.clone();
    if let Some(id) = &c.variant {
        sets.extend(super::common::variant_sets(&c, id)?);
    }
    let variants = kiln::config::load_variants(&c.config, &sets)?;
    let mut errors: Vec<kiln::config::Problem> = Vec::new();
    let mut warnings: Vec<kiln::config::Problem> = Vec::new();
    let add = |to: &mut Vec<kiln::config::Problem>, p: kiln::config::Problem| {
        if !to.contains(&p) {
            to.push(p);
        }
    };
    let mut datasets = Vec::new();
    for (_, loaded) in &variants {
        let s = &loaded.settings;
        for w in &loaded.warnings {
            add(&mut warnings, w.clone());
        }
        // Against the base model too, when it is local.
        let (e, w) = kiln::plan::checks::model_problems(s);
        e.into_iter().for_each(|p| add(&mut errors, p));
        w.into_iter().for_each(|p| add(&mut warnings, p));
        kiln::plan::checks::template_problems(s)
            .into_iter()
            .for_each(|p| add(&mut errors, p));
        for d in s.datasets.iter().chain(&s.test_datasets) {
            if !datasets.contains(&d) {
                datasets.push(d);
            }
        }
    }
    let (e, w) = kiln::plan::checks::data_problems(datasets.iter().copied());
    e.into_iter().for_each(|p| add(&mut errors, p));
    w.into_iter().for_each(|p| add(&mut warnings, p));
    if !errors.is_empty() {
        return Err(kiln::config::ConfigError::Invalid(errors, warnings).into());
    }
    for w in &warnings {
        eprintln!("warning: {}", w.to_string().replace('\n', "\n  "));
    }
    let sweep = if variants.len() > 1 || variants[0].0.is_some() {
        format!("{} variants, ", variants.len())
    } else {
        String::new()
    };
    println!(
        "{}: ok ({sweep}{} datasets, {} warnings)",
        c.config.display(),
        datasets.len(),
        warnings.len()
    );
    Ok(())
}

/// The model checks of `validate`, made before a build starts (not on a no-op run: reading a
/// GGUF's metadata would cost more than the whole no-op), and its data checks when a tokenize
/// stage will run (a sweep's variants usually share the datasets: each is read once).
fn check_before_building(ws: &Workspace) -> Result<(), KilnError> {
    let st = ws.scheduler().assess()?;
    if !st.iter().any(|s| s.state == State::Stale) {
        return Ok(());
    }
    let tokenize_stale = st
        .iter()
        .any(|s| s.state == State::Stale && s.kind == "tokenize");
    let mut errors = Vec::new();
    let mut datasets = Vec::new();
    for v in &ws.variants {
        let (mut e, w) = kiln::plan::checks::model_problems(&v.settings);
        e.extend(kiln::plan::checks::template_problems(&v.settings));
        for w in w {
            eprintln!("warning: {}", w.to_string().replace('\n', "\n  "));
        }
        for p in e {
            if !errors.contains(&p) {
                errors.push(p);
            }
        }
        let s = &v.settings;
        for d in s.datasets.iter().chain(&s.test_datasets) {
            if tokenize_stale && !datasets.contains(&d) {
                datasets.push(d);
            }
        }
    }
    let (e, w) = kiln::plan::checks::data_problems(datasets);
    for w in w {
        eprintln!("warning: {}", w.to_string().replace('\n', "\n  "));
    }
    errors.extend(e);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(kiln::config::ConfigError::Invalid(errors, vec![]).into())
    }
}

fn state_word(s: State) -> &'static str {
    match s {
        State::Fresh => "fresh",
        State::Stale => "stale",
    }
}

fn plan_json(ws: &Workspace, st: &[StageStatus]) -> Result<()> {
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
    Ok(())
}

fn print_sweep_header(ws: &Workspace) {
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

pub fn plan(a: PlanArgs) -> Result<()> {
    let ws = open(&a.common)?;
    let st = ws.scheduler().assess()?;
    if a.json {
        return plan_json(&ws, &st);
    }
    if ws.is_sweep() {
        print_sweep_header(&ws);
    }
    for s in &st {
        let state = state_word(s.state);
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
    Ok(())
}

pub fn dag(a: DagArgs) -> Result<()> {
    let ws = open(&a.common)?;
    let st = ws.scheduler().assess()?;
    let labels: Vec<String> = ws
        .plan
        .stages
        .iter()
        .map(|p| {
            st.iter()
                .find(|s| s.name == p.name)
                .map(|s| format!("{} {}", short(&s.key), state_word(s.state)))
                .unwrap_or_default()
        })
        .collect();
    print!("{}", ws.plan.dot(&labels));
    Ok(())
}

/// Builds what `opts` asks for, printing events and the summary; records the run in the index
/// and updates kiln.lock.
pub fn do_run(ws: &Workspace, opts: &RunOptions) -> Result<RunSummary, KilnError> {
    let summary = build(ws, opts)?;
    report(&summary);
    Ok(summary)
}

/// The closing line of a run: "nothing to do" or what was built, with the whole command's time.
fn report(s: &RunSummary) {
    let secs = super::common::started().elapsed().as_secs_f64();
    if s.built.is_empty() && s.failed.is_empty() {
        println!(
            "nothing to do: all {} stages fresh ({:.0} ms)",
            s.fresh.len(),
            secs * 1000.0
        );
    } else {
        println!(
            "built {}, reused {} in {secs:.2}s",
            s.built.len(),
            s.fresh.len()
        );
    }
}

/// Builds what `opts` asks for, printing events; records the run and updates kiln.lock.
fn build(ws: &Workspace, opts: &RunOptions) -> Result<RunSummary, KilnError> {
    check_before_building(ws)?;
    let tty = std::io::stderr().is_terminal();
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
        }
        Err(_) => ws.index.finish_run(run_id, "failed", 0, 0)?,
    }
    Ok(res?)
}

/// Builds one stage (name or kind) and what it needs, reporting like `kiln run`.
pub fn run_target(ws: &Workspace, target: &str) -> Result<RunSummary, KilnError> {
    do_run(
        ws,
        &RunOptions {
            targets: vec![target.into()],
            ..Default::default()
        },
    )
}

/// `run --locked`: build nothing; fail naming each stage that would rebuild or differs.
fn check_locked(ws: &Workspace, c: &Common) -> Result<()> {
    let problems = kiln::lock::check(ws)?;
    let (path, _) = kiln::lock::location(&c.config);
    if problems.is_empty() {
        println!(
            "locked: all {} stages fresh and as in {}",
            ws.plan.stages.len(),
            path.display()
        );
        return Ok(());
    }
    for p in &problems {
        eprintln!("  {:<22} {}", p.stage, p.reason);
    }
    anyhow::bail!(
        "--locked: {} of {} stages would rebuild or differ from {}",
        problems.len(),
        ws.plan.stages.len(),
        path.display()
    )
}

pub fn run(a: RunArgs) -> Result<()> {
    if a.frozen {
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    let ws = open(&a.common)?;
    if a.locked || a.frozen {
        return check_locked(&ws, &a.common);
    }
    let opts = RunOptions {
        targets: a.target,
        force: a.force,
        keep_going: a.keep_going,
        jobs: a.jobs,
        train_jobs: a.train_jobs,
    };
    let mut summary = build(&ws, &opts)?;
    // Publishing verifies each entry it reads; a corrupt one is quarantined (stale again), so
    // building once more rebuilds exactly it. Bounded: a disk that corrupts every write fails.
    let mut rebuilds = 0;
    let (out, published) = loop {
        match ws.publish_outputs() {
            Err(KilnError::Corrupt {
                stage, key, damage, ..
            }) if rebuilds < 3 => {
                eprintln!(
                    "  corrupt cache entry for {stage} ({}): {}; quarantined, rebuilding",
                    &key[..key.len().min(12)],
                    damage.join(", ")
                );
                rebuilds += 1;
                let again = build(&ws, &opts)?;
                summary.built.extend(again.built);
                summary.failed.extend(again.failed);
            }
            r => break r?,
        }
    };
    report(&summary);
    if let Some(out) = out {
        println!(
            "outputs in {} ({})",
            out.display(),
            published_words(&published)
        );
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
    Ok(())
}

pub fn why(a: WhyArgs) -> Result<()> {
    let ws = open(&a.common)?;
    let st = ws.scheduler().assess()?;
    let find = |n: &str| st.iter().find(|s| s.name == n);
    let Some(mut cur) = find(&a.stage) else {
        let names: Vec<&str> = st.iter().map(|s| s.name.as_str()).collect();
        return Err(usage(format!(
            "no stage `{}`; stages: {}",
            a.stage,
            names.join(", ")
        )));
    };
    if cur.state == State::Fresh {
        println!(
            "{} is fresh: its key {} is in the cache (parameters, inputs and upstream outputs unchanged)",
            a.stage,
            short(&cur.key)
        );
        return Ok(());
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
    Ok(())
}

/// "12 unchanged" / "3 linked, 1 copied (1.2 MB), 8 unchanged".
fn published_words(s: &kiln::workspace::PublishStats) -> String {
    let mut parts = Vec::new();
    if s.reflinked > 0 {
        parts.push(format!("{} reflinked", s.reflinked));
    }
    if s.hardlinked > 0 {
        parts.push(format!("{} linked", s.hardlinked));
    }
    if s.copied > 0 {
        parts.push(format!(
            "{} copied ({})",
            s.copied,
            super::common::human_bytes(s.bytes_copied)
        ));
    }
    parts.push(format!("{} unchanged", s.kept));
    parts.join(", ")
}
