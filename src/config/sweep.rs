//! `sweep:`: a grid of values (`learning_rate: [1e-4, 2e-4]`) crossed with paired choices that
//! change together (`_: [{lora_r: 8, lora_alpha: 16}, {lora_r: 16, lora_alpha: 32}]`, Axolotl's
//! spelling). Each variant is the config with its values set; its id hashes only its own values,
//! so adding a value to the sweep never renames the variants that were already there.

use super::yaml::{Mapping, Value};
use super::{ConfigError, Problem};
use std::path::Path;

/// One point of the sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// 8 hex digits of blake3 over the variant's sorted key=value pairs.
    pub id: String,
    /// `learning_rate=0.0001 lora_r=8`.
    pub label: String,
    /// The values it sets, sorted by key.
    pub sets: Vec<(String, Value)>,
}

/// A value as a sweep label shows it.
pub fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".into(),
        other => serde_json::to_string(other).unwrap_or_default(),
    }
}

fn problem(path: &Path, key: &str, message: String, fix: &str) -> ConfigError {
    ConfigError::Invalid(
        vec![Problem {
            file: path.to_path_buf(),
            key: key.to_string(),
            line: None,
            column: None,
            message,
            fix: Some(fix.to_string()),
        }],
        vec![],
    )
}

/// Expands a `sweep:` mapping into variants (grid keys in file order, crossed with each paired
/// choice). Refuses empty lists, non-list grid values and sweeping a key twice.
pub fn expand(path: &Path, sweep: &Value) -> Result<Vec<Variant>, ConfigError> {
    let Value::Mapping(m) = sweep else {
        return Err(problem(
            path,
            "sweep",
            "expected a mapping of keys to lists of values".into(),
            "write `sweep: {learning_rate: [1e-4, 2e-4], lora_r: [8, 16]}`",
        ));
    };
    let mut grid: Vec<(String, Vec<Value>)> = Vec::new();
    let mut paired: Vec<Vec<(String, Value)>> = vec![Vec::new()];
    for (k, v) in m {
        let key = k.as_str().unwrap_or("").to_string();
        if key == "_" {
            let Value::Sequence(items) = v else {
                return Err(problem(
                    path,
                    "sweep._",
                    "expected a list of mappings (values that change together)".into(),
                    "write `_: [{lora_r: 8, lora_alpha: 16}, {lora_r: 16, lora_alpha: 32}]`",
                ));
            };
            let mut choices = Vec::new();
            for (i, it) in items.iter().enumerate() {
                let Value::Mapping(pm) = it else {
                    return Err(problem(
                        path,
                        &format!("sweep._[{i}]"),
                        "expected a mapping".into(),
                        "each paired choice is a mapping like {lora_r: 8, lora_alpha: 16}",
                    ));
                };
                let mut c: Vec<(String, Value)> = pm
                    .iter()
                    .map(|(k, v)| (k.as_str().unwrap_or("").to_string(), v.clone()))
                    .collect();
                c.sort_by(|a, b| a.0.cmp(&b.0));
                choices.push(c);
            }
            if choices.is_empty() {
                return Err(problem(
                    path,
                    "sweep._",
                    "is empty".into(),
                    "list at least one choice",
                ));
            }
            paired = choices;
            continue;
        }
        let values = match v {
            Value::Sequence(s) if !s.is_empty() => s.clone(),
            Value::Sequence(_) => {
                return Err(problem(
                    path,
                    &format!("sweep.{key}"),
                    "is empty".into(),
                    "list at least one value",
                ))
            }
            _ => {
                return Err(problem(
                    path,
                    &format!("sweep.{key}"),
                    "expected a list of values".into(),
                    &format!("write `{key}: [a, b]`"),
                ))
            }
        };
        grid.push((key, values));
    }
    let mut points: Vec<Vec<(String, Value)>> = vec![Vec::new()];
    for (k, values) in &grid {
        let mut next = Vec::new();
        for p in &points {
            for v in values {
                let mut q = p.clone();
                q.push((k.clone(), v.clone()));
                next.push(q);
            }
        }
        points = next;
    }
    let mut out = Vec::new();
    for p in &points {
        for c in &paired {
            let mut sets = p.clone();
            for (k, v) in c {
                if sets.iter().any(|(x, _)| x == k) {
                    return Err(problem(
                        path,
                        &format!("sweep._.{k}"),
                        format!("`{k}` is both a grid key and a paired key"),
                        "sweep each key in one place",
                    ));
                }
                sets.push((k.clone(), v.clone()));
            }
            sets.sort_by(|a, b| a.0.cmp(&b.0));
            let canon: Vec<(String, serde_json::Value)> = sets
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::to_value(v).unwrap_or_default()))
                .collect();
            let bytes = serde_json::to_vec(&canon).unwrap_or_default();
            let id = blake3::hash(&bytes).to_hex()[..8].to_string();
            let label = sets
                .iter()
                .map(|(k, v)| format!("{k}={}", show(v)))
                .collect::<Vec<_>>()
                .join(" ");
            if out.iter().any(|v: &Variant| v.id == id) {
                return Err(problem(
                    path,
                    "sweep",
                    format!("the variant {label} appears twice"),
                    "remove the duplicate value",
                ));
            }
            out.push(Variant { id, label, sets });
        }
    }
    Ok(out)
}

/// Sets a (possibly dotted) key in a config mapping.
pub fn set_key(root: &mut Mapping, key: &str, v: Value) {
    let mut cur = root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        let k = Value::String(p.to_string());
        if i + 1 == parts.len() {
            cur.insert(k, v);
            return;
        }
        if !matches!(cur.get_value(&k), Some(Value::Mapping(_))) {
            cur.insert(k.clone(), Value::Mapping(Mapping::new()));
        }
        match cur.get_mut(&k) {
            Some(Value::Mapping(m)) => cur = m,
            _ => return,
        }
    }
}
