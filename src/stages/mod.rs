//! Stage kinds behind one small trait, dispatched statically over a closed set. Each stage file
//! reads like a recipe: what it takes (params, upstream entries), what it writes. Stages know
//! nothing about scheduling or the cache layout beyond their own output directory.

pub mod evaluate;
pub mod export;
pub mod fetch;
pub mod hub;
pub mod merge;
pub mod pack;
pub mod quantize;
pub mod refscore;
pub mod tokenize;
pub mod train;

use crate::cache::Manifest;
use crate::events::Event;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Declares the closed set of stage kinds once: the enum, its names and `ALL` (which the golden
/// key tests walk, so a new kind without a pinned key fails them).
macro_rules! stage_kinds {
    ($($variant:ident => $name:literal),* $(,)?) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        #[serde(rename_all = "snake_case")]
        pub enum StageKind {
            $($variant),*
        }

        impl StageKind {
            /// Every stage kind, in pipeline order.
            pub const ALL: &'static [StageKind] = &[$(StageKind::$variant),*];

            pub fn as_str(&self) -> &'static str {
                match self {
                    $(StageKind::$variant => $name),*
                }
            }

            pub fn parse(s: &str) -> Option<Self> {
                match s {
                    $($name => Some(StageKind::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

stage_kinds! {
    Fetch => "fetch",
    Quantize => "quantize",
    Tokenize => "tokenize",
    Pack => "pack",
    Refscore => "refscore",
    Train => "train",
    Merge => "merge",
    Evaluate => "evaluate",
    Export => "export",
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("{}", crate::ioerr::describe("", path, source))]
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
///
/// The implementing struct is the stage's inputs: every setting it reads, with the resolved
/// input digests it needs. Its key is the canonical encoding of that struct (`hash::canonical`
/// over its derived `Serialize`), so a setting the stage can read is in its key by construction.
/// What the stage reads but cannot change its output bytes with (messages, logging cadence) is in
/// [`Stage::Neutral`], a separate value that is never hashed.
pub trait Stage: serde::Serialize {
    const KIND: StageKind;
    /// Bump when the output for the same inputs changes.
    const VERSION: u32;
    /// True for stages that use every core (train): the scheduler runs few of them at once.
    const USES_ALL_CORES: bool = false;
    /// Settings the stage reads that do not affect its output (never part of its key).
    type Neutral;
    fn run(&self, neutral: &Self::Neutral, cx: &mut RunCx<'_>) -> Result<(), StageError>;
}

/// A planned stage: its keyed inputs, and the part that does not affect its output.
pub struct Staged<S: Stage> {
    pub inputs: S,
    pub neutral: S::Neutral,
}

impl<S: Stage> Staged<S> {
    pub fn new(inputs: S, neutral: S::Neutral) -> Self {
        Staged { inputs, neutral }
    }
}

/// The closed set of stage implementations.
pub enum AnyStage {
    FetchModel(Box<Staged<fetch::FetchModel>>),
    FetchData(Box<Staged<fetch::FetchData>>),
    Tokenize(Box<Staged<tokenize::Tokenize>>),
    Pack(Box<Staged<pack::Pack>>),
    Quantize(Box<Staged<quantize::Quantize>>),
    RefScore(Box<Staged<refscore::RefScore>>),
    Train(Box<Staged<train::Train>>),
    Merge(Box<Staged<merge::Merge>>),
    Evaluate(Box<Staged<evaluate::Evaluate>>),
    Export(Box<Staged<export::Export>>),
}

/// Runs `$body` with `$s` bound to the `Staged<_>` of whichever stage `$any` holds, and `$T` to
/// its stage type.
macro_rules! with_stage {
    ($any:expr, $s:ident, $T:ident => $body:expr) => {
        match $any {
            AnyStage::FetchModel($s) => {
                #[allow(dead_code)]
                type $T = fetch::FetchModel;
                $body
            }
            AnyStage::FetchData($s) => {
                #[allow(dead_code)]
                type $T = fetch::FetchData;
                $body
            }
            AnyStage::Tokenize($s) => {
                #[allow(dead_code)]
                type $T = tokenize::Tokenize;
                $body
            }
            AnyStage::Pack($s) => {
                #[allow(dead_code)]
                type $T = pack::Pack;
                $body
            }
            AnyStage::Quantize($s) => {
                #[allow(dead_code)]
                type $T = quantize::Quantize;
                $body
            }
            AnyStage::RefScore($s) => {
                #[allow(dead_code)]
                type $T = refscore::RefScore;
                $body
            }
            AnyStage::Train($s) => {
                #[allow(dead_code)]
                type $T = train::Train;
                $body
            }
            AnyStage::Merge($s) => {
                #[allow(dead_code)]
                type $T = merge::Merge;
                $body
            }
            AnyStage::Evaluate($s) => {
                #[allow(dead_code)]
                type $T = evaluate::Evaluate;
                $body
            }
            AnyStage::Export($s) => {
                #[allow(dead_code)]
                type $T = export::Export;
                $body
            }
        }
    };
}

impl AnyStage {
    pub fn kind(&self) -> StageKind {
        with_stage!(self, _s, T => <T as Stage>::KIND)
    }

    pub fn version(&self) -> u32 {
        with_stage!(self, _s, T => <T as Stage>::VERSION)
    }

    pub fn uses_all_cores(&self) -> bool {
        with_stage!(self, _s, T => <T as Stage>::USES_ALL_CORES)
    }

    /// The stage's keyed inputs as JSON: what `kiln plan --json` shows and what a stale reason
    /// compares (field by field) with the last build's record.
    pub fn params(&self) -> Result<Value, StageError> {
        with_stage!(self, s, _T => serde_json::to_value(&s.inputs)
            .map_err(|e| StageError::Invalid(format!("internal: stage inputs as JSON: {e}"))))
    }

    /// The canonical encoding of the stage's keyed inputs (what its key hashes).
    pub fn key_bytes(&self) -> Result<Vec<u8>, crate::hash::CanonError> {
        with_stage!(self, s, _T => crate::hash::canonical(&s.inputs))
    }

    pub fn run(&self, cx: &mut RunCx<'_>) -> Result<(), StageError> {
        with_stage!(self, s, _T => s.inputs.run(&s.neutral, cx))
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
