//! Stage kinds behind one small trait, dispatched statically over a closed set. Each stage file
//! reads like a recipe: what it takes (params, upstream entries), what it writes. Stages know
//! nothing about scheduling or the cache layout beyond their own output directory.

pub mod evaluate;
pub mod export;
pub mod fetch;
pub mod hub;
pub mod merge;
pub mod pack;
pub mod tokenize;
pub mod train;

use crate::cache::Manifest;
use crate::events::Event;
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    Fetch,
    Tokenize,
    Pack,
    Train,
    Merge,
    Evaluate,
    Export,
}

impl StageKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            StageKind::Fetch => "fetch",
            StageKind::Tokenize => "tokenize",
            StageKind::Pack => "pack",
            StageKind::Train => "train",
            StageKind::Merge => "merge",
            StageKind::Evaluate => "evaluate",
            StageKind::Export => "export",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "fetch" => StageKind::Fetch,
            "tokenize" => StageKind::Tokenize,
            "pack" => StageKind::Pack,
            "train" => StageKind::Train,
            "merge" => StageKind::Merge,
            "evaluate" => StageKind::Evaluate,
            "export" => StageKind::Export,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Text(#[from] crate::text::TextError),
    #[error(transparent)]
    Hub(#[from] hub::HubError),
    #[error("input file {path} changed while kiln was reading it; run again")]
    InputChanged { path: PathBuf },
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StageError + '_ {
    move |source| StageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A finished upstream entry as a stage sees it.
pub struct Upstream {
    pub name: String,
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// What a running stage gets: where to write, what it read from upstream, where to report.
pub struct RunCx<'a> {
    pub name: &'a str,
    /// This build's key (lineage records written beside artifacts name it).
    pub key: &'a str,
    pub out: &'a Path,
    /// A directory that survives an interrupted build of the same key (checkpoints live here);
    /// removed once the entry is published.
    pub work: &'a Path,
    pub upstream: &'a [Upstream],
    pub emit: &'a mut dyn FnMut(Event),
}

/// The small interface every stage kind implements.
pub trait Stage {
    const KIND: StageKind;
    /// Bump when the output for the same inputs changes.
    const VERSION: u32;
    /// Exactly the parameters the stage reads, canonically serializable.
    fn params(&self) -> Value;
    fn run(&self, cx: &mut RunCx<'_>) -> Result<(), StageError>;
}

/// The closed set of stage implementations.
pub enum AnyStage {
    FetchModel(fetch::FetchModel),
    FetchData(fetch::FetchData),
    Tokenize(Box<tokenize::Tokenize>),
    Pack(pack::Pack),
    Train(Box<train::Train>),
    Merge(merge::Merge),
    Evaluate(Box<evaluate::Evaluate>),
    Export(Box<export::Export>),
}

impl AnyStage {
    pub fn kind(&self) -> StageKind {
        match self {
            AnyStage::FetchModel(_) | AnyStage::FetchData(_) => StageKind::Fetch,
            AnyStage::Tokenize(_) => StageKind::Tokenize,
            AnyStage::Pack(_) => StageKind::Pack,
            AnyStage::Train(_) => StageKind::Train,
            AnyStage::Merge(_) => StageKind::Merge,
            AnyStage::Evaluate(_) => StageKind::Evaluate,
            AnyStage::Export(_) => StageKind::Export,
        }
    }

    pub fn version(&self) -> u32 {
        match self {
            AnyStage::FetchModel(_) => fetch::FetchModel::VERSION,
            AnyStage::FetchData(_) => fetch::FetchData::VERSION,
            AnyStage::Tokenize(_) => tokenize::Tokenize::VERSION,
            AnyStage::Pack(_) => pack::Pack::VERSION,
            AnyStage::Train(_) => train::Train::VERSION,
            AnyStage::Merge(_) => merge::Merge::VERSION,
            AnyStage::Evaluate(_) => evaluate::Evaluate::VERSION,
            AnyStage::Export(_) => export::Export::VERSION,
        }
    }

    pub fn params(&self) -> Value {
        match self {
            AnyStage::FetchModel(s) => s.params(),
            AnyStage::FetchData(s) => s.params(),
            AnyStage::Tokenize(s) => s.params(),
            AnyStage::Pack(s) => s.params(),
            AnyStage::Train(s) => s.params(),
            AnyStage::Merge(s) => s.params(),
            AnyStage::Evaluate(s) => s.params(),
            AnyStage::Export(s) => s.params(),
        }
    }

    pub fn run(&self, cx: &mut RunCx<'_>) -> Result<(), StageError> {
        match self {
            AnyStage::FetchModel(s) => s.run(cx),
            AnyStage::FetchData(s) => s.run(cx),
            AnyStage::Tokenize(s) => s.run(cx),
            AnyStage::Pack(s) => s.run(cx),
            AnyStage::Train(s) => s.run(cx),
            AnyStage::Merge(s) => s.run(cx),
            AnyStage::Evaluate(s) => s.run(cx),
            AnyStage::Export(s) => s.run(cx),
        }
    }
}

pub fn write_json(path: &Path, v: &impl serde::Serialize) -> Result<(), StageError> {
    let bytes = serde_json::to_vec_pretty(v).map_err(|e| StageError::Invalid(e.to_string()))?;
    std::fs::write(path, bytes).map_err(io_err(path))
}

/// `lineage.json` for an artifact: this stage's key and its upstream entries (name, key, output
/// digest) — `kiln lineage KEY` expands the rest from the index.
pub fn lineage_record(cx: &RunCx<'_>) -> Value {
    serde_json::json!({
        "kiln_version": env!("CARGO_PKG_VERSION"),
        "stage": cx.name,
        "key": cx.key,
        "upstream": cx.upstream.iter().map(|u| serde_json::json!({
            "name": u.name,
            "key": u.dir.file_name().map(|n| n.to_string_lossy().to_string()),
            "digest": u.manifest.digest,
        })).collect::<Vec<_>>(),
    })
}
