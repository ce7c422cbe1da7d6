//! `pack`: merges the tokenized datasets, shuffles with `seed`, splits off validation, and packs
//! samples into bins of `sequence_len` (or keeps one sample per bin without packing).
//! Reads: every tokenize entry. Writes: `train/`, `val/` (docs/formats.md) and `stats.json`.

use super::{write_json, RunCx, Stage, StageError, StageKind};
use crate::config::ValSetSize;
use crate::data::binfmt::TokenSet;
use crate::data::pack::{build_split, merge_and_split, PackHeader};
use crate::data::tokenize::TokenizeStats;
use serde::{Deserialize, Serialize};

/// Everything the pack stage reads, and so its key.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pack {
    pub sequence_len: u64,
    pub sample_packing: bool,
    pub eval_sample_packing: bool,
    pub val_set_size: ValSetSize,
    pub seed: u64,
    #[serde(rename = "shuffle_merged_datasets")]
    pub shuffle: bool,
    pub group_by_length: bool,
    /// Upstream entries are the training datasets' tokenize stages, then the test datasets'.
    pub n_train_sets: usize,
    /// `datasets[0]`, … in order: they label the per-dataset rows of `stats.json`.
    #[serde(rename = "datasets")]
    pub dataset_labels: Vec<String>,
}

/// What preprocess reports, stored with the packed data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PackStats {
    pub datasets: Vec<(String, TokenizeStats)>,
    pub train: PackHeader,
    pub val: PackHeader,
}

impl Stage for Pack {
    const KIND: StageKind = StageKind::Pack;
    // v2: the key is the canonical encoding of the typed inputs (kiln.stage/2); output unchanged.
    const VERSION: u32 = 2;

    type Neutral = ();

    fn run(&self, _: &(), cx: &mut RunCx<'_>) -> Result<(), StageError> {
        let mut sets = Vec::new();
        let mut stats = Vec::new();
        for (d, up) in cx.upstream.iter().enumerate() {
            let mut set = TokenSet::read(&up.dir.join("tokens"))?;
            for s in set.sources.iter_mut() {
                s.0 = d as u32;
            }
            sets.push(set);
            let sp = up.dir.join("stats.json");
            let st: TokenizeStats =
                serde_json::from_slice(&std::fs::read(&sp).map_err(super::io_err(&sp))?)
                    .map_err(|e| StageError::Invalid(format!("{}: {e}", sp.display())))?;
            stats.push((self.dataset_labels.get(d).cloned().unwrap_or_default(), st));
        }
        let (train_sets, test_sets) = sets.split_at(self.n_train_sets.min(sets.len()));
        let seq = self.sequence_len as usize;
        let (train_refs, mut val_refs) = merge_and_split(
            train_sets,
            self.shuffle,
            self.seed,
            if test_sets.is_empty() {
                self.val_set_size
            } else {
                ValSetSize::Fraction(0.0)
            },
        );
        let train = build_split(
            train_sets,
            &train_refs,
            seq,
            self.sample_packing,
            self.group_by_length,
            self.seed,
        );
        let val = if test_sets.is_empty() {
            build_split(
                train_sets,
                &val_refs,
                seq,
                self.eval_sample_packing,
                false,
                self.seed,
            )
        } else {
            val_refs = test_sets
                .iter()
                .enumerate()
                .flat_map(|(d, s)| (0..s.units()).map(move |i| (d, i)))
                .collect();
            build_split(
                test_sets,
                &val_refs,
                seq,
                self.eval_sample_packing,
                false,
                self.seed,
            )
        };
        if train.set.is_empty() {
            return Err(StageError::Invalid(
                "no training samples remain after the validation split; lower val_set_size".into(),
            ));
        }
        train.write(&cx.out.join("train"))?;
        val.write(&cx.out.join("val"))?;
        write_json(
            &cx.out.join("stats.json"),
            &PackStats {
                datasets: stats,
                train: train.header,
                val: val.header,
            },
        )
    }
}
