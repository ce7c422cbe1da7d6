//! Dataset records -> formatted text with trained spans -> token ids and label masks, and the
//! compact binary files they are stored in. Needs a tokenizer (`text/`), never a model.

pub mod binfmt;
pub mod format;
pub mod pack;
pub mod read;
pub mod tokenize;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}", crate::ioerr::describe("cannot read", path, source))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: malformed JSON: {message}")]
    BadJsonLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: malformed JSON: {message}")]
    BadJson { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Unsupported { path: PathBuf, message: String },
    #[error("dataset {dataset} ({path}), record {record}: {message}")]
    BadRecord {
        dataset: String,
        path: String,
        record: usize,
        message: String,
    },
    #[error("dataset {dataset}: {message}")]
    Dataset { dataset: String, message: String },
    #[error("{path}: corrupt data file: {message}")]
    Corrupt { path: PathBuf, message: String },
}
