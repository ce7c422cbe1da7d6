//! `kiln.lock` beside the config (like Cargo.lock / dvc.lock): for every built stage its key,
//! everything the key hashed (params, resolved inputs — file digests, hub commits — and upstream
//! digests), the blake3 of its outputs, and the kiln version. One file per directory, a section
//! per config file, so several pipelines can live side by side.
//!
//! `kiln run` writes it; `kiln run --locked` checks the current plan against it without building
//! anything, and fails, naming each stage and why, when something would rebuild or a resolved
//! input differs from the lock.

use crate::cache::StageRecord;
use crate::scheduler::{explain, StageStatus, State};
use crate::workspace::{KilnError, Workspace};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = "kiln.lock";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockedStage {
    pub name: String,
    pub kind: String,
    pub key: String,
    /// blake3 over the entry's file list (path, size, blake3 of each file).
    pub output: String,
    pub version: u32,
    pub params: Value,
    pub inputs: Value,
    pub upstream: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfigLock {
    pub kiln_version: String,
    pub stages: Vec<LockedStage>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LockFile {
    pub version: u32,
    pub configs: BTreeMap<String, ConfigLock>,
}

impl LockedStage {
    fn record(&self) -> StageRecord {
        StageRecord {
            key: self.key.clone(),
            name: self.name.clone(),
            kind: self.kind.clone(),
            version: self.version,
            params: self.params.clone(),
            inputs: self.inputs.clone(),
            upstream: self.upstream.clone(),
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KilnError + '_ {
    crate::workspace::io_at(path)
}

/// `kiln.lock` in the config's directory, and the config's section name (its file name).
pub fn location(config: &Path) -> (PathBuf, String) {
    let dir = config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = config
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    (dir.join(LOCK_FILE), name)
}

pub fn read(path: &Path) -> Result<Option<LockFile>, KilnError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| KilnError::BadFile {
                path: path.to_path_buf(),
                message: format!("not a kiln lock file ({e})"),
                fix: "delete it and run `kiln run` to write a new one".into(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

/// The lock section for the current state: every fresh stage, in plan order.
pub fn current(ws: &Workspace, statuses: &[StageStatus]) -> Result<ConfigLock, KilnError> {
    let mut stages = Vec::new();
    for s in statuses {
        let (Some(key), Some(rec), State::Fresh) = (&s.key, &s.record, s.state) else {
            continue;
        };
        let Some(m) = ws.cache.manifest(key)? else {
            continue;
        };
        stages.push(LockedStage {
            name: s.name.clone(),
            kind: s.kind.clone(),
            key: key.clone(),
            output: m.digest,
            version: rec.version,
            params: rec.params.clone(),
            inputs: rec.inputs.clone(),
            upstream: rec.upstream.clone(),
        });
    }
    Ok(ConfigLock {
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        stages,
    })
}

/// Writes (or updates) this config's section; leaves the file untouched when nothing changed.
/// Returns the path when it was written.
pub fn write(ws: &Workspace) -> Result<Option<PathBuf>, KilnError> {
    let statuses = ws.scheduler().assess()?;
    let (path, section) = location(&ws.settings.config_path);
    let mut file = read(&path)?.unwrap_or(LockFile {
        version: 1,
        configs: BTreeMap::new(),
    });
    let now = current(ws, &statuses)?;
    if file.configs.get(&section) == Some(&now) {
        return Ok(None);
    }
    file.configs.insert(section, now);
    let mut bytes = serde_json::to_vec_pretty(&file).map_err(|e| KilnError::BadFile {
        path: path.clone(),
        message: format!("cannot encode the lock ({e})"),
        fix: "report this as a kiln bug".into(),
    })?;
    bytes.push(b'\n');
    // A unique temporary name: two runs updating the lock at once must both succeed.
    crate::workspace::write_atomic(&path, &bytes).map_err(crate::workspace::io_write(&path))?;
    Ok(Some(path))
}

/// One reason `--locked` fails.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LockProblem {
    pub stage: String,
    pub reason: String,
}

/// Compares the current plan with the lock without building anything.
pub fn check(ws: &Workspace) -> Result<Vec<LockProblem>, KilnError> {
    let (path, section) = location(&ws.settings.config_path);
    let Some(file) = read(&path)? else {
        return Err(KilnError::NoLock {
            message: format!("--locked: {} does not exist", path.display()),
            path,
            config: ws.settings.config_path.clone(),
        });
    };
    let Some(lock) = file.configs.get(&section) else {
        return Err(KilnError::NoLock {
            path: path.clone(),
            config: ws.settings.config_path.clone(),
            message: format!("--locked: {} has no entry for {section}", path.display()),
        });
    };
    let statuses = ws.scheduler().assess()?;
    let mut problems = Vec::new();
    for s in &statuses {
        let locked = lock.stages.iter().find(|l| l.name == s.name);
        let reason = match (locked, &s.key, &s.record) {
            (None, _, _) => Some("not in kiln.lock (a new stage)".to_string()),
            (Some(l), Some(key), Some(rec)) if *key != l.key => Some(format!(
                "differs from kiln.lock: {}",
                explain(&l.record(), rec)
            )),
            (Some(_), None, _) => Some(format!(
                "would rebuild: {}",
                s.reason.clone().unwrap_or_default()
            )),
            (Some(_), Some(_), _) if s.state == State::Stale => Some(format!(
                "would rebuild: {} (matches kiln.lock, but the cache has no entry)",
                s.reason.clone().unwrap_or_default()
            )),
            _ => None,
        };
        if let Some(reason) = reason {
            problems.push(LockProblem {
                stage: s.name.clone(),
                reason,
            });
        }
    }
    for l in &lock.stages {
        if !statuses.iter().any(|s| s.name == l.name) {
            problems.push(LockProblem {
                stage: l.name.clone(),
                reason: "in kiln.lock but no longer in the plan".into(),
            });
        }
    }
    Ok(problems)
}

/// What `kiln verify` found for one stage.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub stage: String,
    pub reproduced: bool,
    /// Files whose bytes differ from the locked build (when the original entry is available).
    pub differing: Vec<String>,
    pub seconds: f64,
}

fn link_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let to = dst.join(e.file_name());
        if e.file_type()?.is_dir() {
            link_tree(&e.path(), &to)?;
        } else if std::fs::hard_link(e.path(), &to).is_err() {
            std::fs::copy(e.path(), &to)?;
        }
    }
    Ok(())
}

/// Rebuilds `stages` (names or kinds; empty = every locked stage except fetches) in a scratch
/// cache and compares their output digests with the lock. The other stages' entries are linked
/// in from the main cache, so only the chosen ones are rebuilt.
pub fn verify(
    ws: &Workspace,
    config: &Path,
    overrides: &[String],
    stages: &[String],
    emit: &mut dyn FnMut(crate::events::Event),
) -> Result<Vec<Verdict>, KilnError> {
    let (path, section) = location(config);
    let lock = read(&path)?
        .and_then(|f| f.configs.get(&section).cloned())
        .ok_or_else(|| KilnError::NoLock {
            path: path.clone(),
            config: config.to_path_buf(),
            message: format!(
                "verify: no kiln.lock entry for {section} in {}",
                path.display()
            ),
        })?;
    let chosen: Vec<&LockedStage> = lock
        .stages
        .iter()
        .filter(|l| {
            if stages.is_empty() {
                l.kind != "fetch"
            } else {
                stages.iter().any(|s| *s == l.name || *s == l.kind)
            }
        })
        .collect();
    if chosen.is_empty() {
        return Err(KilnError::BadFlag {
            flag: "--stages".into(),
            message: format!(
                "no locked stage matches {}; locked stages: {}",
                stages.join(", "),
                lock.stages
                    .iter()
                    .map(|l| l.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    let scratch = ws.cache.root().join("tmp").join(format!(
        "verify-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let result = (|| {
        // Seed the scratch cache with every other locked entry.
        let sc = crate::cache::Cache::open(&scratch)?;
        for l in &lock.stages {
            if chosen.iter().any(|c| c.name == l.name) {
                continue;
            }
            let src = ws.cache.entry_dir(&l.key);
            if src.exists() {
                link_tree(&src, &sc.entry_dir(&l.key)).map_err(io(&src))?;
            }
        }
        drop(sc);
        let sws = Workspace::open_in(config, overrides, Some(&scratch))?;
        let targets: Vec<String> = chosen.iter().map(|c| c.name.clone()).collect();
        let mut seconds: BTreeMap<String, f64> = BTreeMap::new();
        sws.scheduler().run(
            &crate::scheduler::RunOptions {
                targets,
                force: vec![],
                ..Default::default()
            },
            &mut |e| {
                if let crate::events::Event::StageFinished {
                    name, duration_ms, ..
                } = &e
                {
                    seconds.insert(name.clone(), *duration_ms as f64 / 1000.0);
                }
                emit(e)
            },
        )?;
        let st = sws.scheduler().assess()?;
        let mut verdicts = Vec::new();
        for c in &chosen {
            let key = st
                .iter()
                .find(|s| s.name == c.name)
                .and_then(|s| s.key.clone())
                .unwrap_or_default();
            let rebuilt = sws.cache.manifest(&key)?;
            let reproduced = rebuilt.as_ref().map(|m| m.digest == c.output) == Some(true);
            let mut differing = Vec::new();
            if let (false, Some(new), Some(old)) =
                (reproduced, rebuilt.as_ref(), ws.cache.manifest(&c.key)?)
            {
                for f in &new.files {
                    if old
                        .files
                        .iter()
                        .all(|o| o.path != f.path || o.blake3 != f.blake3)
                    {
                        differing.push(f.path.clone());
                    }
                }
                for o in &old.files {
                    if new.files.iter().all(|f| f.path != o.path) {
                        differing.push(format!("{} (missing)", o.path));
                    }
                }
            }
            verdicts.push(Verdict {
                stage: c.name.clone(),
                reproduced,
                differing,
                seconds: seconds.get(&c.name).copied().unwrap_or(0.0),
            });
        }
        Ok(verdicts)
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}
