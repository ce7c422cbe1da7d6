//! Formatted samples -> token ids and trained masks, in parallel (rayon), with the length policy
//! (`excess_length_strategy`, `min_sample_len`) and statistics.

use super::binfmt::TokenSet;
use super::format::{format_record, FormatCtx, Formatted};
use super::read::Record;
use super::DataError;
use crate::config::{DataFormat, ExcessLength};
use crate::text::{EncodeCache, TextTokenizer};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub struct TokenizeOpts<'a> {
    pub dataset_index: u32,
    pub dataset_name: &'a str,
    pub dataset_path: &'a str,
    pub sequence_len: usize,
    pub excess: ExcessLength,
    pub min_sample_len: usize,
    pub train_on_inputs: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LengthStats {
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p95: u64,
    pub max: u64,
}

impl LengthStats {
    pub fn of(mut lens: Vec<u64>) -> Self {
        if lens.is_empty() {
            return Self::default();
        }
        lens.sort_unstable();
        let n = lens.len();
        let pct = |p: f64| lens[(((n - 1) as f64) * p).round() as usize];
        Self {
            min: lens[0],
            mean: lens.iter().sum::<u64>() as f64 / n as f64,
            p50: pct(0.5),
            p95: pct(0.95),
            max: lens[n - 1],
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TokenizeStats {
    pub records: u64,
    pub samples: u64,
    pub dropped_too_long: u64,
    pub truncated: u64,
    pub dropped_too_short: u64,
    pub dropped_untrained: u64,
    /// Records the format cannot use (a missing field, a message whose content is not a
    /// string, a template that raises on it): dropped, not a failure of the stage.
    #[serde(default)]
    pub dropped_unusable: u64,
    /// The first few of them: "line 17: why" (JSONL) or "record 17: why".
    #[serde(default)]
    pub unusable: Vec<String>,
    pub tokens: u64,
    pub trained_tokens: u64,
    pub length: LengthStats,
}

/// One tokenized sample before the length policy.
pub struct Encoded {
    pub ids: Vec<u32>,
    pub trained: Vec<u8>,
}

/// Tokenizes one formatted sample and derives its mask from the trained byte spans: a token
/// carries loss when its byte range overlaps a trained span. Tokens the tokenizer inserts
/// (bos) have empty ranges and are never trained.
pub fn encode(
    tok: &TextTokenizer,
    f: &Formatted,
    train_on_inputs: bool,
    cache: &mut EncodeCache,
) -> Result<Encoded, String> {
    let enc = tok.encode_offsets(f.text.as_str(), f.add_special_tokens, cache)?;
    let mut ids = enc.ids;
    let mut trained: Vec<u8> = enc
        .offsets
        .iter()
        .zip(&enc.special)
        .map(|(&(s, e), &special)| {
            let hit = s < e && f.trained.iter().any(|&(a, b)| s < b && e > a);
            let inserted = special == 1 && s == e;
            (!inserted && (train_on_inputs || hit)) as u8
        })
        .collect();
    if let Some(t) = f.append_eos {
        let eos = tok.eos_id().ok_or_else(|| {
            "the format appends eos but the tokenizer has no eos_token".to_string()
        })?;
        ids.push(eos);
        trained.push(t as u8);
    }
    Ok(Encoded { ids, trained })
}

/// How many unusable records the statistics name.
pub const UNUSABLE_SHOWN: usize = 5;

pub fn tokenize_records(
    tok: &TextTokenizer,
    fmt: &DataFormat,
    records: &[Record],
    fctx: &FormatCtx<'_>,
    opts: &TokenizeOpts<'_>,
) -> Result<(TokenSet, TokenizeStats), DataError> {
    let bad = |record: usize, message: String| DataError::BadRecord {
        dataset: opts.dataset_name.to_string(),
        path: opts.dataset_path.to_string(),
        record,
        message,
    };
    let encoded: Vec<Result<Encoded, (usize, String)>> = records
        .par_iter()
        .enumerate()
        .map_init(EncodeCache::default, |cache, (i, r)| {
            let f = format_record(fmt, &r.value, fctx).map_err(|m| (i, m))?;
            encode(tok, &f, opts.train_on_inputs, cache).map_err(|m| (i, m))
        })
        .collect();
    let mut set = TokenSet::new();
    let mut stats = TokenizeStats {
        records: records.len() as u64,
        ..Default::default()
    };
    let mut lens = Vec::new();
    for (i, e) in encoded.into_iter().enumerate() {
        let mut e = match e {
            Ok(e) => e,
            Err((i, m)) => {
                stats.dropped_unusable += 1;
                if stats.unusable.len() < UNUSABLE_SHOWN {
                    let at = match records[i].line {
                        0 => format!("record {}", i + 1),
                        l => format!("line {l}"),
                    };
                    stats.unusable.push(format!("{at}: {m}"));
                }
                continue;
            }
        };
        if e.ids.len() > opts.sequence_len {
            match opts.excess {
                ExcessLength::Drop => {
                    stats.dropped_too_long += 1;
                    continue;
                }
                ExcessLength::Truncate => {
                    e.ids.truncate(opts.sequence_len);
                    e.trained.truncate(opts.sequence_len);
                    stats.truncated += 1;
                }
                ExcessLength::Raise => {
                    return Err(bad(
                        i,
                        with_line(
                            format!(
                                "{} tokens is longer than sequence_len {} (excess_length_strategy: raise); raise sequence_len or use `drop`/`truncate`",
                                e.ids.len(),
                                opts.sequence_len
                            ),
                            records[i].line,
                        ),
                    ))
                }
            }
        }
        if e.ids.len() < opts.min_sample_len {
            stats.dropped_too_short += 1;
            continue;
        }
        if !e.trained.contains(&1) {
            stats.dropped_untrained += 1;
            continue;
        }
        lens.push(e.ids.len() as u64);
        set.push(&e.ids, &e.trained, (opts.dataset_index, i as u32));
    }
    let h = set.header();
    stats.samples = h.samples;
    stats.tokens = h.tokens;
    stats.trained_tokens = h.trained_tokens;
    stats.length = LengthStats::of(lens);
    Ok((set, stats))
}

fn with_line(m: String, line: usize) -> String {
    if line > 0 {
        format!("{m} (line {line})")
    } else {
        m
    }
}
