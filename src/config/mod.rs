//! The config: a raw YAML mapping (exactly what the user wrote, plus `--set` overrides) resolved
//! into typed, validated [`Settings`]. Stages never see the raw form.
//!
//! Validation collects every problem at once. Each names the file, the key path, the line and
//! column, and a fix. Unknown keys get a did-you-mean; keys Axolotl defines that kiln does not do
//! yet get "not supported yet" (an error under `strict: true`, a warning otherwise).

pub mod axolotl_keys;
mod export;
pub mod keys;
pub mod precision;
pub mod pref;
mod resolve;
pub mod sweep;
pub mod yaml;

pub use export::*;
pub use resolve::*;

use std::fmt;
use std::path::{Path, PathBuf};
use yaml::{path_string, Mapping, Positions, Seg, Value};

/// One problem found in a config.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub file: PathBuf,
    pub key: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
    pub fix: Option<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        if !self.key.is_empty() {
            write!(f, ": `{}`", self.key)?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n    fix: {fix}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{}:{}: not valid YAML: {}", path.display(), source.line, source.column, source.message)]
    Yaml {
        path: PathBuf,
        #[source]
        source: yaml::YamlError,
    },
    /// The config's errors, and the warnings found with them (shown too: a user fixing the
    /// errors should see the whole picture at once).
    #[error("{}", render_problems(.0, .1))]
    Invalid(Vec<Problem>, Vec<Problem>),
    #[error("--set {arg}: {message}")]
    BadOverride { arg: String, message: String },
}

fn render_problems(ps: &[Problem], warnings: &[Problem]) -> String {
    let mut s = format!(
        "{} problem{} in config:",
        ps.len(),
        if ps.len() == 1 { "" } else { "s" }
    );
    for p in ps {
        s.push_str("\n  error: ");
        s.push_str(&p.to_string().replace('\n', "\n  "));
    }
    if !warnings.is_empty() {
        s.push_str(&format!(
            "\nand {} warning{}:",
            warnings.len(),
            if warnings.len() == 1 { "" } else { "s" }
        ));
        for p in warnings {
            s.push_str("\n  warning: ");
            s.push_str(&p.to_string().replace('\n', "\n  "));
        }
    }
    s
}

/// Collects problems while reading one config file.
pub struct Ctx<'a> {
    pub file: PathBuf,
    pub dir: PathBuf,
    positions: &'a Positions,
    pub errors: Vec<Problem>,
    pub warnings: Vec<Problem>,
    pub strict: bool,
    /// Jinja templates the config gives, and where each was written.
    pub jinja: Vec<JinjaOrigin>,
}

impl<'a> Ctx<'a> {
    /// The line and column of `path` (or of its deepest located prefix).
    pub fn position(&self, path: &[Seg]) -> Option<(usize, usize)> {
        self.positions.find(path)
    }

    fn problem(&self, path: &[Seg], message: String, fix: Option<String>) -> Problem {
        let pos = self.positions.find(path);
        Problem {
            file: self.file.clone(),
            key: path_string(path),
            line: pos.map(|p| p.0),
            column: pos.map(|p| p.1),
            message,
            fix,
        }
    }

    pub fn error(&mut self, path: &[Seg], message: impl Into<String>, fix: Option<String>) {
        let p = self.problem(path, message.into(), fix);
        self.errors.push(p);
    }

    pub fn warn(&mut self, path: &[Seg], message: impl Into<String>, fix: Option<String>) {
        let p = self.problem(path, message.into(), fix);
        self.warnings.push(p);
    }

    /// "not supported yet": an error under `strict: true`, a warning otherwise.
    pub fn unsupported(&mut self, path: &[Seg], what: &str) {
        let msg = format!("not supported yet: {what}");
        let fix = Some(if self.strict {
            "remove the key, or set `strict: false` to continue without it".to_string()
        } else {
            "kiln continues without it; remove the key to silence this warning".to_string()
        });
        if self.strict {
            self.error(path, msg, fix);
        } else {
            self.warn(path, msg, fix);
        }
    }
}

/// The loaded config: its path, text, the mapping after `--set` overrides, and the typed settings.
pub struct Loaded {
    pub settings: Settings,
    pub warnings: Vec<Problem>,
}

/// Reads, overrides and resolves a config file. Relative paths inside it are resolved against
/// the config file's directory (then the working directory).
pub fn load(path: &Path, overrides: &[String]) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    load_str(path, &text, overrides)
}

pub fn load_str(path: &Path, text: &str, overrides: &[String]) -> Result<Loaded, ConfigError> {
    let (mut map, positions) = parse_mapping(path, text, overrides)?;
    if map.remove("sweep").is_some_and(|v| !v.is_null()) {
        return Err(ConfigError::Invalid(vec![Problem {
            file: path.to_path_buf(),
            key: "sweep".into(),
            line: None,
            column: None,
            message: "this command works on one configuration, and the config is a sweep".into(),
            fix: Some("pick a variant with --set (e.g. --set learning_rate=1e-4 and remove `sweep:`), or use `kiln plan` / `kiln run` / `kiln compare`".into()),
        }], vec![]));
    }
    resolve_mapping(path, &positions, map)
}

/// A config that may hold a `sweep:`: one (variant, settings) per point of the sweep, each with
/// its own `output_dir/<variant id>`; a config without a sweep gives one unnamed variant.
pub fn load_variants(
    path: &Path,
    overrides: &[String],
) -> Result<Vec<(Option<sweep::Variant>, Loaded)>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let (mut map, positions) = parse_mapping(path, &text, overrides)?;
    let Some(sw) = map.remove("sweep").filter(|v| !v.is_null()) else {
        return Ok(vec![(None, resolve_mapping(path, &positions, map)?)]);
    };
    let variants = sweep::expand(path, &sw)?;
    let base_out = map
        .get("output_dir")
        .and_then(|v| v.as_str())
        .unwrap_or("./outputs")
        .to_string();
    let mut out = Vec::with_capacity(variants.len());
    for v in variants {
        let mut m = map.clone();
        for (k, val) in &v.sets {
            sweep::set_key(&mut m, k, val.clone());
        }
        sweep::set_key(
            &mut m,
            "output_dir",
            Value::String(format!("{}/{}", base_out.trim_end_matches('/'), v.id)),
        );
        let loaded = resolve_mapping(path, &positions, m).map_err(|e| match e {
            ConfigError::Invalid(mut ps, ws) => {
                for p in &mut ps {
                    p.message = format!("{} (sweep variant {})", p.message, v.label);
                }
                ConfigError::Invalid(ps, ws)
            }
            other => other,
        })?;
        out.push((Some(v), loaded));
    }
    Ok(out)
}

fn parse_mapping(
    path: &Path,
    text: &str,
    overrides: &[String],
) -> Result<(Mapping, Positions), ConfigError> {
    let (mut value, positions) = yaml::parse(text).map_err(|source| ConfigError::Yaml {
        path: path.to_path_buf(),
        source,
    })?;
    if value.is_null() {
        value = Value::Mapping(Mapping::new());
    }
    for o in overrides {
        apply_override(&mut value, o)?;
    }
    match value {
        Value::Mapping(m) => Ok((m, positions)),
        _ => Err(ConfigError::Invalid(
            vec![Problem {
                file: path.to_path_buf(),
                key: String::new(),
                line: Some(1),
                column: Some(1),
                message: "the config must be a mapping of keys to values".into(),
                fix: Some("start the file with `base_model: ...`".into()),
            }],
            vec![],
        )),
    }
}

fn resolve_mapping(
    path: &Path,
    positions: &Positions,
    map: Mapping,
) -> Result<Loaded, ConfigError> {
    let dir = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_path_buf()
            }
        })
        .unwrap_or_else(|| PathBuf::from("."));
    let strict = matches!(map.get("strict"), Some(Value::Bool(true)));
    let mut ctx = Ctx {
        file: path.to_path_buf(),
        dir,
        positions,
        errors: Vec::new(),
        warnings: Vec::new(),
        strict,
        jinja: Vec::new(),
    };
    for (key, _) in &positions.duplicates {
        ctx.warn(
            key,
            "given twice in one mapping; the later value is used (as PyYAML does)",
            Some("remove one of them".into()),
        );
    }
    let settings = resolve::resolve(&mut ctx, &map);
    if !ctx.errors.is_empty() {
        return Err(ConfigError::Invalid(ctx.errors, ctx.warnings));
    }
    Ok(Loaded {
        settings,
        warnings: ctx.warnings,
    })
}

/// Parses `--set` paths: `a.b`, `datasets[0].type`, `datasets.0.type`.
pub fn parse_path(s: &str) -> Vec<Seg> {
    let mut out = Vec::new();
    for part in s.split('.') {
        let mut rest = part;
        if let Some(b) = rest.find('[') {
            if b > 0 {
                out.push(Seg::Key(rest[..b].to_string()));
            }
            rest = &rest[b..];
            while let Some(stripped) = rest.strip_prefix('[') {
                let close = stripped.find(']').unwrap_or(stripped.len());
                if let Ok(i) = stripped[..close].parse() {
                    out.push(Seg::Index(i));
                }
                rest = stripped.get(close + 1..).unwrap_or("");
            }
        } else if let Ok(i) = rest.parse::<usize>() {
            out.push(Seg::Index(i));
        } else {
            out.push(Seg::Key(rest.to_string()));
        }
    }
    out
}

fn apply_override(root: &mut Value, arg: &str) -> Result<(), ConfigError> {
    let bad = |message: &str| ConfigError::BadOverride {
        arg: arg.to_string(),
        message: message.to_string(),
    };
    let (k, v) = arg
        .split_once('=')
        .ok_or_else(|| bad("expected key=value, e.g. --set learning_rate=1e-4"))?;
    let new: Value = yaml::parse(v)
        .map(|(v, _)| v)
        .unwrap_or_else(|_| Value::String(v.to_string()));
    let path = parse_path(k.trim());
    if path.is_empty() {
        return Err(bad("empty key"));
    }
    let mut cur = root;
    for (i, seg) in path.iter().enumerate() {
        let last = i + 1 == path.len();
        match seg {
            Seg::Key(key) => {
                if cur.is_null() {
                    *cur = Value::Mapping(Mapping::new());
                }
                let m = cur
                    .as_mapping_mut()
                    .ok_or_else(|| bad(&format!("`{key}`'s parent is not a mapping")))?;
                let kv = Value::String(key.clone());
                if last {
                    m.insert(kv, new);
                    return Ok(());
                }
                if !m.contains_key(&kv) {
                    m.insert(kv.clone(), Value::Null);
                }
                cur = m
                    .get_mut(&kv)
                    .ok_or_else(|| bad("internal: key vanished"))?;
            }
            Seg::Index(n) => {
                let s = cur.as_sequence_mut().ok_or_else(|| {
                    bad(&format!("[{n}] applied to something that is not a list"))
                })?;
                let len = s.len();
                let slot = s
                    .get_mut(*n)
                    .ok_or_else(|| bad(&format!("index {n} out of range (list has {len})")))?;
                if last {
                    *slot = new;
                    return Ok(());
                }
                cur = slot;
            }
        }
    }
    Ok(())
}

/// Closest candidate by Jaro-Winkler similarity, if close enough to be a plausible typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let mut best: Option<(&str, f64)> = None;
    for c in candidates {
        let s = strsim::jaro_winkler(word, c);
        if s > best.map(|b| b.1).unwrap_or(0.0) {
            best = Some((c, s));
        }
    }
    best.filter(|b| b.1 >= 0.85).map(|b| b.0)
}
