//! `kiln compare`: one row per sweep variant — its swept values and the metrics its stages
//! recorded in the index (final train loss, best eval loss and perplexity, tokens/s, train time).

use crate::scheduler::State;
use crate::workspace::{KilnError, Workspace};
use serde::Serialize;

/// The metric columns, in display order.
pub const METRICS: &[&str] = &[
    "final_loss",
    "best_eval_loss",
    "eval_perplexity",
    "tokens_per_s",
    "train_seconds",
];

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub variant: String,
    pub values: Vec<(String, String)>,
    /// Not built yet: every metric is None.
    pub built: bool,
    pub metrics: Vec<(String, Option<f64>)>,
}

impl Row {
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| *v)
    }
}

/// Rows for every variant (one row for a config without a sweep), sorted by `sort` ascending
/// (tokens_per_s descending), unbuilt variants last.
pub fn rows(ws: &Workspace, sort: &str) -> Result<Vec<Row>, KilnError> {
    let statuses = ws.scheduler().assess()?;
    let fresh_key = |name: &str| {
        statuses
            .iter()
            .find(|s| s.name == name && s.state == State::Fresh)
            .and_then(|s| s.key.clone())
    };
    let mut out = Vec::new();
    for v in &ws.variants {
        let train_key = v.stage("train").and_then(fresh_key);
        let eval_key = v.stage("evaluate").and_then(fresh_key);
        let (mut final_loss, mut tokens_per_s, mut best_eval, mut train_seconds) =
            (None, None, None::<f64>, None);
        if let Some(k) = &train_key {
            let ms = ws.index.metrics(k)?;
            let last = |name: &str| {
                ms.iter()
                    .filter(|(_, n, _)| n == name)
                    .max_by_key(|(step, _, _)| *step)
                    .map(|(_, _, v)| *v)
            };
            final_loss = last("loss");
            tokens_per_s = last("tokens_per_s");
            for (_, n, v) in &ms {
                if n == "eval_loss" {
                    best_eval = Some(best_eval.map_or(*v, |b| b.min(*v)));
                }
            }
            if let Some((_, _, dur, _)) = ws.index.stage(k)? {
                train_seconds = Some(dur as f64 / 1000.0);
            }
        }
        if let Some(k) = &eval_key {
            // The evaluate stage measures the final model on the whole val split.
            for (_, n, v) in ws.index.metrics(k)? {
                if n == "eval_loss" {
                    best_eval = Some(best_eval.map_or(v, |b| b.min(v)));
                }
            }
        }
        let m: Vec<(String, Option<f64>)> = [
            ("final_loss", final_loss),
            ("best_eval_loss", best_eval),
            ("eval_perplexity", best_eval.map(f64::exp)),
            ("tokens_per_s", tokens_per_s),
            ("train_seconds", train_seconds),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
        out.push(Row {
            variant: v.id.clone().unwrap_or_else(|| "-".into()),
            values: v.values.clone(),
            built: train_key.is_some(),
            metrics: m,
        });
    }
    let desc = sort == "tokens_per_s";
    out.sort_by(|a, b| match (a.metric(sort), b.metric(sort)) {
        (Some(x), Some(y)) => {
            if desc {
                y.total_cmp(&x)
            } else {
                x.total_cmp(&y)
            }
        }
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    });
    Ok(out)
}
