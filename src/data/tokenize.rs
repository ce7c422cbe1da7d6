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
    /// Preference data: the pairs' prompt and completion lengths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pairs: Option<PairStats>,
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
    if let DataFormat::Preference { style } = fmt {
        return tokenize_pairs(tok, style, records, fctx, opts);
    }
    if let DataFormat::Unpaired { style } = fmt {
        return tokenize_unpaired(tok, style, records, fctx, opts);
    }
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
                note_unusable(&mut stats, records, i, m);
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

/// What a paired token set's statistics add: the prompt's and completions' lengths.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PairStats {
    pub pairs: u64,
    /// KTO: how many completions are desirable (`chosen` are then the completions' lengths,
    /// `rejected` the KL sequences').
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desirable: Option<u64>,
    pub prompt: LengthStats,
    pub chosen: LengthStats,
    pub rejected: LengthStats,
}

/// Encodes one of a pair's sequences; TRL's rule for a prompt that already starts with the bos
/// text would add it twice, so one is dropped. Returns (ids, trained, prompt length).
fn encode_seq(
    tok: &TextTokenizer,
    f: &Formatted,
    cache: &mut EncodeCache,
) -> Result<Encoded, String> {
    let mut e = encode(tok, f, false, cache)?;
    let bos = tok.bos_token.as_deref().and_then(|b| tok.token_id(b));
    if let Some(b) = bos {
        if e.ids.len() >= 2 && e.ids[0] == b && e.ids[1] == b {
            e.ids.remove(0);
            e.trained.remove(0);
        }
    }
    Ok(e)
}

/// KTO records -> a labelled paired token set: unit k is record k's prompt + completion and,
/// for the batch's KL estimate, its prompt with the previous usable record's completion (the
/// first takes the last's) — TRL's rotation of completions by one, over the dataset in order.
/// The length policy applies to the unit as for pairs.
fn tokenize_unpaired(
    tok: &TextTokenizer,
    style: &crate::config::PairStyle,
    records: &[Record],
    fctx: &FormatCtx<'_>,
    opts: &TokenizeOpts<'_>,
) -> Result<(TokenSet, TokenizeStats), DataError> {
    let mut stats = TokenizeStats {
        records: records.len() as u64,
        ..Default::default()
    };
    let mut texts = Vec::new();
    for (i, r) in records.iter().enumerate() {
        match super::format::unpaired_texts(style, &r.value) {
            Ok(t) => texts.push((i, t)),
            Err(m) => note_unusable(&mut stats, records, i, m),
        }
    }
    let n = texts.len();
    let encoded: Vec<Result<[Encoded; 2], String>> = (0..n)
        .into_par_iter()
        .map_init(EncodeCache::default, |cache, j| {
            let (_, (prompt, completion, _)) = &texts[j];
            let other = &texts[(j + n - 1) % n].1 .1;
            let main = super::format::completion_seq(prompt, completion, fctx.eos_token, false);
            let kl = super::format::completion_seq(prompt, other, fctx.eos_token, false);
            Ok([encode_seq(tok, &main, cache)?, encode_seq(tok, &kl, cache)?])
        })
        .collect();
    let units = encoded
        .into_iter()
        .enumerate()
        .map(|(j, e)| (texts[j].0, e, Some(u8::from(texts[j].1 .2))));
    unit_set(units, stats, records, opts)
}

/// The token set of two-sequence units (pairs, or KTO completions with their KL sequences and
/// labels): each encoded unit of record i through the length policy, then the statistics.
fn unit_set(
    units: impl Iterator<Item = (usize, Result<[Encoded; 2], String>, Option<u8>)>,
    mut stats: TokenizeStats,
    records: &[Record],
    opts: &TokenizeOpts<'_>,
) -> Result<(TokenSet, TokenizeStats), DataError> {
    let mut set = TokenSet::new();
    set.paired = true;
    let mut lens = Vec::new();
    for (i, e, label) in units {
        let unit = match e {
            Ok(u) => u,
            Err(m) => {
                note_unusable(&mut stats, records, i, m);
                continue;
            }
        };
        let Some(unit) = apply_unit_policy(unit, &mut stats, records, i, opts)? else {
            continue;
        };
        for e in &unit {
            lens.push(e.ids.len() as u64);
            set.push(&e.ids, &e.trained, (opts.dataset_index, i as u32));
        }
        set.labels.extend(label);
    }
    let h = set.header();
    stats.samples = h.samples;
    stats.tokens = h.tokens;
    stats.trained_tokens = h.trained_tokens;
    stats.length = LengthStats::of(lens);
    stats.pairs = Some(pair_stats(&set));
    Ok((set, stats))
}

/// Counts record `i` as unusable, naming the first few ("line 17: why").
fn note_unusable(stats: &mut TokenizeStats, records: &[Record], i: usize, m: String) {
    stats.dropped_unusable += 1;
    if stats.unusable.len() < UNUSABLE_SHOWN {
        let at = match records[i].line {
            0 => format!("record {}", i + 1),
            l => format!("line {l}"),
        };
        stats.unusable.push(format!("{at}: {m}"));
    }
}

/// The length policy for a unit of two sequences (a pair, or a KTO completion with its KL
/// sequence): None when it is dropped (counted).
fn apply_unit_policy(
    mut unit: [Encoded; 2],
    stats: &mut TokenizeStats,
    records: &[Record],
    i: usize,
    opts: &TokenizeOpts<'_>,
) -> Result<Option<[Encoded; 2]>, DataError> {
    let longest = unit.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    if longest > opts.sequence_len {
        match opts.excess {
            ExcessLength::Drop => {
                stats.dropped_too_long += 1;
                return Ok(None);
            }
            ExcessLength::Truncate => {
                for e in &mut unit {
                    e.ids.truncate(opts.sequence_len);
                    e.trained.truncate(opts.sequence_len);
                }
                stats.truncated += 1;
            }
            ExcessLength::Raise => {
                return Err(DataError::BadRecord {
                    dataset: opts.dataset_name.to_string(),
                    path: opts.dataset_path.to_string(),
                    record: i,
                    message: with_line(
                        format!(
                            "a preference record's sequence is {longest} tokens, longer than sequence_len {} (excess_length_strategy: raise); raise sequence_len or use `drop`/`truncate`",
                            opts.sequence_len
                        ),
                        records[i].line,
                    ),
                });
            }
        }
    }
    if unit.iter().any(|e| e.ids.len() < opts.min_sample_len) {
        stats.dropped_too_short += 1;
        return Ok(None);
    }
    // A completion with nothing trained (cut away, or empty) carries no preference.
    if unit.iter().any(|e| !e.trained.contains(&1)) {
        stats.dropped_untrained += 1;
        return Ok(None);
    }
    Ok(Some(unit))
}

/// Preference records -> a paired token set: samples 2k, 2k+1 are pair k's prompt + chosen and
/// prompt + rejected, the completions trained. The length policy applies to the pair: with
/// `drop` (Axolotl's behaviour for preference data) a pair either of whose sequences is longer
/// than sequence_len is dropped; `truncate` keeps the start of each (TRL's keep_start), dropping a
/// pair whose completion would be cut away entirely; `raise` stops.
fn tokenize_pairs(
    tok: &TextTokenizer,
    style: &crate::config::PairStyle,
    records: &[Record],
    fctx: &FormatCtx<'_>,
    opts: &TokenizeOpts<'_>,
) -> Result<(TokenSet, TokenizeStats), DataError> {
    let encoded: Vec<Result<[Encoded; 2], String>> = records
        .par_iter()
        .map_init(EncodeCache::default, |cache, r| {
            let [c, rj] = super::format::format_pair(style, &r.value, fctx)?;
            Ok([encode_seq(tok, &c, cache)?, encode_seq(tok, &rj, cache)?])
        })
        .collect();
    let stats = TokenizeStats {
        records: records.len() as u64,
        ..Default::default()
    };
    let units = encoded.into_iter().enumerate().map(|(i, e)| (i, e, None));
    unit_set(units, stats, records, opts)
}

/// Prompt and completion lengths of a paired token set (the prompt: the untrained tokens
/// before the first trained one).
pub fn pair_stats(set: &TokenSet) -> PairStats {
    let (mut p, mut c, mut r) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..set.units() {
        for (j, i) in set.unit_samples(k).enumerate() {
            let (_, tr) = set.sample(i);
            let prompt = tr.iter().position(|&t| t == 1).unwrap_or(tr.len());
            if j == 0 {
                p.push(prompt as u64);
                c.push((tr.len() - prompt) as u64);
            } else {
                r.push((tr.len() - prompt) as u64);
            }
        }
    }
    PairStats {
        pairs: set.units() as u64,
        desirable: (!set.labels.is_empty())
            .then(|| set.labels.iter().filter(|&&l| l == 1).count() as u64),
        prompt: LengthStats::of(p),
        chosen: LengthStats::of(c),
        rejected: LengthStats::of(r),
    }
}

fn with_line(m: String, line: usize) -> String {
    if line > 0 {
        format!("{m} (line {line})")
    } else {
        m
    }
}
