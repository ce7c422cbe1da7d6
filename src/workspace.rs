//! Opens everything one command needs: the config, the cache and its index, the plan. The CLI
//! and the tests both go through here.

use crate::cache::{Cache, CacheError, FileHashCache, Index};
use crate::config::{self, ConfigError, Problem, Settings};
use crate::data::binfmt::TokenSet;
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
    #[error("{0}")]
    NotBuilt(String),
}

pub struct Workspace {
    pub settings: Settings,
    pub warnings: Vec<Problem>,
    pub cache: Cache,
    pub index: Index,
    pub plan: Plan,
    pub config_id: String,
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
        let loaded = config::load(config_path, overrides)?;
        let cache = Cache::open(&cache_root(Some(&loaded.settings)))?;
        let index = cache.index()?;
        let plan = plan::build(&loaded.settings, &FileHashCache { index: &index })?;
        let config_id = std::fs::canonicalize(config_path)
            .unwrap_or_else(|_| config_path.to_path_buf())
            .display()
            .to_string();
        Ok(Self {
            settings: loaded.settings,
            warnings: loaded.warnings,
            cache,
            index,
            plan,
            config_id,
        })
    }

    pub fn scheduler(&self) -> Scheduler<'_> {
        Scheduler {
            plan: &self.plan,
            cache: &self.cache,
            index: &self.index,
            config_id: self.config_id.clone(),
        }
    }

    /// The published entry directory of a stage, if it is fresh.
    pub fn entry_of(&self, name: &str) -> Result<PathBuf, KilnError> {
        let st = self.scheduler().assess()?;
        let s = st
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| KilnError::NotBuilt(format!("no stage {name}")))?;
        match (&s.key, s.state) {
            (Some(k), State::Fresh) => Ok(self.cache.entry_dir(k)),
            _ => Err(KilnError::NotBuilt(format!(
                "{name} is not built; run `kiln preprocess` first"
            ))),
        }
    }

    /// Copies the final artifacts (the train stage's outputs) into `output_dir`, the layout Axolotl
    /// users know. `output_dir` is a view: the cache entry stays the source of truth. Returns the
    /// directory written, or None when the plan has no train stage or it is not built.
    pub fn materialize_outputs(&self) -> Result<Option<PathBuf>, KilnError> {
        if self.plan.index_of("train").is_none() {
            return Ok(None);
        }
        let Ok(src) = self.entry_of("train") else {
            return Ok(None);
        };
        let out = if self.settings.output_dir.is_absolute() {
            self.settings.output_dir.clone()
        } else {
            self.settings
                .config_path
                .parent()
                .map(|d| d.join(&self.settings.output_dir))
                .unwrap_or_else(|| self.settings.output_dir.clone())
        };
        let io =
            |e: std::io::Error| KilnError::NotBuilt(format!("output_dir {}: {e}", out.display()));
        std::fs::create_dir_all(&out).map_err(io)?;
        for e in std::fs::read_dir(&src).map_err(io)?.flatten() {
            let name = e.file_name();
            if name == crate::cache::MANIFEST {
                continue;
            }
            // Write beside, then rename: a reader never sees a half-copied adapter.
            let tmp = out.join(format!(".{}.kiln-tmp", name.to_string_lossy()));
            std::fs::copy(e.path(), &tmp).map_err(io)?;
            std::fs::rename(&tmp, out.join(&name)).map_err(io)?;
        }
        Ok(Some(out))
    }

    /// `kiln train --debug`: one training step on the first bins, nothing published.
    pub fn debug_train_step(&self) -> Result<crate::stages::train::DebugStep, KilnError> {
        let Some(i) = self.plan.index_of("train") else {
            return Err(KilnError::NotBuilt(
                "no train stage: set `adapter: lora`".into(),
            ));
        };
        let AnyStage::Train(t) = &self.plan.stages[i].stage else {
            return Err(KilnError::NotBuilt("no train stage".into()));
        };
        Ok(t.debug_step(&self.entry_of("fetch.model")?, &self.entry_of("pack")?)?)
    }

    pub fn pack_stats(&self) -> Result<PackStats, KilnError> {
        let dir = self.entry_of("pack")?;
        let p = dir.join("stats.json");
        let bytes =
            std::fs::read(&p).map_err(|e| KilnError::NotBuilt(format!("{}: {e}", p.display())))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| KilnError::NotBuilt(format!("{}: {e}", p.display())))
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
            for i in 0..set.len().min(n) {
                let (ids, trained) = set.sample(i);
                let text = tok.tokenizer.decode(ids, false).unwrap_or_default();
                let pieces = ids
                    .iter()
                    .map(|&id| tok.tokenizer.decode(&[id], false).unwrap_or_default())
                    .collect();
                out.push(DebugExample {
                    dataset: t.label.clone(),
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

#[derive(Debug, Clone, serde::Serialize)]
pub struct DebugExample {
    pub dataset: String,
    pub index: usize,
    pub text: String,
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    #[serde(skip)]
    pub pieces: Vec<String>,
}
