//! Opens everything one command needs: the config, the cache and its index, the plan. The CLI
//! and the tests both go through here.

use crate::cache::{Cache, CacheError, FileHashCache, Index};
use crate::config::{self, ConfigError, Problem, Settings};
use crate::data::binfmt::TokenSet;
use crate::model::engine::Engine;
use crate::plan::{self, Plan, PlanError};
use crate::scheduler::{SchedError, Scheduler, State};
use crate::stages::pack::PackStats;
use crate::stages::AnyStage;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KilnError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Sched(#[from] SchedError),
    #[error(transparent)]
    Stage(#[from] crate::stages::StageError),
    /// A file kiln reads or writes outside the cache (output_dir, kiln.lock, bench scratch).
    #[error("{}", crate::ioerr::describe("", path, source))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Writing a file outside the cache failed (a full disk says so).
    #[error("{}", crate::ioerr::describe("cannot write", path, source))]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file that exists but is not what kiln expects there.
    #[error("{path}: {message}; {fix}")]
    BadFile {
        path: PathBuf,
        message: String,
        fix: String,
    },
    /// The command names a stage the config does not plan.
    #[error("{config}: no `{stage}` stage; {fix}")]
    NoStage {
        config: PathBuf,
        stage: String,
        fix: String,
    },
    /// The command needs a stage's output and it is not in the cache (or is stale).
    #[error("{stage} is not built (or is stale); {fix}")]
    NotBuilt { stage: String, fix: String },
    /// `--locked` / `kiln verify` without a lock (at `path`) to check against.
    #[error("{message}; run `kiln run {config}` once and commit kiln.lock")]
    NoLock {
        path: PathBuf,
        config: PathBuf,
        message: String,
    },
    /// A flag names something that does not exist (a stage to verify, a benchmark case).
    #[error("{flag}: {message}")]
    BadFlag { flag: String, message: String },
    /// A benchmark's own run failed.
    #[error("bench: {0}")]
    Bench(String),
    /// A fresh entry failed its manifest's digests when read; it was moved to
    /// `cache/quarantine/` and the stage is stale again.
    #[error("{stage}: its cache entry {} is corrupt ({}); it was quarantined — {fix}", &key[..key.len().min(12)], damage.join(", "))]
    Corrupt {
        stage: String,
        key: String,
        damage: Vec<String>,
        fix: String,
    },
}

impl KilnError {
    /// True when the user's input (the config, a flag) is wrong — exit code 2 — rather than a
    /// build or run failing (exit code 1).
    pub fn is_usage(&self) -> bool {
        match self {
            KilnError::Config(_)
            | KilnError::Plan(_)
            | KilnError::Sched(SchedError::Plan(_))
            | KilnError::NoStage { .. }
            | KilnError::BadFlag { .. } => true,
            KilnError::Cache(_)
            | KilnError::Sched(_)
            | KilnError::Stage(_)
            | KilnError::Io { .. }
            | KilnError::Write { .. }
            | KilnError::BadFile { .. }
            | KilnError::NotBuilt { .. }
            | KilnError::NoLock { .. }
            | KilnError::Corrupt { .. }
            | KilnError::Bench(_) => false,
        }
    }
}

/// Maps an I/O error on `path` to [`KilnError::Io`].
pub fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> KilnError + '_ {
    move |source| KilnError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One configuration of the workspace: the config itself, or one point of its `sweep:`.
pub struct VariantView {
    /// None when the config has no sweep.
    pub id: Option<String>,
    pub label: String,
    /// The swept keys and values (`learning_rate`, `0.0001`), sorted by key.
    pub values: Vec<(String, String)>,
    pub settings: Settings,
    /// The variant's own stage names (`train`) → names in the merged plan (`train@1a2b3c4d`).
    pub names: Vec<(String, String)>,
}

impl VariantView {
    /// The plan name of this variant's stage `base` (`train` → `train@1a2b3c4d`).
    pub fn stage(&self, base: &str) -> Option<&str> {
        self.names
            .iter()
            .find(|(b, _)| b == base)
            .map(|(_, m)| m.as_str())
    }
}

pub struct Workspace {
    /// The first variant's settings (all of them when there is no sweep).
    pub settings: Settings,
    pub variants: Vec<VariantView>,
    pub warnings: Vec<Problem>,
    pub cache: Cache,
    pub index: Index,
    pub plan: Plan,
    pub config_id: String,
    /// Set when a command narrowed a sweep to one variant (`--variant`): recorded with runs.
    pub variant: Option<String>,
}

/// Cache location: `KILN_CACHE`, else the config's `cache_dir`, else `./cache`.
pub fn cache_root(settings: Option<&Settings>) -> PathBuf {
    if let Ok(p) = std::env::var("KILN_CACHE") {
        if !p.is_empty() {
            return PathBuf::from(p);
        }
    }
    settings
        .and_then(|s| s.cache_dir.clone())
        .unwrap_or_else(|| PathBuf::from("cache"))
}

impl Workspace {
    pub fn open(config_path: &Path, overrides: &[String]) -> Result<Self, KilnError> {
        Self::open_in(config_path, overrides, None)
    }

    /// [`Workspace::open`] with the cache at `cache_dir` instead of the configured one (`kiln
    /// verify` rebuilds in a scratch cache).
    pub fn open_in(
        config_path: &Path,
        overrides: &[String],
        cache_dir: Option<&Path>,
    ) -> Result<Self, KilnError> {
        let loaded = config::load_variants(config_path, overrides)?;
        let first = &loaded[0].1.settings;
        let root = cache_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| cache_root(Some(first)));
        let cache = Cache::open(&root)?;
        let index = cache.index()?;
        let hashes = FileHashCache { index: &index };
        let mut plans = Vec::with_capacity(loaded.len());
        for (v, l) in &loaded {
            let id = v.as_ref().map(|v| v.id.clone()).unwrap_or_default();
            plans.push((id, plan::build(&l.settings, &hashes)?));
        }
        let own_names: Vec<Vec<String>> = plans
            .iter()
            .map(|(_, p)| p.stages.iter().map(|s| s.name.clone()).collect())
            .collect();
        let (plan, maps) = if plans.len() == 1 {
            let (_, p) = plans.pop().ok_or_else(|| KilnError::NoStage {
                config: config_path.to_path_buf(),
                stage: "plan".into(),
                fix: "the config produced no plan".into(),
            })?;
            let map = (0..p.stages.len()).collect();
            (p, vec![map])
        } else {
            plan::merge(plans)?
        };
        let mut warnings = Vec::new();
        let mut variants = Vec::with_capacity(loaded.len());
        for (((v, l), map), own) in loaded.into_iter().zip(maps).zip(own_names) {
            for w in l.warnings {
                if !warnings.contains(&w) {
                    warnings.push(w);
                }
            }
            let values = v
                .as_ref()
                .map(|v| {
                    v.sets
                        .iter()
                        .map(|(k, x)| (k.clone(), crate::config::sweep::show(x)))
                        .collect()
                })
                .unwrap_or_default();
            variants.push(VariantView {
                id: v.as_ref().map(|v| v.id.clone()),
                values,
                label: v.map(|v| v.label).unwrap_or_default(),
                settings: l.settings,
                names: own
                    .into_iter()
                    .zip(map)
                    .map(|(n, i)| (n, plan.stages[i].name.clone()))
                    .collect(),
            });
        }
        let config_id = std::fs::canonicalize(config_path)
            .unwrap_or_else(|_| config_path.to_path_buf())
            .display()
            .to_string();
        Ok(Self {
            settings: variants[0].settings.clone(),
            variants,
            warnings,
            cache,
            index,
            plan,
            config_id,
            variant: None,
        })
    }

    /// What `kiln runs` shows in its variant column: the chosen variant, "sweep of N variants",
    /// or "" for a plain config.
    pub fn run_label(&self) -> String {
        match &self.variant {
            Some(v) => v.clone(),
            None if self.is_sweep() => format!("sweep of {} variants", self.variants.len()),
            None => String::new(),
        }
    }

    /// Whether the config is a sweep (more than one variant, or a `sweep:` with one point).
    pub fn is_sweep(&self) -> bool {
        self.variants.iter().any(|v| v.id.is_some())
    }

    pub fn scheduler(&self) -> Scheduler<'_> {
        Scheduler {
            plan: &self.plan,
            cache: &self.cache,
            index: &self.index,
            config_id: self.config_id.clone(),
        }
    }

    /// The published entry directory of a stage, if it is fresh (verified first).
    pub fn entry_of(&self, name: &str) -> Result<PathBuf, KilnError> {
        Ok(self.fresh_entry(name)?.0)
    }

    /// A fresh stage's entry directory and manifest, verified.
    fn fresh_entry(&self, name: &str) -> Result<(PathBuf, crate::cache::Manifest), KilnError> {
        let st = self.scheduler().assess()?;
        self.fresh_entry_in(&st, name)
    }

    /// As [`Workspace::fresh_entry`], with the plan already assessed (publishing a sweep's
    /// outputs assesses once, not once per stage published).
    fn fresh_entry_in(
        &self,
        st: &[crate::scheduler::StageStatus],
        name: &str,
    ) -> Result<(PathBuf, crate::cache::Manifest), KilnError> {
        let s = st
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| KilnError::NoStage {
                config: self.settings.config_path.clone(),
                stage: name.to_string(),
                fix: format!(
                    "its stages are {}",
                    st.iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
        match (&s.key, s.state) {
            (Some(k), State::Fresh) => {
                let m = self.verify_entry(name, k)?;
                Ok((self.cache.entry_dir(k), m))
            }
            _ => Err(KilnError::NotBuilt {
                stage: name.to_string(),
                fix: format!(
                    "run `kiln run {} --target {name}` first",
                    self.settings.config_path.display()
                ),
            }),
        }
    }

    /// A stage's entry directory when it is built and fresh; `Ok(None)` when it is not built,
    /// an error when it is corrupt (quarantined) or cannot be assessed.
    pub fn entry_if_built(&self, name: &str) -> Result<Option<PathBuf>, KilnError> {
        match self.entry_of(name) {
            Ok(d) => Ok(Some(d)),
            Err(KilnError::NotBuilt { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Checks a fresh entry against its manifest before it is read (files unchanged since their
    /// last check cost a `stat` and an index lookup); a damaged one is quarantined, forgotten by
    /// the index, and reported naming the stage and files.
    fn verify_entry(&self, name: &str, key: &str) -> Result<crate::cache::Manifest, KilnError> {
        let Some(m) = self.cache.manifest(key)? else {
            return Err(KilnError::NotBuilt {
                stage: name.to_string(),
                fix: format!(
                    "run `kiln run {} --target {name}` first",
                    self.settings.config_path.display()
                ),
            });
        };
        let damage = self.cache.verify_files_stamped(key, &m, None, &self.index);
        if damage.is_empty() {
            return Ok(m);
        }
        self.cache.quarantine(key)?;
        self.index.forget_stage(key)?;
        Err(KilnError::Corrupt {
            stage: name.to_string(),
            key: key.to_string(),
            damage: damage.iter().map(|d| d.to_string()).collect(),
            fix: format!(
                "run `kiln run {}` to rebuild it",
                self.settings.config_path.display()
            ),
        })
    }

    /// Every variant's `output_dir`, each once.
    pub fn output_dirs(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self
            .variants
            .iter()
            .map(|x| resolve_output_dir(&x.settings))
            .collect();
        v.dedup();
        v
    }

    /// `output_dir` resolved against the config's directory (the first variant's).
    pub fn output_dir(&self) -> PathBuf {
        resolve_output_dir(&self.settings)
    }

    /// Copies the final artifacts into `output_dir` (each sweep variant's own), the layout
    /// Axolotl users know: the train stage's adapter at the top, the merged model in `merged/`,
    /// evaluation results in `eval/`, exports in `export/<format>.<quant>/`. `output_dir` is a
    /// view: the cache entry stays the source of truth. Returns the (first) directory written,
    /// or None when no such stage is built.
    pub fn materialize_outputs(&self) -> Result<Option<PathBuf>, KilnError> {
        Ok(self.publish_outputs()?.0)
    }

    /// As [`Workspace::materialize_outputs`], also saying how each file got there.
    pub fn publish_outputs(&self) -> Result<(Option<PathBuf>, PublishStats), KilnError> {
        let mut stats = PublishStats::default();
        let mut first = None;
        let st = self.scheduler().assess()?;
        for v in &self.variants {
            let out = resolve_output_dir(&v.settings);
            let mut views: Vec<(String, String)> = Vec::new();
            for (own, merged) in &v.names {
                let sub = match own.as_str() {
                    "train" => String::new(),
                    "merge" => "merged".into(),
                    "evaluate" => "eval".into(),
                    n => match n.strip_prefix("export.") {
                        Some(label) => format!("export/{label}"),
                        None => continue,
                    },
                };
                views.push((merged.clone(), sub));
            }
            for (stage, sub) in views {
                let dest = if sub.is_empty() {
                    out.clone()
                } else {
                    out.join(sub)
                };
                if self.publish_entry_in(&st, &stage, &dest, &mut stats)? {
                    first.get_or_insert(out.clone());
                }
            }
        }
        Ok((first, stats))
    }

    /// Publishes a built stage's entry into `dest` (verified first): a file already there as
    /// kiln last placed it (same stamp and digest, or the entry's own inode) is left alone;
    /// others are placed through a uniquely named temporary file and a rename — reflinked,
    /// else hard-linked to the read-only entry file, else copied (`KILN_LINK` narrows the
    /// order). Returns false when the stage is not built.
    pub fn publish_entry(
        &self,
        stage: &str,
        dest: &Path,
        stats: &mut PublishStats,
    ) -> Result<bool, KilnError> {
        let st = self.scheduler().assess()?;
        self.publish_entry_in(&st, stage, dest, stats)
    }

    fn publish_entry_in(
        &self,
        st: &[crate::scheduler::StageStatus],
        stage: &str,
        dest: &Path,
        stats: &mut PublishStats,
    ) -> Result<bool, KilnError> {
        let (src, m) = match self.fresh_entry_in(st, stage) {
            Ok(x) => x,
            Err(KilnError::NotBuilt { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        let links = link_order()?;
        // Markers of kiln versions that copied whole entries.
        let _ = std::fs::remove_file(dest.join(".kiln-entry"));
        let mut cleaned = std::collections::HashSet::new();
        for f in &m.files {
            let from = src.join(&f.path);
            let to = dest.join(&f.path);
            let parent = to.parent().unwrap_or(dest).to_path_buf();
            if cleaned.insert(parent.clone()) {
                remove_dead_tmp(&parent);
            }
            let abs = std::path::absolute(&to).unwrap_or_else(|_| to.clone());
            if let Ok(md) = std::fs::symlink_metadata(&to) {
                if md.is_file() && md.len() == f.size {
                    use std::os::unix::fs::MetadataExt;
                    let same_inode = std::fs::metadata(&from)
                        .is_ok_and(|s| s.ino() == md.ino() && s.dev() == md.dev());
                    let stamp = crate::cache::Stamp::of(&md);
                    if same_inode
                        || self.index.verified_digest(&abs, stamp)?.as_deref()
                            == Some(f.blake3.as_str())
                    {
                        stats.kept += 1;
                        continue;
                    }
                }
            }
            std::fs::create_dir_all(&parent).map_err(io_write(&parent))?;
            let tmp = unique_tmp(&to);
            let how = place(&from, &tmp, &links).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                io_write(&to)(e)
            })?;
            std::fs::rename(&tmp, &to).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                io_write(&to)(e)
            })?;
            // rename() of two hard links to one file (another run linked it first) succeeds
            // doing nothing: the temporary name would stay.
            if std::fs::symlink_metadata(&tmp).is_ok() {
                let _ = std::fs::remove_file(&tmp);
            }
            match how {
                Placed::Reflink => stats.reflinked += 1,
                Placed::Hardlink => stats.hardlinked += 1,
                Placed::Copy => {
                    stats.copied += 1;
                    stats.bytes_copied += f.size;
                }
            }
            if how != Placed::Hardlink {
                // kiln wrote these bytes from a verified entry just now: remember them, so the
                // next run leaves the file alone unless something changes it.
                if let Ok(md) = std::fs::metadata(&to) {
                    self.index
                        .record_own(&abs, crate::cache::Stamp::of(&md), &f.blake3)?;
                }
            }
        }
        Ok(true)
    }

    /// The model a user chats with: the merged model when the plan merges and it is built;
    /// else the base model with the trained adapter (or `lora_model_dir`) applied; else the
    /// base model alone when the config trains no adapter. Builds `fetch.model` if needed, never
    /// training. Returns the model, its tokenizer and a line saying what was loaded.
    /// A GGUF file (e.g. one `kiln export` wrote) ready to chat: its weights kept in their
    /// quantized formats, its tokenizer and chat template from its metadata.
    pub fn load_gguf_chat_model(
        path: &Path,
    ) -> Result<(Engine, crate::text::TextTokenizer, String), KilnError> {
        use crate::stages::StageError;
        let m = Engine::from_gguf(path).map_err(StageError::from)?;
        let tok = crate::text::TextTokenizer::from_gguf(path).map_err(StageError::from)?;
        let what = format!("{} (weights: {})", path.display(), m.weight_formats());
        Ok((m, tok, what))
    }

    pub fn load_chat_model(
        &self,
        lora_model_dir: Option<&Path>,
    ) -> Result<(Engine, crate::text::TextTokenizer, String), KilnError> {
        use crate::stages::train::load_model;
        let engine = |m: crate::model::Llama| Engine::from_llama(&m).map_err(StageError::from);
        use crate::stages::StageError;
        let device = candle_core::Device::Cpu;
        let tok_of = |d: &Path| crate::text::TextTokenizer::load_dir(d).map_err(StageError::from);
        if lora_model_dir.is_none() && self.plan.index_of("merge").is_some() {
            if let Some(dir) = self.entry_if_built("merge")? {
                let m = engine(load_model(&dir, &device)?)?;
                return Ok((m, tok_of(&dir)?, "merged model (merge stage)".into()));
            }
        }
        let model_dir = match self.entry_if_built("fetch.model")? {
            Some(d) => d,
            None => {
                self.scheduler().run(
                    &crate::scheduler::RunOptions {
                        targets: vec!["fetch.model".into()],
                        force: vec![],
                        ..Default::default()
                    },
                    &mut |_| {},
                )?;
                self.entry_of("fetch.model")?
            }
        };
        if lora_model_dir.is_none() && self.plan.index_of("train").is_some() {
            // A full fine-tune's output is the whole model.
            if let Some(dir) = self.entry_if_built("train")? {
                if !dir.join(crate::model::adapter::ADAPTER_CONFIG).exists() {
                    let m = engine(load_model(&dir, &device)?)?;
                    return Ok((
                        m,
                        tok_of(&dir)?,
                        "fully fine-tuned model (train stage)".into(),
                    ));
                }
            }
        }
        let adapter_dir = match lora_model_dir {
            Some(d) => Some(d.to_path_buf()),
            None if self.plan.index_of("train").is_some() => Some(
                self.entry_if_built("train")?
                    .ok_or_else(|| KilnError::NotBuilt {
                        stage: "train".into(),
                        fix: format!(
                            "run `kiln train {}` first, or pass --lora-model-dir DIR",
                            self.settings.config_path.display()
                        ),
                    })?,
            ),
            None => None,
        };
        let gguf = model_dir.join("model.gguf");
        let (model, tok_dir, what) = match &adapter_dir {
            Some(d) => {
                // Folded into the (f32) weights in memory: generation then costs what the base
                // model does.
                let mut model = load_model(&model_dir, &device)?;
                crate::model::adapter::PeftAdapter::load(d, &device)
                    .and_then(|a| a.merge_into(&mut model))
                    .map_err(StageError::from)?;
                let td = if d.join("tokenizer.json").exists() {
                    d.clone()
                } else {
                    model_dir.clone()
                };
                let what = format!("base model + LoRA adapter {}", d.display());
                (engine(model)?, td, what)
            }
            None if gguf.exists() => {
                let m = Engine::from_gguf(&gguf).map_err(StageError::from)?;
                let what = format!(
                    "base model (no adapter; GGUF weights: {})",
                    m.weight_formats()
                );
                (m, model_dir.clone(), what)
            }
            None => (
                engine(load_model(&model_dir, &device)?)?,
                model_dir.clone(),
                "base model (no adapter)".to_string(),
            ),
        };
        Ok((model, tok_of(&tok_dir)?, what))
    }

    /// `kiln train --debug`: one training step on the first bins, nothing published.
    pub fn debug_train_step(&self) -> Result<crate::stages::train::DebugStep, KilnError> {
        let no_train = || KilnError::NoStage {
            config: self.settings.config_path.clone(),
            stage: "train".into(),
            fix: "set `adapter: lora`, or no adapter for full fine-tuning".into(),
        };
        let i = self.plan.index_of("train").ok_or_else(no_train)?;
        let AnyStage::Train(t) = &self.plan.stages[i].stage else {
            return Err(no_train());
        };
        Ok(t.inputs
            .debug_step(&self.entry_of("fetch.model")?, &self.entry_of("pack")?)?)
    }

    pub fn pack_stats(&self) -> Result<PackStats, KilnError> {
        let dir = self.entry_of("pack")?;
        let p = dir.join("stats.json");
        let bytes = std::fs::read(&p).map_err(io_at(&p))?;
        serde_json::from_slice(&bytes).map_err(|e| KilnError::BadFile {
            path: p.clone(),
            message: format!("not pack statistics ({e})"),
            fix: "run `kiln cache verify --fix` and preprocess again".into(),
        })
    }

    /// The first `n` tokenized samples of each dataset, for the debug view.
    pub fn debug_examples(&self, n: usize) -> Result<Vec<DebugExample>, KilnError> {
        let model_dir = self.entry_of("fetch.model")?;
        let tok = crate::text::TextTokenizer::load_dir(&model_dir)
            .map_err(crate::stages::StageError::from)?;
        let mut out = Vec::new();
        for st in &self.plan.stages {
            let AnyStage::Tokenize(t) = &st.stage else {
                continue;
            };
            let dir = self.entry_of(&st.name)?;
            let set =
                TokenSet::read(&dir.join("tokens")).map_err(crate::stages::StageError::from)?;
            // Preference data: each record's chosen and rejected sequences.
            let samples: Vec<usize> = (0..set.units().min(n))
                .flat_map(|u| set.unit_samples(u))
                .collect();
            for i in samples {
                let (ids, trained) = set.sample(i);
                let text = tok.tokenizer.decode(ids, false).unwrap_or_default();
                let pieces = ids
                    .iter()
                    .map(|&id| tok.tokenizer.decode(&[id], false).unwrap_or_default())
                    .collect();
                let pieces = join_partial_characters(&tok, ids, pieces);
                out.push(DebugExample {
                    part: set.paired.then_some(match (set.labels.get(i / 2), i % 2) {
                        (None, 0) => "chosen",
                        (None, _) => "rejected",
                        (Some(1), 0) => "desirable",
                        (Some(_), 0) => "undesirable",
                        (Some(_), _) => "KL sequence: its prompt, another record's completion",
                    }),
                    dataset: t.neutral.label.clone(),
                    index: set.sources[i].1 as usize,
                    text,
                    input_ids: ids.to_vec(),
                    labels: ids
                        .iter()
                        .zip(trained)
                        .map(|(&id, &t)| if t == 1 { id as i64 } else { -100 })
                        .collect(),
                    pieces,
                });
            }
        }
        Ok(out)
    }
}

/// Byte-level tokens that each hold part of one character decode alone to U+FFFD: a run of
/// them is decoded together, its text put on the run's first token and the rest left empty
/// (the debug view prints such a run as one piece with all its ids).
fn join_partial_characters(
    tok: &crate::text::TextTokenizer,
    ids: &[u32],
    mut pieces: Vec<String>,
) -> Vec<String> {
    let mut i = 0;
    while i < pieces.len() {
        if !pieces[i].contains('\u{FFFD}') {
            i += 1;
            continue;
        }
        let whole = (i + 2..=(i + 8).min(ids.len())).find_map(|j| {
            let t = tok.tokenizer.decode(&ids[i..j], false).ok()?;
            (!t.contains('\u{FFFD}')).then_some((j, t))
        });
        match whole {
            Some((j, t)) => {
                pieces[i] = t;
                for p in &mut pieces[i + 1..j] {
                    p.clear();
                }
                i = j;
            }
            None => i += 1,
        }
    }
    pieces
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DebugExample {
    pub dataset: String,
    /// Preference data: which of the record's sequences (`chosen`, `rejected`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub part: Option<&'static str>,
    pub index: usize,
    pub text: String,
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    /// Each token's text; a character split over several byte tokens is on the first of them,
    /// the others empty.
    #[serde(skip)]
    pub pieces: Vec<String>,
}

/// A temporary name beside `path`, unique to this process and call (two kiln runs publishing
/// into one directory never share one): `.<name>.<pid>.<n>.kiln-tmp`.
pub fn unique_tmp(path: &Path) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.{}.{n}.kiln-tmp", std::process::id()))
}

/// Removes the temporary files ([`unique_tmp`]) in `dir` of kiln processes that no longer run
/// (killed mid-publish); those of live ones are theirs.
fn remove_dead_tmp(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(stem) = name.strip_suffix(".kiln-tmp") else {
            continue;
        };
        let mut parts = stem.rsplitn(3, '.');
        let (_n, pid) = (
            parts.next(),
            parts.next().and_then(|p| p.parse::<u32>().ok()),
        );
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            let p = e.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

/// Writes `bytes` to `path` through a uniquely named temporary file beside it and a rename, so
/// a reader (or a crash) never sees a half-written file under the final name, and two writers
/// never trip over each other's temporary file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = unique_tmp(path);
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
}

/// An I/O error while writing `path`, said as such ("cannot write …: no space left …").
pub fn io_write(path: &Path) -> impl FnOnce(std::io::Error) -> KilnError + '_ {
    move |source| KilnError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// How [`Workspace::publish_entry`] placed files, counted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PublishStats {
    /// Already there as kiln last placed them.
    pub kept: usize,
    pub reflinked: usize,
    pub hardlinked: usize,
    pub copied: usize,
    pub bytes_copied: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placed {
    Reflink,
    Hardlink,
    Copy,
}

/// The ways to place a file in `output_dir`, in order: `KILN_LINK` (a comma list of `reflink`,
/// `hardlink`, `copy`), else all three.
fn link_order() -> Result<Vec<Placed>, KilnError> {
    let Ok(v) = std::env::var("KILN_LINK") else {
        return Ok(vec![Placed::Reflink, Placed::Hardlink, Placed::Copy]);
    };
    v.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| match t {
            "reflink" => Ok(Placed::Reflink),
            "hardlink" => Ok(Placed::Hardlink),
            "copy" => Ok(Placed::Copy),
            other => Err(KilnError::BadFlag {
                flag: "KILN_LINK".into(),
                message: format!(
                    "`{other}` is not a link type; use a comma list of reflink, hardlink, copy"
                ),
            }),
        })
        .collect()
}

/// Places `from` at `tmp` (a new name) the first way of `order` the filesystem allows.
fn place(from: &Path, tmp: &Path, order: &[Placed]) -> std::io::Result<Placed> {
    let mut last = None;
    for &how in order {
        let r = match how {
            Placed::Reflink => reflink(from, tmp),
            Placed::Hardlink => std::fs::hard_link(from, tmp),
            Placed::Copy => copy_writable(from, tmp),
        };
        match r {
            Ok(()) => return Ok(how),
            Err(e) => {
                let _ = std::fs::remove_file(tmp);
                // Out of space is not a reason to try another way.
                if e.raw_os_error() == Some(libc::ENOSPC) || how == Placed::Copy {
                    return Err(e);
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("KILN_LINK names no way to place files")))
}

/// A copy-on-write clone (btrfs, XFS, bcachefs, …): instant, no bytes written, independent of
/// the entry afterwards.
fn reflink(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let src = std::fs::File::open(from)?;
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)?;
    // SAFETY: FICLONE takes the source descriptor as its argument; both files are open here.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A plain copy, writable by its owner (the entry's file is read-only).
fn copy_writable(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::copy(from, to)?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o644))
}

fn resolve_output_dir(s: &Settings) -> PathBuf {
    if s.output_dir.is_absolute() {
        s.output_dir.clone()
    } else {
        s.config_path
            .parent()
            .map(|d| d.join(&s.output_dir))
            .unwrap_or_else(|| s.output_dir.clone())
    }
}
