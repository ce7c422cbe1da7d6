//! The on-disk token format (documented in docs/formats.md): little-endian arrays that can be
//! memory-mapped, plus a JSON header.
//!
//! A token set is a directory with
//! - `tokens.u32`: every sample's token ids, concatenated;
//! - `trained.u8`: one byte per token, 1 when the token carries loss (its label is its id), 0
//!   when masked (label -100);
//! - `offsets.u64`: `samples + 1` offsets into the token arrays;
//! - `sources.u32`: two u32 per sample, (dataset index, record index);
//! - `header.json`: format name, version, counts.

use super::DataError;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "kiln.tokens";
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub samples: u64,
    pub tokens: u64,
    pub trained_tokens: u64,
    /// Preference pairs: samples 2k and 2k+1 are pair k's chosen and rejected sequences (absent
    /// in, and so unchanged for, every other token set).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paired: bool,
    /// KTO: each unit's label (1 desirable, 0 not) in `labels.u8`, one byte per unit.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub labelled: bool,
}

/// Samples held in memory.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TokenSet {
    pub tokens: Vec<u32>,
    pub trained: Vec<u8>,
    pub offsets: Vec<u64>,
    pub sources: Vec<(u32, u32)>,
    /// Samples come in (chosen, rejected) pairs (see [`Header::paired`]).
    pub paired: bool,
    /// KTO: one label per unit (1 = desirable); empty otherwise.
    pub labels: Vec<u8>,
}

impl TokenSet {
    pub fn new() -> Self {
        Self {
            offsets: vec![0],
            ..Default::default()
        }
    }

    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn push(&mut self, ids: &[u32], trained: &[u8], source: (u32, u32)) {
        self.tokens.extend_from_slice(ids);
        self.trained.extend_from_slice(trained);
        self.offsets.push(self.tokens.len() as u64);
        self.sources.push(source);
    }

    pub fn sample(&self, i: usize) -> (&[u32], &[u8]) {
        let (a, b) = (self.offsets[i] as usize, self.offsets[i + 1] as usize);
        (&self.tokens[a..b], &self.trained[a..b])
    }

    pub fn sample_len(&self, i: usize) -> usize {
        (self.offsets[i + 1] - self.offsets[i]) as usize
    }

    /// The units that shuffling, splitting and packing keep whole: samples, or pairs of them.
    pub fn units(&self) -> usize {
        if self.paired {
            self.len() / 2
        } else {
            self.len()
        }
    }

    /// The samples of unit `u`.
    pub fn unit_samples(&self, u: usize) -> std::ops::Range<usize> {
        if self.paired {
            2 * u..2 * u + 2
        } else {
            u..u + 1
        }
    }

    pub fn header(&self) -> Header {
        Header {
            format: FORMAT.into(),
            version: VERSION,
            samples: self.len() as u64,
            tokens: self.tokens.len() as u64,
            trained_tokens: self.trained.iter().map(|&b| b as u64).sum(),
            paired: self.paired,
            labelled: !self.labels.is_empty(),
        }
    }

    pub fn write(&self, dir: &Path) -> Result<(), DataError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        write_le(
            &dir.join("tokens.u32"),
            self.tokens.iter().flat_map(|v| v.to_le_bytes()),
        )?;
        write_bytes(&dir.join("trained.u8"), &self.trained)?;
        if !self.labels.is_empty() {
            write_bytes(&dir.join("labels.u8"), &self.labels)?;
        }
        write_le(
            &dir.join("offsets.u64"),
            self.offsets.iter().flat_map(|v| v.to_le_bytes()),
        )?;
        write_le(
            &dir.join("sources.u32"),
            self.sources
                .iter()
                .flat_map(|(d, r)| d.to_le_bytes().into_iter().chain(r.to_le_bytes())),
        )?;
        let h = serde_json::to_vec_pretty(&self.header()).map_err(|e| DataError::Corrupt {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?;
        write_bytes(&dir.join("header.json"), &h)
    }

    pub fn read(dir: &Path) -> Result<Self, DataError> {
        let hp = dir.join("header.json");
        let h: Header = serde_json::from_slice(&std::fs::read(&hp).map_err(io(&hp))?)
            .map_err(|e| corrupt(&hp, e.to_string()))?;
        if h.format != FORMAT || h.version != VERSION {
            return Err(corrupt(
                &hp,
                format!(
                    "expected {FORMAT} v{VERSION}, found {} v{}",
                    h.format, h.version
                ),
            ));
        }
        let tokens = read_u32s(&dir.join("tokens.u32"))?;
        let trained = std::fs::read(dir.join("trained.u8")).map_err(io(&dir.join("trained.u8")))?;
        let offsets = read_u64s(&dir.join("offsets.u64"))?;
        let src = read_u32s(&dir.join("sources.u32"))?;
        let labels = if h.labelled {
            std::fs::read(dir.join("labels.u8")).map_err(io(&dir.join("labels.u8")))?
        } else {
            Vec::new()
        };
        let sources = src
            .chunks_exact(2)
            .map(|c| (c[0], c[1]))
            .collect::<Vec<_>>();
        let ok = tokens.len() as u64 == h.tokens
            && trained.len() == tokens.len()
            && offsets.len() as u64 == h.samples + 1
            && sources.len() as u64 == h.samples
            && offsets.last().copied() == Some(h.tokens)
            && offsets.windows(2).all(|w| w[0] <= w[1])
            && (!h.paired || h.samples.is_multiple_of(2))
            && (!h.labelled || (h.paired && labels.len() as u64 * 2 == h.samples));
        if !ok {
            return Err(corrupt(
                dir,
                "array lengths disagree with header.json".into(),
            ));
        }
        Ok(Self {
            tokens,
            trained,
            offsets,
            sources,
            paired: h.paired,
            labels,
        })
    }
}

fn io(p: &Path) -> impl FnOnce(std::io::Error) -> DataError {
    let path: PathBuf = p.to_path_buf();
    move |source| DataError::Io { path, source }
}

fn corrupt(p: &Path, message: String) -> DataError {
    DataError::Corrupt {
        path: p.to_path_buf(),
        message,
    }
}

pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let mut f = std::fs::File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))
}

pub fn write_le(path: &Path, bytes: impl Iterator<Item = u8>) -> Result<(), DataError> {
    let f = std::fs::File::create(path).map_err(io(path))?;
    let mut w = std::io::BufWriter::new(f);
    let buf: Vec<u8> = bytes.collect();
    w.write_all(&buf).map_err(io(path))?;
    w.flush().map_err(io(path))
}

pub fn read_u32s(path: &Path) -> Result<Vec<u32>, DataError> {
    let b = std::fs::read(path).map_err(io(path))?;
    if b.len() % 4 != 0 {
        return Err(corrupt(path, "length is not a multiple of 4".into()));
    }
    Ok(b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

pub fn read_u64s(path: &Path) -> Result<Vec<u64>, DataError> {
    let b = std::fs::read(path).map_err(io(path))?;
    if b.len() % 8 != 0 {
        return Err(corrupt(path, "length is not a multiple of 8".into()));
    }
    Ok(b.chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}
