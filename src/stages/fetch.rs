//! `fetch`: brings the base model's files and each dataset's files into the cache. Keys hash
//! content, not names: a local file by its bytes (size+mtime fast path), a hub file by its
//! resolved commit. A GGUF model also gets a `tokenizer.json` and `tokenizer_config.json` rebuilt
//! from its metadata, so tokenization never needs the weights.

use super::hub::{self, Kind};
use super::{io_err, write_json, RunCx, Stage, StageError, StageKind, Staged};
use crate::cache::FileHashCache;
use crate::config::{DataSource, ModelSource};
use crate::hash::hash_file;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where one fetched file comes from, as its key sees it: a local file by its content digest
/// (never its path), a hub file by repo, resolved commit and name (never the revision name).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileSource {
    Local {
        digest: String,
    },
    Hub {
        repo: String,
        commit: String,
        kind: Kind,
        file: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FetchFile {
    /// Name inside the stage's output.
    pub dest: String,
    pub src: FileSource,
}

/// One resolved input: its digest (file blake3, or hub commit) and what to call it in messages.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Input {
    pub digest: String,
    pub label: String,
}

/// Resolved inputs by stable id (the file's name inside the output, or `hub:<repo>@<rev>`). Keys
/// hash ids and digests, never local paths, so moving a project keeps its cache.
pub type Inputs = BTreeMap<String, Input>;

/// Everything the model fetch reads, and so its key.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FetchModel {
    pub files: Vec<FetchFile>,
    pub gguf: bool,
}

/// Everything a data (or checkpoint, or prompts) fetch reads, and so its key.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FetchData {
    pub files: Vec<FetchFile>,
}

/// What a fetch reads that does not change its output: where each local file is copied from
/// (its bytes are checked against the keyed digest) and the revision name a hub commit was
/// resolved from (only used to pin that ref in the HF cache).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FetchNeutral {
    /// Output name -> local path.
    pub local: BTreeMap<String, PathBuf>,
    pub hub_revision: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{path}: {message}")]
    Local { path: PathBuf, message: String },
    #[error(transparent)]
    Hub(#[from] hub::HubError),
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
}

/// Model files kiln reads from an HF-layout directory or repo.
fn is_model_file(name: &str) -> bool {
    matches!(
        name,
        "config.json"
            | "generation_config.json"
            | "tokenizer.json"
            | "tokenizer_config.json"
            | "special_tokens_map.json"
            | "model.safetensors.index.json"
    ) || (name.ends_with(".safetensors") && !name.contains('/'))
}

fn local_file(
    path: &Path,
    dest: String,
    hashes: &FileHashCache<'_>,
    inputs: &mut Inputs,
    neutral: &mut FetchNeutral,
) -> Result<FetchFile, ResolveError> {
    neutral.local.insert(dest.clone(), path.to_path_buf());
    let digest = hashes.hash(path)?;
    inputs.insert(
        dest.clone(),
        Input {
            digest: digest.clone(),
            label: path.display().to_string(),
        },
    );
    Ok(FetchFile {
        dest,
        src: FileSource::Local { digest },
    })
}

pub fn resolve_model(
    src: &ModelSource,
    hashes: &FileHashCache<'_>,
) -> Result<(Staged<FetchModel>, Inputs), ResolveError> {
    let mut inputs = Inputs::new();
    let mut neutral = FetchNeutral::default();
    match src {
        ModelSource::Gguf(p) => {
            let f = local_file(p, "model.gguf".into(), hashes, &mut inputs, &mut neutral)?;
            Ok((
                Staged::new(
                    FetchModel {
                        files: vec![f],
                        gguf: true,
                    },
                    neutral,
                ),
                inputs,
            ))
        }
        ModelSource::LocalDir(dir) => {
            let rd = std::fs::read_dir(dir).map_err(|e| ResolveError::Local {
                path: dir.clone(),
                message: e.to_string(),
            })?;
            let mut names: Vec<String> = rd
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(String::from))
                .filter(|n| is_model_file(n))
                .collect();
            names.sort();
            if !names.iter().any(|n| n == "tokenizer.json") {
                return Err(ResolveError::Local {
                    path: dir.clone(),
                    message: "no tokenizer.json: kiln needs the model's fast-tokenizer file".into(),
                });
            }
            let mut files = Vec::new();
            for n in names {
                files.push(local_file(
                    &dir.join(&n),
                    n,
                    hashes,
                    &mut inputs,
                    &mut neutral,
                )?);
            }
            Ok((
                Staged::new(FetchModel { files, gguf: false }, neutral),
                inputs,
            ))
        }
        ModelSource::Hub { repo, revision } => {
            let r = hub::resolve(repo, revision, Kind::Model)?;
            neutral.hub_revision = Some(revision.clone());
            let names: Vec<&String> = r.files.iter().filter(|n| is_model_file(n)).collect();
            if !names.iter().any(|n| n.as_str() == "tokenizer.json") {
                return Err(ResolveError::Hub(hub::HubError::Api {
                    repo: repo.clone(),
                    revision: revision.clone(),
                    message: "the repo has no tokenizer.json".into(),
                }));
            }
            let id = format!("hub:{repo}@{revision}");
            inputs.insert(
                id.clone(),
                Input {
                    digest: r.commit.clone(),
                    label: id,
                },
            );
            let files = names
                .into_iter()
                .map(|n| FetchFile {
                    dest: n.clone(),
                    src: FileSource::Hub {
                        repo: repo.clone(),
                        commit: r.commit.clone(),
                        kind: Kind::Model,
                        file: n.clone(),
                    },
                })
                .collect();
            Ok((
                Staged::new(FetchModel { files, gguf: false }, neutral),
                inputs,
            ))
        }
    }
}

const DATA_EXTS: &[&str] = &[".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet"];

/// A dataset file's name inside the fetch output: its position and its format's extension, not
/// its name, so renaming a file keeps its key.
fn data_dest(i: usize, name: &str) -> String {
    let ext = DATA_EXTS
        .iter()
        .find(|e| name.ends_with(*e))
        .copied()
        .unwrap_or(".jsonl");
    format!("{i:04}{ext}")
}

/// `data_files` patterns: exact paths, or one `*` wildcard (`train-*.jsonl`).
fn pattern_match(pat: &str, name: &str) -> bool {
    match pat.split_once('*') {
        Some((a, b)) => name.len() >= a.len() + b.len() && name.starts_with(a) && name.ends_with(b),
        None => pat == name,
    }
}

/// The files of a kiln `checkpoint-N/` directory that a train stage resumes from: the weights
/// (adapter, or the whole model for full fine-tuning), optimizer state and trainer state.
pub fn resolve_checkpoint(
    dir: &Path,
    full: bool,
    hashes: &FileHashCache<'_>,
) -> Result<(Staged<FetchData>, Inputs), ResolveError> {
    let mut neutral = FetchNeutral::default();
    let weights = if full {
        "model.safetensors"
    } else {
        "adapter_model.safetensors"
    };
    let mut inputs = Inputs::new();
    let mut files = Vec::new();
    for name in [weights, "optimizer.safetensors", "trainer_state.json"] {
        let p = dir.join(name);
        if !p.is_file() {
            return Err(ResolveError::Local {
                path: dir.to_path_buf(),
                message: format!(
                    "resume_from_checkpoint: no {name} there; point it at a `checkpoint-N/` directory of a kiln train stage with the same adapter{}",
                    if full { " (full fine-tuning)" } else { "" }
                ),
            });
        }
        files.push(local_file(
            &p,
            name.to_string(),
            hashes,
            &mut inputs,
            &mut neutral,
        )?);
    }
    Ok((Staged::new(FetchData { files }, neutral), inputs))
}

pub fn resolve_data(
    src: &DataSource,
    split: Option<&str>,
    name: Option<&str>,
    hashes: &FileHashCache<'_>,
) -> Result<(Staged<FetchData>, Inputs), ResolveError> {
    let mut inputs = Inputs::new();
    let mut neutral = FetchNeutral::default();
    match src {
        DataSource::Local(paths) => {
            let mut files = Vec::new();
            for (i, p) in paths.iter().enumerate() {
                files.push(local_file(
                    p,
                    data_dest(i, p.to_str().unwrap_or("")),
                    hashes,
                    &mut inputs,
                    &mut neutral,
                )?);
            }
            Ok((Staged::new(FetchData { files }, neutral), inputs))
        }
        DataSource::Hub {
            repo,
            revision,
            data_files,
        } => {
            let r = hub::resolve(repo, revision, Kind::Dataset)?;
            neutral.hub_revision = Some(revision.clone());
            let is_data = |n: &str| DATA_EXTS.iter().any(|e| n.ends_with(e));
            let mut chosen: Vec<String> = if !data_files.is_empty() {
                r.files
                    .iter()
                    .filter(|n| data_files.iter().any(|p| pattern_match(p, n)))
                    .cloned()
                    .collect()
            } else {
                let mut all: Vec<String> = r.files.iter().filter(|n| is_data(n)).cloned().collect();
                // A dataset config (`name:`) lives in a directory of that name.
                if let Some(cfg) = name {
                    let prefix = format!("{cfg}/");
                    all.retain(|n| n.starts_with(&prefix) || n.contains(&format!("/{prefix}")));
                }
                match split {
                    Some(s) => {
                        let sel: Vec<String> = all
                            .iter()
                            .filter(|n| {
                                let base = n.rsplit('/').next().unwrap_or(n);
                                base.starts_with(s)
                                    || n.contains(&format!("/{s}"))
                                    || n.starts_with(&format!("{s}/"))
                            })
                            .cloned()
                            .collect();
                        if sel.is_empty() {
                            all
                        } else {
                            sel
                        }
                    }
                    None => all,
                }
            };
            chosen.sort();
            if chosen.is_empty() {
                return Err(ResolveError::Hub(hub::HubError::Api {
                    repo: repo.clone(),
                    revision: revision.clone(),
                    message: format!(
                        "no data files matched (repo has: {}); set `data_files:`",
                        r.files.join(", ")
                    ),
                }));
            }
            let id = format!("hub:datasets/{repo}@{revision}");
            inputs.insert(
                id.clone(),
                Input {
                    digest: r.commit.clone(),
                    label: id,
                },
            );
            let files = chosen
                .into_iter()
                .enumerate()
                .map(|(i, n)| FetchFile {
                    dest: data_dest(i, &n),
                    src: FileSource::Hub {
                        repo: repo.clone(),
                        commit: r.commit.clone(),
                        kind: Kind::Dataset,
                        file: n,
                    },
                })
                .collect();
            Ok((Staged::new(FetchData { files }, neutral), inputs))
        }
    }
}

/// Copies (or downloads then copies) one file into the output, checking a local file still has
/// the bytes its key was computed from.
fn materialize(f: &FetchFile, neutral: &FetchNeutral, out: &Path) -> Result<(), StageError> {
    let dest = out.join(&f.dest);
    match &f.src {
        FileSource::Local { digest } => {
            let path = neutral.local.get(&f.dest).ok_or_else(|| {
                StageError::Invalid(format!("internal: no local path planned for {}", f.dest))
            })?;
            std::fs::copy(path, &dest).map_err(io_err(path))?;
            let got = hash_file(&dest).map_err(io_err(&dest))?;
            if &got != digest {
                return Err(StageError::InputChanged { path: path.clone() });
            }
        }
        FileSource::Hub {
            repo,
            commit,
            kind,
            file,
        } => {
            let p = hub::download(repo, commit, *kind, file)?;
            std::fs::copy(&p, &dest).map_err(io_err(&p))?;
            if let Some(revision) = &neutral.hub_revision {
                hub::pin_ref(repo, revision, commit, *kind);
            }
        }
    }
    Ok(())
}

impl Stage for FetchModel {
    const KIND: StageKind = StageKind::Fetch;
    // v2: the key is the canonical encoding of the typed inputs (kiln.stage/2); output unchanged.
    const VERSION: u32 = 2;

    type Neutral = FetchNeutral;

    fn run(&self, neutral: &FetchNeutral, cx: &mut RunCx<'_>) -> Result<(), StageError> {
        for f in &self.files {
            materialize(f, neutral, cx.out)?;
        }
        if self.gguf {
            let t = crate::text::gguf::tokenizer_files(&cx.out.join("model.gguf"))?;
            write_json(&cx.out.join("tokenizer.json"), &t.tokenizer_json)?;
            write_json(&cx.out.join("tokenizer_config.json"), &t.tokenizer_config)?;
        }
        // Fail here, not in tokenize, when the tokenizer is unusable.
        crate::text::TextTokenizer::load_dir(cx.out)?;
        Ok(())
    }
}

impl Stage for FetchData {
    const KIND: StageKind = StageKind::Fetch;
    // v2: the key is the canonical encoding of the typed inputs (kiln.stage/2); output unchanged.
    const VERSION: u32 = 2;

    type Neutral = FetchNeutral;

    fn run(&self, neutral: &FetchNeutral, cx: &mut RunCx<'_>) -> Result<(), StageError> {
        for f in &self.files {
            materialize(f, neutral, cx.out)?;
        }
        Ok(())
    }
}
