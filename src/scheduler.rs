//! Decides what is fresh and what is stale (and why), and builds the stale stages in dependency
//! order: lock the key, build in a staging directory, publish atomically, record. Knows nothing
//! about what stages compute.

use crate::cache::{Cache, CacheError, Index, Manifest, StageRecord};
use crate::events::Event;
use crate::plan::{dep_digest, stage_key, Dep, Plan, PlanError};
use crate::stages::{RunCx, StageError, Upstream};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// `message` is `error` as the user should read it: kiln's cache paths replaced by the
    /// user's files they were fetched from (see `shown_paths`). `error` is not a `#[source]`, so
    /// the cache paths in it are never printed as a cause.
    #[error("stage {name} failed: {message}")]
    StageFailed {
        name: String,
        message: String,
        error: Box<StageError>,
    },
    #[error("{0}")]
    Usage(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Fresh,
    Stale,
}

/// One stage's standing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StageStatus {
    pub name: String,
    pub kind: String,
    /// None while an upstream stage is not built (the key depends on its output).
    pub key: Option<String>,
    pub state: State,
    pub reason: Option<String>,
    pub deps: Vec<String>,
    /// Everything the key hashed (when the key is known): for lock files and explanations.
    #[serde(skip)]
    pub record: Option<StageRecord>,
}

#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    pub targets: Vec<String>,
    pub force: Vec<String>,
    /// On a failed stage, keep building everything that does not depend on it (sweeps: one
    /// failed variant does not stop the others); failures are listed in the summary.
    pub keep_going: bool,
    /// Stages built at once (0 or 1 = one at a time).
    pub jobs: usize,
    /// Of those, train stages at once (0 = 1): each uses every core.
    pub train_jobs: usize,
}

#[derive(Debug, Default, Clone)]
pub struct RunSummary {
    pub built: Vec<String>,
    pub fresh: Vec<String>,
    /// With `keep_going`: stages that failed, with the error.
    pub failed: Vec<(String, String)>,
    /// With `keep_going`: stages not attempted because an upstream stage failed.
    pub skipped: Vec<String>,
}

pub struct Scheduler<'a> {
    pub plan: &'a Plan,
    pub cache: &'a Cache,
    pub index: &'a Index,
    /// Identifies the config for "what changed since last time" (its canonical path).
    pub config_id: String,
}

fn short(v: &Value) -> Option<String> {
    let s = match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f != 0.0 && (f.abs() < 1e-3 || f.abs() >= 1e6) => {
                format!("{f:e}")
            }
            _ => n.to_string(),
        },
        Value::String(s) => s.clone(),
        Value::Null => "unset".into(),
        other => other.to_string(),
    };
    (s.len() <= 48 && !s.contains('\n')).then_some(s)
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, x, out);
            }
        }
        _ => {
            out.insert(prefix.to_string(), v.clone());
        }
    }
}

/// Why `now` differs from `before` (the last record of the same stage name for this config).
pub fn explain(before: &StageRecord, now: &StageRecord) -> String {
    let mut reasons = Vec::new();
    if before.version != now.version {
        reasons.push(format!(
            "stage implementation changed (v{} → v{})",
            before.version, now.version
        ));
    }
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &before.params, &mut a);
    flatten("", &now.params, &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    // Across implementation versions a setting may be renamed or newly recorded: only values
    // that both records hold are compared then.
    let same_version = before.version == now.version;
    // A fetch stage's `files` describe its resolved inputs, which the input reasons below name
    // better ("input file data/x.jsonl changed"): they are only reported when nothing else is.
    let mut files_changed = false;
    for k in keys {
        let (x, y) = (a.get(k), b.get(k));
        if !same_version && (x.is_none() || y.is_none()) {
            continue;
        }
        if x != y {
            if k == "files" {
                files_changed = true;
                continue;
            }
            let show = |v: Option<&Value>| v.map(short).unwrap_or(Some("unset".into()));
            match (show(x), show(y)) {
                (Some(x), Some(y)) => reasons.push(format!("{k} changed {x} → {y}")),
                _ => reasons.push(format!("{k} changed")),
            }
        }
    }
    let obj = |v: &Value| v.as_object().cloned().unwrap_or_default();
    let (ia, ib) = (obj(&before.inputs), obj(&now.inputs));
    let field = |v: &Value, f: &str| v.get(f).and_then(|x| x.as_str()).unwrap_or("").to_string();
    for (id, v) in &ib {
        let label = field(v, "label");
        let what = if id.starts_with("hub:") {
            "hub revision"
        } else {
            "input file"
        };
        match ia.get(id) {
            None => reasons.push(format!("{what} {label} added")),
            Some(old) if field(old, "digest") != field(v, "digest") => {
                if id.starts_with("hub:") {
                    reasons.push(format!(
                        "{what} {label} moved to commit {}",
                        field(v, "digest")
                    ));
                } else {
                    reasons.push(format!("{what} {label} changed"));
                }
            }
            _ => {}
        }
    }
    for (id, v) in &ia {
        if !ib.contains_key(id) {
            reasons.push(format!("input {} removed", field(v, "label")));
        }
    }
    let (ua, ub) = (obj(&before.upstream), obj(&now.upstream));
    for (k, v) in &ub {
        if ua.get(k) != Some(v) {
            reasons.push(format!("upstream {k} changed"));
        }
    }
    if reasons.is_empty() && files_changed {
        reasons.push("the files it fetches changed".into());
    }
    if reasons.is_empty() {
        "cache entry missing (removed by gc or quarantined)".into()
    } else {
        reasons.join("; ")
    }
}

enum Outcome {
    Done(RunSummary),
    Restart,
}

impl Scheduler<'_> {
    fn record(
        &self,
        i: usize,
        key: &str,
        upstream: &[(String, String)],
    ) -> Result<StageRecord, SchedError> {
        let s = &self.plan.stages[i];
        let params = s.stage.params().map_err(|error| SchedError::StageFailed {
            name: s.name.clone(),
            message: error.to_string(),
            error: Box::new(error),
        })?;
        Ok(StageRecord {
            key: key.to_string(),
            name: s.name.clone(),
            kind: s.kind().as_str().to_string(),
            version: s.stage.version(),
            params,
            inputs: serde_json::to_value(&s.inputs).unwrap_or(Value::Null),
            upstream: Value::Object(
                upstream
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect(),
            ),
        })
    }

    /// Fresh/stale and the reason for every stage, without building anything.
    pub fn assess(&self) -> Result<Vec<StageStatus>, SchedError> {
        let n = self.plan.stages.len();
        // Each entry's manifest read once per assessment (a sweep's shared stages are upstream
        // of every variant).
        let mut manifests: std::collections::HashMap<String, Option<Manifest>> = Default::default();
        let mut manifest = |k: &str| -> Result<Option<Manifest>, CacheError> {
            if let Some(m) = manifests.get(k) {
                return Ok(m.clone());
            }
            let m = self.cache.manifest(k)?;
            manifests.insert(k.to_string(), m.clone());
            Ok(m)
        };
        let mut keys: Vec<Option<String>> = vec![None; n];
        let mut out: Vec<Option<StageStatus>> = vec![None; n];
        for &i in &self.plan.order {
            let s = &self.plan.stages[i];
            let deps: Vec<String> = s
                .deps
                .iter()
                .map(|d| self.plan.stages[d.stage].name.clone())
                .collect();
            // Upstream digests as this stage reads them (selected files), if upstream is built.
            let mut upstream = Vec::new();
            let mut waiting = None;
            for d in &s.deps {
                match &keys[d.stage] {
                    Some(k) if out[d.stage].as_ref().map(|x| x.state) == Some(State::Fresh) => {
                        match manifest(k)?.map(|m| dep_digest(&m, d)) {
                            Some(dig) => {
                                upstream.push((self.plan.stages[d.stage].name.clone(), dig))
                            }
                            None => waiting = Some(d.stage),
                        }
                    }
                    _ => {
                        waiting.get_or_insert(d.stage);
                    }
                }
            }
            let status = if let Some(w) = waiting {
                StageStatus {
                    name: s.name.clone(),
                    kind: s.kind().as_str().into(),
                    key: None,
                    state: State::Stale,
                    reason: Some(format!("waiting on {}", self.plan.stages[w].name)),
                    deps,
                    record: None,
                }
            } else {
                let key = stage_key(s, &upstream)?;
                let fresh = manifest(&key)?.is_some();
                let record = self.record(i, &key, &upstream)?;
                let reason = if fresh {
                    None
                } else {
                    Some(match self.index.last_seen(&self.config_id, &s.name)? {
                        None => "never built".to_string(),
                        Some(before) => explain(&before, &record),
                    })
                };
                keys[i] = Some(key.clone());
                StageStatus {
                    name: s.name.clone(),
                    kind: s.kind().as_str().into(),
                    key: Some(key),
                    state: if fresh { State::Fresh } else { State::Stale },
                    reason,
                    deps,
                    record: Some(record),
                }
            };
            out[i] = Some(status);
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Builds every stale stage the targets need, in dependency order.
    pub fn run(
        &self,
        opts: &RunOptions,
        emit: &mut dyn FnMut(Event),
    ) -> Result<RunSummary, SchedError> {
        self.cache.clean_tmp()?;
        for f in &opts.force {
            if self.plan.index_of(f).is_none() && crate::stages::StageKind::parse(f).is_none() {
                return Err(SchedError::Plan(PlanError::UnknownTarget(
                    f.clone(),
                    String::new(),
                )));
            }
        }
        // A corrupt upstream entry is quarantined and the run starts over, at most once per stage.
        for _ in 0..=self.plan.stages.len() {
            match self.run_once(opts, emit)? {
                Outcome::Done(s) => return Ok(s),
                Outcome::Restart => continue,
            }
        }
        Err(SchedError::Usage(
            "cache entries keep failing verification; check the disk".into(),
        ))
    }

    /// Builds what the targets need. Up to `opts.jobs` stages run at once (at most
    /// `opts.train_jobs` of them train stages, which use every core); the main thread keeps all
    /// bookkeeping — keys, locks, publishing, the index, events — and workers only run stages.
    fn run_once(
        &self,
        opts: &RunOptions,
        emit: &mut dyn FnMut(Event),
    ) -> Result<Outcome, SchedError> {
        let need = self.plan.closure(&opts.targets)?;
        let forced: Vec<bool> = self
            .plan
            .stages
            .iter()
            .map(|s| {
                opts.force
                    .iter()
                    .any(|f| f == &s.name || f == s.kind().as_str())
            })
            .collect();
        let n = self.plan.stages.len();
        let jobs = opts.jobs.max(1);
        let train_jobs = opts.train_jobs.max(1);
        let mut keys: Vec<Option<String>> = vec![None; n];
        let mut blocked = vec![false; n];
        let mut done = vec![false; n];
        let mut summary = RunSummary::default();
        let mut running: std::collections::HashMap<usize, Building> = Default::default();
        // Set on a corrupt upstream entry or a failure without keep_going: launch nothing more,
        // let running stages finish, then stop.
        let mut stop: Option<Result<Outcome, SchedError>> = None;
        let (tx, rx) = std::sync::mpsc::channel::<(usize, Msg)>();
        std::thread::scope(|scope| -> Result<Outcome, SchedError> {
            loop {
                // Launch (or settle) every stage whose upstream is done, in plan order.
                let mut progressed = true;
                while progressed && stop.is_none() {
                    progressed = false;
                    for &i in &self.plan.order {
                        if !need[i] || done[i] || blocked[i] || running.contains_key(&i) {
                            continue;
                        }
                        let s = &self.plan.stages[i];
                        if let Some(d) = s.deps.iter().find(|d| blocked[d.stage]) {
                            blocked[i] = true;
                            emit(Event::Warning {
                                message: format!(
                                    "skipping {}: {} did not build",
                                    s.name, self.plan.stages[d.stage].name
                                ),
                            });
                            summary.skipped.push(s.name.clone());
                            progressed = true;
                            continue;
                        }
                        if !s.deps.iter().all(|d| done[d.stage]) {
                            continue;
                        }
                        let is_train = s.stage.uses_all_cores();
                        let trains = running.values().filter(|b| b.train).count();
                        let slot = running.len() < jobs && (!is_train || trains < train_jobs);
                        match self.prepare(i, &keys, forced[i], slot, &mut summary, emit)? {
                            Prep::Fresh(key) => {
                                keys[i] = Some(key);
                                done[i] = true;
                                progressed = true;
                            }
                            Prep::NoSlot => {}
                            Prep::Restart => {
                                stop = Some(Ok(Outcome::Restart));
                                break;
                            }
                            Prep::Build(bj) => {
                                let (b, job) = *bj;
                                let tx = tx.clone();
                                scope.spawn(move || {
                                    let mut send = |e: Event| {
                                        let _ = tx.send((i, Msg::Event(e)));
                                    };
                                    let mut cx = RunCx {
                                        name: &s.name,
                                        key: &job.key,
                                        out: &job.out,
                                        work: &job.work,
                                        upstream: &job.upstream,
                                        emit: &mut send,
                                    };
                                    let r = s.stage.run(&mut cx);
                                    let _ = tx.send((i, Msg::Done(r)));
                                });
                                running.insert(i, b);
                                progressed = true;
                            }
                        }
                    }
                }
                if running.is_empty() {
                    return stop.unwrap_or(Ok(Outcome::Done(std::mem::take(&mut summary))));
                }
                let Ok((i, msg)) = rx.recv() else {
                    return Err(SchedError::Usage(
                        "internal: a stage worker vanished".into(),
                    ));
                };
                match msg {
                    Msg::Event(e) => {
                        if let (
                            Event::Metric {
                                step, name, value, ..
                            },
                            Some(b),
                        ) = (&e, running.get(&i))
                        {
                            // Metrics are history, not output: a failed write must not fail
                            // the stage.
                            let _ = self.index.add_metric(&b.key, *step as i64, name, *value);
                        }
                        emit(e)
                    }
                    Msg::Done(result) => {
                        let Some(b) = running.remove(&i) else {
                            continue;
                        };
                        let s = &self.plan.stages[i];
                        match result {
                            Ok(()) => {
                                let key = self.publish(i, b, emit)?;
                                summary.built.push(s.name.clone());
                                keys[i] = Some(key);
                                done[i] = true;
                            }
                            Err(error) => {
                                let message = shown(&error.to_string(), &b.shown);
                                emit(Event::StageFailed {
                                    name: s.name.clone(),
                                    error: message.clone(),
                                });
                                blocked[i] = true;
                                if opts.keep_going {
                                    summary.failed.push((s.name.clone(), message));
                                } else if stop.is_none() {
                                    stop = Some(Err(SchedError::StageFailed {
                                        name: s.name.clone(),
                                        message,
                                        error: Box::new(error),
                                    }));
                                }
                            }
                        }
                    }
                }
            }
        })
    }

    /// Computes stage `i`'s key; reuses a finished entry, or (when `slot`) verifies upstream,
    /// takes the key's lock, creates the staging directory and says why it builds.
    fn prepare(
        &self,
        i: usize,
        keys: &[Option<String>],
        forced: bool,
        slot: bool,
        summary: &mut RunSummary,
        emit: &mut dyn FnMut(Event),
    ) -> Result<Prep, SchedError> {
        let s = &self.plan.stages[i];
        let mut upstream = Vec::new();
        let mut ups = Vec::new();
        for d in &s.deps {
            let k = keys[d.stage].clone().ok_or_else(|| {
                SchedError::Usage(format!(
                    "internal: {} ran before {}",
                    s.name, self.plan.stages[d.stage].name
                ))
            })?;
            let m = self.cache.manifest(&k)?.ok_or_else(|| {
                SchedError::Usage(format!(
                    "internal: entry of {} vanished",
                    self.plan.stages[d.stage].name
                ))
            })?;
            upstream.push((self.plan.stages[d.stage].name.clone(), dep_digest(&m, d)));
            ups.push((d, k, m));
        }
        let key = stage_key(s, &upstream)?;
        let rec = self.record(i, &key, &upstream)?;
        let up_keys: Vec<String> = ups.iter().map(|(_, k, _)| k.clone()).collect();
        // Reuse a finished entry: checked before taking the lock, and again after it, since
        // another kiln process may have built the key while we waited.
        let mut reuse = |key: &String| -> Result<bool, SchedError> {
            if forced || self.cache.manifest(key)?.is_none() {
                return Ok(false);
            }
            emit(Event::StageFresh {
                name: s.name.clone(),
                key: key.clone(),
            });
            self.index.record_seen(&self.config_id, &rec)?;
            self.index.record_edges(key, &up_keys)?;
            summary.fresh.push(s.name.clone());
            Ok(true)
        };
        if reuse(&key)? {
            return Ok(Prep::Fresh(key));
        }
        if !slot {
            return Ok(Prep::NoSlot);
        }
        // Verify exactly what this stage will read from upstream.
        for (d, k, m) in &ups {
            let damage = self.cache.verify_files_stamped(k, m, d.files, self.index);
            if !damage.is_empty() {
                let name = self.plan.stages[d.stage].name.clone();
                emit(Event::Corrupt {
                    name,
                    key: k.clone(),
                    damage: damage.iter().map(|x| x.to_string()).collect(),
                });
                self.cache.quarantine(k)?;
                self.index.forget_stage(k)?;
                return Ok(Prep::Restart);
            }
        }
        let lock = self.cache.lock(&key)?;
        if reuse(&key)? {
            return Ok(Prep::Fresh(key));
        }
        let reason = if forced {
            "forced (--force)".to_string()
        } else {
            match self.index.last_seen(&self.config_id, &s.name)? {
                None => "never built".into(),
                Some(before) => explain(&before, &rec),
            }
        };
        let previous_digest = match self.index.last_seen(&self.config_id, &s.name)? {
            Some(b) => self.cache.manifest(&b.key).ok().flatten().map(|m| m.digest),
            None => None,
        };
        emit(Event::StageStarted {
            name: s.name.clone(),
            key: key.clone(),
            reason,
        });
        let staging = self.cache.staging(&key)?;
        let work = self.cache.work_dir(&key)?;
        let shown = self.shown_paths(i, &ups, staging.dir(), &work);
        let job = Job {
            key: key.clone(),
            out: staging.dir().to_path_buf(),
            work,
            upstream: ups
                .into_iter()
                .map(|(d, k, m)| Upstream {
                    name: self.plan.stages[d.stage].name.clone(),
                    dir: self.cache.entry_dir(&k),
                    manifest: m,
                })
                .collect(),
        };
        Ok(Prep::Build(Box::new((
            Building {
                key,
                rec,
                up_keys,
                staging,
                previous_digest,
                started: Instant::now(),
                train: s.stage.uses_all_cores(),
                shown,
                _lock: lock,
            },
            job,
        ))))
    }

    /// What stage `i`'s errors call the cache paths it uses: a fetched file is the user's file it
    /// was fetched from (`models/tiny/config.json`, not `objects/<key>/config.json`); any other
    /// upstream entry is `[stage]` (a fetch stage's own copies are the user's files too), the
    /// stage's own output `[stage, being built]` and its work
    /// directory `[stage, checkpoints]`. Longest paths first, so a file wins over its directory.
    fn shown_paths(
        &self,
        i: usize,
        ups: &[(&Dep, String, Manifest)],
        staging: &std::path::Path,
        work: &std::path::Path,
    ) -> Vec<(String, String)> {
        let name = &self.plan.stages[i].name;
        let mut out = Vec::new();
        for (d, k, _) in ups {
            let up = &self.plan.stages[d.stage];
            let dir = self.cache.entry_dir(k);
            for (id, input) in &up.inputs {
                if !id.starts_with("hub:") {
                    out.push((dir.join(id).display().to_string(), input.label.clone()));
                }
            }
            out.push((dir.display().to_string(), format!("[{}]", up.name)));
        }
        // A fetch stage's own copies, while it checks them.
        for (id, input) in &self.plan.stages[i].inputs {
            if !id.starts_with("hub:") {
                out.push((staging.join(id).display().to_string(), input.label.clone()));
            }
        }
        out.push((
            staging.display().to_string(),
            format!("[{name}, being built]"),
        ));
        out.push((work.display().to_string(), format!("[{name}, checkpoints]")));
        out.sort_by_key(|(from, _)| std::cmp::Reverse(from.len()));
        out
    }

    /// Publishes a finished build and records it.
    fn publish(
        &self,
        i: usize,
        b: Building,
        emit: &mut dyn FnMut(Event),
    ) -> Result<String, SchedError> {
        let s = &self.plan.stages[i];
        let manifest = self.cache.publish(b.staging, &s.name, s.kind().as_str())?;
        self.cache.remove_work_dir(&b.key);
        let ms = b.started.elapsed().as_millis() as u64;
        self.index.record_stage(
            &b.rec,
            &manifest.digest,
            ms,
            manifest.total_size(),
            &self.config_id,
        )?;
        self.index.record_seen(&self.config_id, &b.rec)?;
        self.index.record_edges(&b.key, &b.up_keys)?;
        emit(Event::StageFinished {
            name: s.name.clone(),
            key: b.key.clone(),
            duration_ms: ms,
            bytes: manifest.total_size(),
        });
        if b.previous_digest.as_deref() == Some(manifest.digest.as_str()) {
            emit(Event::EarlyCutoff {
                name: s.name.clone(),
            });
        }
        Ok(b.key)
    }
}

/// A stage being built: what the main thread keeps until the worker is done.
struct Building {
    key: String,
    rec: StageRecord,
    up_keys: Vec<String>,
    staging: crate::cache::Staging,
    previous_digest: Option<String>,
    started: Instant,
    train: bool,
    /// Cache paths this stage reads or writes, and what its error messages call them.
    shown: Vec<(String, String)>,
    _lock: crate::cache::KeyLock,
}

/// `message` with each cache path of `paths` replaced by its name (longest first).
fn shown(message: &str, paths: &[(String, String)]) -> String {
    let mut out = message.to_string();
    for (from, to) in paths {
        if out.contains(from.as_str()) {
            out = out.replace(from.as_str(), to);
        }
    }
    out
}

/// What a worker needs to run a stage.
struct Job {
    key: String,
    out: std::path::PathBuf,
    work: std::path::PathBuf,
    upstream: Vec<Upstream>,
}

enum Prep {
    Fresh(String),
    NoSlot,
    Restart,
    Build(Box<(Building, Job)>),
}

enum Msg {
    Event(Event),
    Done(Result<(), StageError>),
}
