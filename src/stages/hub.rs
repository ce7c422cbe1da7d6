//! The Hugging Face Hub, through hf-hub: resolve a repo revision to a commit, list its files, and
//! download them into the HF cache (`HF_HOME`). Honours `HF_ENDPOINT`, `HF_TOKEN`, `HF_HOME` and
//! offline mode (`HF_HUB_OFFLINE=1`: only files already in the HF cache). Only fetch stages and
//! the planner's input resolution for fetch stages call this.

use hf_hub::api::sync::{Api, ApiBuilder};
use hf_hub::{Cache, Repo, RepoType};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("hub {repo}@{revision}: {message}")]
    Api {
        repo: String,
        revision: String,
        message: String,
    },
    #[error("hub {repo}@{revision}: offline (HF_HUB_OFFLINE=1) and not in the HF cache ({path}); run once online or unset HF_HUB_OFFLINE")]
    NotCached {
        repo: String,
        revision: String,
        path: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Model,
    Dataset,
}

/// A revision resolved to a commit and its file list.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub commit: String,
    pub files: Vec<String>,
}

pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        .unwrap_or(false)
}

fn repo(id: &str, revision: &str, kind: Kind) -> Repo {
    let ty = match kind {
        Kind::Model => RepoType::Model,
        Kind::Dataset => RepoType::Dataset,
    };
    Repo::with_revision(id.to_string(), ty, revision.to_string())
}

fn api() -> Result<Api, hf_hub::api::sync::ApiError> {
    let mut b = ApiBuilder::from_env().with_progress(false).with_retries(2);
    if let Ok(t) = std::env::var("HF_TOKEN") {
        if !t.is_empty() {
            b = b.with_token(Some(t));
        }
    }
    b.build()
}

pub fn resolve(id: &str, revision: &str, kind: Kind) -> Result<Resolved, HubError> {
    let err = |message: String| HubError::Api {
        repo: id.to_string(),
        revision: revision.to_string(),
        message,
    };
    if offline() {
        let r = repo(id, revision, kind);
        let dir = Cache::from_env().path().join(r.folder_name());
        let refp = dir.join("refs").join(revision);
        let commit = std::fs::read_to_string(&refp)
            .map(|s| s.trim().to_string())
            .or_else(|_| {
                // A revision that is itself a commit has a snapshot directory and no ref.
                let snap = dir.join("snapshots").join(revision);
                if snap.is_dir() {
                    Ok(revision.to_string())
                } else {
                    Err(())
                }
            })
            .map_err(|_| HubError::NotCached {
                repo: id.to_string(),
                revision: revision.to_string(),
                path: refp.clone(),
            })?;
        let snap = dir.join("snapshots").join(&commit);
        let mut files = Vec::new();
        list_rel(&snap, &snap, &mut files);
        files.sort();
        return Ok(Resolved { commit, files });
    }
    let api = api().map_err(|e| err(e.to_string()))?;
    let info = api
        .repo(repo(id, revision, kind))
        .info()
        .map_err(|e| err(format!("cannot resolve revision: {e}")))?;
    let mut files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    files.sort();
    Ok(Resolved {
        commit: info.sha,
        files,
    })
}

fn list_rel(base: &std::path::Path, dir: &std::path::Path, out: &mut Vec<String>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                list_rel(base, &p, out);
            } else if let Ok(rel) = p.strip_prefix(base) {
                out.push(rel.to_string_lossy().to_string());
            }
        }
    }
}

/// Records `revision -> commit` in the HF cache (`refs/<revision>`), as huggingface_hub does, so
/// offline mode can resolve the revision later.
pub fn pin_ref(id: &str, revision: &str, commit: &str, kind: Kind) {
    if revision == commit {
        return;
    }
    let r = repo(id, revision, kind);
    let refp = Cache::from_env()
        .path()
        .join(r.folder_name())
        .join("refs")
        .join(revision);
    if let Some(parent) = refp.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let _ = std::fs::write(refp, commit);
}

/// Downloads (or finds in the HF cache) one file of a pinned commit; returns its local path.
pub fn download(id: &str, commit: &str, kind: Kind, file: &str) -> Result<PathBuf, HubError> {
    let r = repo(id, commit, kind);
    if let Some(p) = Cache::from_env().repo(r.clone()).get(file) {
        return Ok(p);
    }
    if offline() {
        return Err(HubError::NotCached {
            repo: id.to_string(),
            revision: commit.to_string(),
            path: Cache::from_env().path().join(r.folder_name()),
        });
    }
    let api = api().map_err(|e| HubError::Api {
        repo: id.to_string(),
        revision: commit.to_string(),
        message: e.to_string(),
    })?;
    api.repo(r).download(file).map_err(|e| HubError::Api {
        repo: id.to_string(),
        revision: commit.to_string(),
        message: format!("download of {file} failed: {e}"),
    })
}
