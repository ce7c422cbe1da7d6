//! `compare` and `plot`: a sweep's variants side by side, as a table of metrics or loss curves.

use super::common::{open, usage, Common};
use anyhow::{Context, Result};
use std::path::PathBuf;

/// The metrics `compare` sorts by (kiln::compare::METRICS, as a closed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SortMetric {
    #[value(name = "final_loss")]
    FinalLoss,
    #[value(name = "best_eval_loss")]
    BestEvalLoss,
    #[value(name = "eval_perplexity")]
    EvalPerplexity,
    #[value(name = "tokens_per_s")]
    TokensPerS,
    #[value(name = "train_seconds")]
    TrainSeconds,
}

impl SortMetric {
    pub fn as_str(self) -> &'static str {
        match self {
            SortMetric::FinalLoss => "final_loss",
            SortMetric::BestEvalLoss => "best_eval_loss",
            SortMetric::EvalPerplexity => "eval_perplexity",
            SortMetric::TokensPerS => "tokens_per_s",
            SortMetric::TrainSeconds => "train_seconds",
        }
    }
}

#[derive(clap::Args)]
pub struct CompareArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, value_enum, default_value = "best_eval_loss")]
    sort: SortMetric,
    #[arg(long)]
    json: bool,
    #[arg(long, conflicts_with = "json")]
    csv: bool,
}

#[derive(clap::Args)]
pub struct PlotArgs {
    #[command(flatten)]
    common: Common,
    /// Output file: .svg or .png (the extension picks the format).
    #[arg(short = 'o', long, default_value = "curves.svg")]
    output: PathBuf,
}

fn print_table(table: &[Vec<String>]) {
    let cols = table.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            table
                .iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in table {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

pub fn compare(a: CompareArgs) -> Result<()> {
    let (json, csv) = (a.json, a.csv);
    let sort = a.sort.as_str().to_string();
    let common = a.common;
    let ws = open(&common)?;
    let rows = kiln::compare::rows(&ws, &sort)?;
    let keys: Vec<String> = ws
        .variants
        .first()
        .map(|v| v.values.iter().map(|(k, _)| k.clone()).collect())
        .unwrap_or_default();
    let fmt = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_default();
    if json {
        for r in &rows {
            let mut o = serde_json::json!({"variant": r.variant, "built": r.built});
            for (k, v) in &r.values {
                o[k] = serde_json::Value::String(v.clone());
            }
            for (k, v) in &r.metrics {
                o[k] = serde_json::json!(v);
            }
            println!("{o}");
        }
    } else if csv {
        let mut head = vec!["variant".to_string()];
        head.extend(keys.iter().cloned());
        head.extend(kiln::compare::METRICS.iter().map(|s| s.to_string()));
        println!("{}", head.join(","));
        for r in &rows {
            let mut cells = vec![r.variant.clone()];
            cells.extend(r.values.iter().map(|(_, v)| v.clone()));
            cells.extend(r.metrics.iter().map(|(_, v)| fmt(*v)));
            println!("{}", cells.join(","));
        }
    } else {
        let mut head = vec!["variant".to_string()];
        head.extend(keys.iter().cloned());
        head.extend(kiln::compare::METRICS.iter().map(|s| s.to_string()));
        let mut table = vec![head];
        for r in &rows {
            let mut cells = vec![r.variant.clone()];
            cells.extend(r.values.iter().map(|(_, v)| v.clone()));
            if r.built {
                cells.extend(r.metrics.iter().map(|(_, v)| fmt(*v)));
            } else {
                cells.push("(not built)".into());
            }
            table.push(cells);
        }
        print_table(&table);
    }
    Ok(())
}

pub fn plot(a: PlotArgs) -> Result<()> {
    let ext = a
        .output
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ext != "svg" && ext != "png" {
        return Err(usage(format!(
            "kiln plot: {}: cannot write .{ext}; name the output .svg or .png",
            a.output.display()
        )));
    }
    let ws = open(&a.common)?;
    let series = kiln::plot::series(&ws)?;
    if series.is_empty() {
        anyhow::bail!(
            "kiln plot: no variant of {} has a built train stage yet; run it first",
            a.common.config.display()
        );
    }
    let title = format!("{} — loss", a.common.config.display());
    let svg = kiln::plot::svg(&series, &title);
    let bytes = if ext == "png" {
        kiln::plot::png(&svg, 2.0).context("kiln plot")?
    } else {
        svg.into_bytes()
    };
    kiln::workspace::write_atomic(&a.output, &bytes)
        .with_context(|| format!("writing {}", a.output.display()))?;
    println!("{} curves in {}", series.len(), a.output.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::SortMetric;
    use clap::ValueEnum;

    #[test]
    fn sort_metrics_are_the_compare_metrics() {
        let ours: Vec<&str> = SortMetric::value_variants()
            .iter()
            .map(|m| m.as_str())
            .collect();
        assert_eq!(ours, kiln::compare::METRICS);
    }
}
