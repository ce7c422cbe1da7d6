//! Lineage from the index: which stages, inputs, data files, config values and kiln version
//! produced an artifact (walking the recorded upstream edges), and the reverse — every stage and
//! config that used a given entry.

use crate::cache::{Cache, CacheError, Index};
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Serialize)]
pub struct Node {
    pub key: String,
    pub name: String,
    pub kind: String,
    pub version: u32,
    pub params: Value,
    pub inputs: Value,
    /// Unix seconds when it was built (None when the index has no build record).
    pub created: Option<i64>,
    pub size: Option<i64>,
    /// Whether the entry is still in the cache.
    pub present: bool,
    pub upstream: Vec<Node>,
}

#[derive(Debug, thiserror::Error)]
pub enum LineageError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("{0}")]
    NotFound(String),
}

/// The cache key an argument names: a key (or unique prefix of at least 6 hex digits), a cache
/// entry directory, a directory kiln materialized (`output_dir`, its `merged/`, `eval/`,
/// `export/...`: they carry a `.kiln-entry` marker), or a file inside one; any other file is
/// looked up by content in every entry's manifest.
pub fn resolve(cache: &Cache, arg: &str) -> Result<String, LineageError> {
    let p = Path::new(arg);
    if p.exists() {
        let dir = if p.is_dir() {
            p
        } else {
            p.parent().unwrap_or(p)
        };
        if let Ok(k) = std::fs::read_to_string(dir.join(".kiln-entry")) {
            return Ok(k.trim().to_string());
        }
        if let Some(name) = dir.file_name().map(|n| n.to_string_lossy().to_string()) {
            if cache.entry_dir(&name).is_dir() && dir.join(crate::cache::MANIFEST).exists() {
                return Ok(name);
            }
        }
        if p.is_file() {
            let digest = blake3::hash(
                &std::fs::read(p)
                    .map_err(|e| LineageError::NotFound(format!("{}: {e}", p.display())))?,
            )
            .to_hex()
            .to_string();
            for k in cache.keys()? {
                if let Some(m) = cache.manifest(&k)? {
                    if m.files.iter().any(|f| f.blake3 == digest) {
                        return Ok(k);
                    }
                }
            }
            return Err(LineageError::NotFound(format!(
                "{}: no cache entry holds a file with these bytes",
                p.display()
            )));
        }
        return Err(LineageError::NotFound(format!(
            "{}: not a directory kiln wrote (no .kiln-entry marker)",
            p.display()
        )));
    }
    if arg.len() >= 6 && arg.chars().all(|c| c.is_ascii_hexdigit()) {
        let hits: Vec<String> = cache
            .keys()?
            .into_iter()
            .filter(|k| k.starts_with(arg))
            .collect();
        return match hits.len() {
            1 => Ok(hits[0].clone()),
            0 => Err(LineageError::NotFound(format!(
                "no cache entry with key {arg}…"
            ))),
            n => Err(LineageError::NotFound(format!(
                "{n} entries start with {arg}; give more digits"
            ))),
        };
    }
    Err(LineageError::NotFound(format!(
        "{arg}: neither a path nor a key (at least 6 hex digits)"
    )))
}

fn node(cache: &Cache, index: &Index, key: &str, depth: usize) -> Result<Node, LineageError> {
    let rec = index.stage(key)?;
    let manifest = cache.manifest(key)?;
    let (name, kind, version, params, inputs, created, size) = match rec {
        Some((r, created, _, size)) => (
            r.name,
            r.kind,
            r.version,
            r.params,
            r.inputs,
            Some(created),
            Some(size),
        ),
        None => (
            manifest
                .as_ref()
                .map(|m| m.name.clone())
                .unwrap_or_default(),
            manifest
                .as_ref()
                .map(|m| m.kind.clone())
                .unwrap_or_default(),
            0,
            Value::Null,
            Value::Null,
            None,
            None,
        ),
    };
    let mut upstream = Vec::new();
    if depth < 64 {
        for u in index.upstream_of(key)? {
            upstream.push(node(cache, index, &u, depth + 1)?);
        }
    }
    Ok(Node {
        key: key.to_string(),
        name,
        kind,
        version,
        params,
        inputs,
        created,
        size,
        present: manifest.is_some(),
        upstream,
    })
}

/// The full upstream tree of `key`.
pub fn lineage(cache: &Cache, index: &Index, key: &str) -> Result<Node, LineageError> {
    node(cache, index, key, 0)
}

/// One entry downstream of the queried one.
#[derive(Debug, Clone, Serialize)]
pub struct Use {
    pub key: String,
    pub name: String,
    pub kind: String,
    /// Configs whose last plan referenced it (config path, stage name there).
    pub configs: Vec<(String, String)>,
    pub present: bool,
}

/// Every entry built (directly or transitively) from `key`, nearest first.
pub fn used_by(cache: &Cache, index: &Index, key: &str) -> Result<Vec<Use>, LineageError> {
    let mut out: Vec<Use> = Vec::new();
    let mut queue = std::collections::VecDeque::from(vec![key.to_string()]);
    let mut seen = std::collections::HashSet::new();
    seen.insert(key.to_string());
    while let Some(k) = queue.pop_front() {
        for d in index.downstream_of(&k)? {
            if !seen.insert(d.clone()) {
                continue;
            }
            let (name, kind) = match index.stage(&d)? {
                Some((r, ..)) => (r.name, r.kind),
                None => Default::default(),
            };
            out.push(Use {
                configs: index.configs_using(&d)?,
                present: cache.manifest(&d)?.is_some(),
                key: d.clone(),
                name,
                kind,
            });
            queue.push_back(d);
        }
    }
    Ok(out)
}
