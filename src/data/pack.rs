//! Merging tokenized datasets, the seeded shuffle, the train/validation split, and packing
//! samples into bins of `sequence_len` (best-fit decreasing). A bin keeps its samples' boundaries
//! so training masks attention between them and restarts position ids per sample.
//!
//! A packed split is a token set (see `binfmt`) whose samples are in bin order, plus
//! `bins.u64`: `bins + 1` offsets into the samples, and `pack.json`.

use super::binfmt::{read_u64s, write_bytes, write_le, TokenSet};
use super::DataError;
use crate::config::ValSetSize;
use crate::rng::SplitMix64;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PackHeader {
    pub format: String,
    pub version: u32,
    pub sequence_len: u64,
    pub packed: bool,
    pub samples: u64,
    pub bins: u64,
    pub tokens: u64,
    pub trained_tokens: u64,
    /// tokens / (bins × sequence_len) when packed; tokens / (samples × max length) otherwise.
    pub efficiency: f64,
    /// Preference pairs, each kept whole in one bin (see `TokenSet::paired`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paired: bool,
}

pub struct PackedSplit {
    pub set: TokenSet,
    pub bins: Vec<u64>,
    pub header: PackHeader,
}

impl PackedSplit {
    pub fn write(&self, dir: &Path) -> Result<(), DataError> {
        self.set.write(dir)?;
        write_le(
            &dir.join("bins.u64"),
            self.bins.iter().flat_map(|v| v.to_le_bytes()),
        )?;
        let h = serde_json::to_vec_pretty(&self.header).map_err(|e| DataError::Corrupt {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?;
        write_bytes(&dir.join("pack.json"), &h)
    }

    pub fn read(dir: &Path) -> Result<Self, DataError> {
        let set = TokenSet::read(dir)?;
        let bins = read_u64s(&dir.join("bins.u64"))?;
        let hp = dir.join("pack.json");
        let header: PackHeader =
            serde_json::from_slice(&std::fs::read(&hp).map_err(|source| DataError::Io {
                path: hp.clone(),
                source,
            })?)
            .map_err(|e| DataError::Corrupt {
                path: hp.clone(),
                message: e.to_string(),
            })?;
        if bins.len() as u64 != header.bins + 1 || bins.last().copied() != Some(set.len() as u64) {
            return Err(DataError::Corrupt {
                path: dir.to_path_buf(),
                message: "bins.u64 disagrees with the samples".into(),
            });
        }
        Ok(Self { set, bins, header })
    }

    /// Bin `b` as one training row: (token ids, trained flags, position ids).
    pub fn row(&self, b: usize) -> (Vec<u32>, Vec<u8>, Vec<u32>) {
        let (s0, s1) = (self.bins[b] as usize, self.bins[b + 1] as usize);
        let (a, z) = (self.set.offsets[s0] as usize, self.set.offsets[s1] as usize);
        (
            self.set.tokens[a..z].to_vec(),
            self.set.trained[a..z].to_vec(),
            self.position_ids(b),
        )
    }

    /// Position ids for bin `b`: restart at 0 for every sample in the bin.
    pub fn position_ids(&self, b: usize) -> Vec<u32> {
        let mut out = Vec::new();
        for s in self.bins[b] as usize..self.bins[b + 1] as usize {
            out.extend(0..self.set.sample_len(s) as u32);
        }
        out
    }
}

/// A unit reference: (set index, unit index) — a sample, or a preference pair of them.
pub type SampleRef = (usize, usize);

/// Merges the sets, shuffles with `seed` when asked, and splits off a validation part. The
/// units are samples, or (chosen, rejected) pairs of a paired set, which stay together.
pub fn merge_and_split(
    sets: &[TokenSet],
    shuffle: bool,
    seed: u64,
    val: ValSetSize,
) -> (Vec<SampleRef>, Vec<SampleRef>) {
    let mut all: Vec<SampleRef> = sets
        .iter()
        .enumerate()
        .flat_map(|(d, s)| (0..s.units()).map(move |i| (d, i)))
        .collect();
    if shuffle {
        SplitMix64::new(seed).shuffle(&mut all);
    }
    let n = all.len();
    let n_val = match val {
        ValSetSize::Fraction(f) => ((f * n as f64).ceil() as usize).min(n),
        ValSetSize::Count(c) => (c as usize).min(n),
    };
    let val_part = all.split_off(n - n_val);
    (all, val_part)
}

/// Best-fit decreasing: place each sample (longest first) into the open bin with the least
/// room that still fits it. Returns bins as lists of positions into `lens`.
pub fn best_fit_decreasing(lens: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    // Stable order for equal lengths keeps packing deterministic.
    order.sort_by(|&a, &b| lens[b].cmp(&lens[a]).then(a.cmp(&b)));
    let mut bins: Vec<Vec<usize>> = Vec::new();
    // remaining room -> bins with that room (lowest index first)
    let mut by_room: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in order {
        let len = lens[i].min(capacity);
        let slot = by_room
            .range(len..)
            .next()
            .map(|(&room, list)| (room, list[0]));
        let (bin, room) = match slot {
            Some((room, bin)) => {
                let list = by_room.get_mut(&room).map(|l| {
                    l.remove(0);
                    l.is_empty()
                });
                if list == Some(true) {
                    by_room.remove(&room);
                }
                (bin, room)
            }
            None => {
                bins.push(Vec::new());
                (bins.len() - 1, capacity)
            }
        };
        bins[bin].push(i);
        let left = room - len;
        if left > 0 {
            let l = by_room.entry(left).or_default();
            let pos = l.partition_point(|&x| x < bin);
            l.insert(pos, bin);
        }
    }
    bins
}

/// Builds one split. With `packed`, samples go into bins of `sequence_len` and the bins are
/// shuffled with `seed`; otherwise every sample is its own bin (optionally grouped by length).
pub fn build_split(
    sets: &[TokenSet],
    refs: &[SampleRef],
    sequence_len: usize,
    packed: bool,
    group_by_length: bool,
    seed: u64,
) -> PackedSplit {
    let lens: Vec<usize> = refs
        .iter()
        .map(|&(d, u)| sets[d].unit_samples(u).map(|i| sets[d].sample_len(i)).sum())
        .collect();
    // A pair's two sequences may each be up to sequence_len long: its bins hold twice that (the
    // same tokens as a batch of the two sequences side by side).
    let paired = sets.iter().any(|s| s.paired);
    let capacity = if paired {
        2 * sequence_len
    } else {
        sequence_len
    };
    let mut bins: Vec<Vec<usize>> = if packed {
        let mut b = best_fit_decreasing(&lens, capacity);
        SplitMix64::new(seed ^ 0x6b69_6c6e).shuffle(&mut b);
        b
    } else {
        (0..refs.len()).map(|i| vec![i]).collect()
    };
    if !packed && group_by_length {
        // Mega-batches of 64 samples sorted by length inside: batches pad less, order stays mixed.
        for chunk in bins.chunks_mut(64) {
            chunk.sort_by_key(|b| std::cmp::Reverse(lens[b[0]]));
        }
    }
    let mut set = TokenSet::new();
    set.paired = paired;
    let mut offsets = vec![0u64];
    for b in &bins {
        for &k in b {
            let (d, u) = refs[k];
            for i in sets[d].unit_samples(u) {
                let (ids, tr) = sets[d].sample(i);
                set.push(ids, tr, sets[d].sources[i]);
            }
            if let Some(&l) = sets[d].labels.get(u) {
                set.labels.push(l);
            }
        }
        offsets.push(set.len() as u64);
    }
    let h = set.header();
    let max_len = lens.iter().copied().max().unwrap_or(0);
    let denom = if packed {
        bins.len() * capacity
    } else {
        bins.len() * max_len
    };
    PackedSplit {
        header: PackHeader {
            format: "kiln.packed".into(),
            version: 1,
            sequence_len: sequence_len as u64,
            packed,
            samples: h.samples,
            bins: bins.len() as u64,
            tokens: h.tokens,
            trained_tokens: h.trained_tokens,
            efficiency: if denom == 0 {
                0.0
            } else {
                h.tokens as f64 / denom as f64
            },
            paired: set.paired,
        },
        set,
        bins: offsets,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bfd_never_overfills_and_packs_tightly() {
        let mut rng = SplitMix64::new(7);
        let lens: Vec<usize> = (0..2000).map(|_| 20 + rng.below(200) as usize).collect();
        let bins = best_fit_decreasing(&lens, 512);
        let mut seen = vec![false; lens.len()];
        for b in &bins {
            assert!(b.iter().map(|&i| lens[i]).sum::<usize>() <= 512);
            for &i in b {
                assert!(!seen[i]);
                seen[i] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
        let total: usize = lens.iter().sum();
        let eff = total as f64 / (bins.len() * 512) as f64;
        assert!(eff > 0.97, "efficiency {eff}");
    }

    #[test]
    fn split_is_deterministic_and_sized() {
        let mut s = TokenSet::new();
        for i in 0..100u32 {
            s.push(&[i, i], &[1, 1], (0, i));
        }
        let sets = vec![s];
        let a = merge_and_split(&sets, true, 1, ValSetSize::Fraction(0.1));
        let b = merge_and_split(&sets, true, 1, ValSetSize::Fraction(0.1));
        let c = merge_and_split(&sets, true, 2, ValSetSize::Fraction(0.1));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.1.len(), 10);
        assert_eq!(a.0.len(), 90);
    }
}
