//! YAML as Axolotl reads it: a document parsed by saphyr-parser (maintained; serde_yaml is
//! archived) into a plain [`Value`], with plain scalars resolved by YAML 1.1's implicit rules as
//! PyYAML applies them (`yes`/`no`/`on`/`off` are booleans, `2_048` an integer, `0o17`/`017`
//! octal, `1:30` sexagesimal, `~` null; `1e-4`, a string to PyYAML that Axolotl's schema reads as
//! a float, is a float), anchors, aliases and `<<` merge keys. Every mapping key and
//! sequence item's line and column is kept in [`Positions`], so errors name file:line:col for
//! block and flow style alike.

use saphyr_parser::{Event, Parser, ScalarStyle, Span};
use std::collections::HashMap;
use std::fmt;

/// A key path segment: a mapping key or a sequence index (`datasets[2].type`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Seg {
    Key(String),
    Index(usize),
}

pub fn path_string(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// A YAML number: integers and floats stay apart (`2` is not `2.0`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    Int(i64),
    Float(f64),
}

impl Number {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Number::Int(i) => u64::try_from(i).ok(),
            Number::Float(_) => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Number::Int(i) => Some(i),
            Number::Float(_) => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        Some(match *self {
            Number::Int(i) => i as f64,
            Number::Float(f) => f,
        })
    }
    pub fn is_f64(&self) -> bool {
        matches!(self, Number::Float(_))
    }
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Number::Int(i) => write!(f, "{i}"),
            Number::Float(x) if x.is_nan() => write!(f, ".nan"),
            Number::Float(x) if x.is_infinite() => {
                write!(f, "{}.inf", if *x < 0.0 { "-" } else { "" })
            }
            Number::Float(x) => {
                let s = format!("{x:?}");
                write!(f, "{s}")
            }
        }
    }
}

/// A YAML value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Number(Number),
    String(String),
    Sequence(Vec<Value>),
    Mapping(Mapping),
}

/// A mapping in document order. Keys are compared by value; a later duplicate replaces the
/// earlier entry (PyYAML's behaviour), which the parser reports as a warning.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Mapping {
    entries: Vec<(Value, Value)>,
}

impl Mapping {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    fn position(&self, k: &Value) -> Option<usize> {
        self.entries.iter().position(|(x, _)| x == k)
    }
    /// The value of a string key.
    pub fn get(&self, k: &str) -> Option<&Value> {
        self.entries
            .iter()
            .find(|(x, _)| x.as_str() == Some(k))
            .map(|(_, v)| v)
    }
    pub fn get_value(&self, k: &Value) -> Option<&Value> {
        self.position(k).map(|i| &self.entries[i].1)
    }
    pub fn get_mut(&mut self, k: &Value) -> Option<&mut Value> {
        let i = self.position(k)?;
        Some(&mut self.entries[i].1)
    }
    pub fn contains_key(&self, k: &Value) -> bool {
        self.position(k).is_some()
    }
    /// Sets `k` (in place when present, appended otherwise); the previous value.
    pub fn insert(&mut self, k: Value, v: Value) -> Option<Value> {
        match self.position(&k) {
            Some(i) => Some(std::mem::replace(&mut self.entries[i].1, v)),
            None => {
                self.entries.push((k, v));
                None
            }
        }
    }
    /// Removes a string key; its value.
    pub fn remove(&mut self, k: &str) -> Option<Value> {
        let i = self
            .entries
            .iter()
            .position(|(x, _)| x.as_str() == Some(k))?;
        Some(self.entries.remove(i).1)
    }
    pub fn iter(&self) -> impl Iterator<Item = (&Value, &Value)> {
        self.entries.iter().map(|(k, v)| (k, v))
    }
    pub fn keys(&self) -> impl Iterator<Item = &Value> {
        self.entries.iter().map(|(k, _)| k)
    }
    pub fn values(&self) -> impl Iterator<Item = &Value> {
        self.entries.iter().map(|(_, v)| v)
    }
}

impl<'a> IntoIterator for &'a Mapping {
    type Item = (&'a Value, &'a Value);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (Value, Value)>,
        fn(&'a (Value, Value)) -> (&'a Value, &'a Value),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter().map(|(k, v)| (k, v))
    }
}

impl IntoIterator for Mapping {
    type Item = (Value, Value);
    type IntoIter = std::vec::IntoIter<(Value, Value)>;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

impl Value {
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Number(n) => n.as_u64(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(n) => n.as_f64(),
            _ => None,
        }
    }
    pub fn as_mapping(&self) -> Option<&Mapping> {
        match self {
            Value::Mapping(m) => Some(m),
            _ => None,
        }
    }
    pub fn as_mapping_mut(&mut self) -> Option<&mut Mapping> {
        match self {
            Value::Mapping(m) => Some(m),
            _ => None,
        }
    }
    pub fn as_sequence(&self) -> Option<&Vec<Value>> {
        match self {
            Value::Sequence(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_sequence_mut(&mut self) -> Option<&mut Vec<Value>> {
        match self {
            Value::Sequence(s) => Some(s),
            _ => None,
        }
    }
    /// The value written inline (flow style), for messages.
    pub fn inline(&self) -> String {
        match self {
            Value::Null => "null".into(),
            Value::Bool(b) => b.to_string(),
            Value::Number(n) => n.to_string(),
            Value::String(s) => {
                if resolve_plain(s) == Value::String(s.clone())
                    && !s.is_empty()
                    && !s.contains([':', '#', ',', '[', ']', '{', '}', '\n', '"', '\''])
                {
                    s.clone()
                } else {
                    format!("{s:?}")
                }
            }
            Value::Sequence(items) => {
                let parts: Vec<String> = items.iter().map(Value::inline).collect();
                format!("[{}]", parts.join(", "))
            }
            Value::Mapping(m) => {
                let parts: Vec<String> = m
                    .iter()
                    .map(|(k, v)| format!("{}: {}", k.inline(), v.inline()))
                    .collect();
                format!("{{{}}}", parts.join(", "))
            }
        }
    }
}

/// As serde_json shows YAML (what sweep variant ids hash): mappings as objects with string keys.
impl serde::Serialize for Value {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Number(Number::Int(i)) => s.serialize_i64(*i),
            Value::Number(Number::Float(f)) => s.serialize_f64(*f),
            Value::String(x) => s.serialize_str(x),
            Value::Sequence(items) => {
                let mut q = s.serialize_seq(Some(items.len()))?;
                for i in items {
                    q.serialize_element(i)?;
                }
                q.end()
            }
            Value::Mapping(m) => {
                let mut q = s.serialize_map(Some(m.len()))?;
                for (k, v) in m {
                    match k {
                        Value::String(k) => q.serialize_entry(k, v)?,
                        other => q.serialize_entry(&other.inline(), v)?,
                    }
                }
                q.end()
            }
        }
    }
}

/// 1-based line and column of every mapping key and sequence item, by key path.
#[derive(Debug, Clone, Default)]
pub struct Positions {
    at: HashMap<Vec<Seg>, (usize, usize)>,
    /// Keys given twice in one mapping (the later one wins, as in PyYAML), with the later
    /// one's position.
    pub duplicates: Vec<(Vec<Seg>, (usize, usize))>,
}

impl Positions {
    /// The position of `path`, or of its deepest located prefix.
    pub fn find(&self, path: &[Seg]) -> Option<(usize, usize)> {
        (1..=path.len())
            .rev()
            .find_map(|n| self.at.get(&path[..n]).copied())
    }
}

/// A document that is not valid YAML (or uses a YAML feature kiln does not read).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line} column {column}: {message}")]
pub struct YamlError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

fn pos(span: &Span) -> (usize, usize) {
    (span.start.line(), span.start.col() + 1)
}

fn err_at(span: &Span, message: impl Into<String>) -> YamlError {
    let (line, column) = pos(span);
    YamlError {
        line,
        column,
        message: message.into(),
    }
}

/// PyYAML's implicit resolution of a plain scalar (YAML 1.1).
pub fn resolve_plain(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => {
            return Value::Bool(true)
        }
        "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off" | "OFF" => {
            return Value::Bool(false)
        }
        _ => {}
    }
    if let Some(i) = yaml11_int(s) {
        return Value::Number(Number::Int(i));
    }
    if let Some(f) = yaml11_float(s).or_else(|| exponent_float(s)) {
        return Value::Number(Number::Float(f));
    }
    Value::String(s.to_string())
}

/// `1e-4`, `2E5`, `1.0e5`: floats with an exponent that YAML 1.1's resolver misses (it wants a
/// dot and a signed exponent). PyYAML leaves them strings and Axolotl's schema then reads them as
/// floats; kiln reads them as floats here, so sweep values and labels are numbers too.
fn exponent_float(s: &str) -> Option<f64> {
    let (_, body) = split_sign(s);
    let (mant, exp) = body.split_once(['e', 'E'])?;
    let exp = exp.strip_prefix(['-', '+']).unwrap_or(exp);
    let digits = |t: &str| !t.is_empty() && t.chars().all(|c| c.is_ascii_digit());
    let mant_ok = match mant.split_once('.') {
        Some((a, b)) => {
            (digits(a) || a.is_empty())
                && (digits(b) || b.is_empty())
                && !(a.is_empty() && b.is_empty())
        }
        None => digits(mant),
    };
    (mant_ok && digits(exp)).then(|| s.parse().ok()).flatten()
}

fn split_sign(s: &str) -> (i64, &str) {
    match s.as_bytes().first() {
        Some(b'-') => (-1, &s[1..]),
        Some(b'+') => (1, &s[1..]),
        _ => (1, s),
    }
}

/// `[-+]?0b[01_]+ | [-+]?0[0-7_]+ | [-+]?(0|[1-9][0-9_]*) | [-+]?0x[0-9a-fA-F_]+ |
/// [-+]?[1-9][0-9_]*(:[0-5]?[0-9])+` (PyYAML's int resolver); also `0o17` (YAML 1.2).
fn yaml11_int(s: &str) -> Option<i64> {
    let (sign, body) = split_sign(s);
    if body.is_empty() {
        return None;
    }
    let digits = |t: &str, radix: u32| -> Option<i64> {
        let t: String = t.chars().filter(|c| *c != '_').collect();
        if t.is_empty() {
            return None;
        }
        i64::from_str_radix(&t, radix).ok()
    };
    let all = |t: &str, ok: fn(char) -> bool| !t.is_empty() && t.chars().all(|c| ok(c) || c == '_');
    let v = if let Some(b) = body.strip_prefix("0b") {
        all(b, |c| c == '0' || c == '1').then(|| digits(b, 2))??
    } else if let Some(x) = body.strip_prefix("0x") {
        all(x, |c| c.is_ascii_hexdigit()).then(|| digits(x, 16))??
    } else if let Some(o) = body.strip_prefix("0o") {
        all(o, |c| ('0'..='7').contains(&c)).then(|| digits(o, 8))??
    } else if body.contains(':') {
        let mut parts = body.split(':');
        let first = parts.next()?;
        if !first.starts_with(|c: char| ('1'..='9').contains(&c))
            || !all(first, |c| c.is_ascii_digit())
        {
            return None;
        }
        let mut v = digits(first, 10)?;
        for p in parts {
            if p.is_empty() || p.len() > 2 || !p.chars().all(|c| c.is_ascii_digit()) {
                return None;
            }
            let n: i64 = p.parse().ok()?;
            if n > 59 {
                return None;
            }
            v = v.checked_mul(60)?.checked_add(n)?;
        }
        v
    } else if body == "0" {
        0
    } else if let Some(o) = body.strip_prefix('0') {
        all(o, |c| ('0'..='7').contains(&c)).then(|| digits(o, 8))??
    } else if body.starts_with(|c: char| c.is_ascii_digit()) && all(body, |c| c.is_ascii_digit()) {
        digits(body, 10)?
    } else {
        return None;
    };
    v.checked_mul(sign)
}

/// `[-+]?([0-9][0-9_]*)?\.[0-9_]*([eE][-+][0-9]+)? | [-+]?[0-9][0-9_]*(:[0-5]?[0-9])+\.[0-9_]* |
/// [-+]?\.(inf|Inf|INF) | \.(nan|NaN|NAN)` (PyYAML's float resolver: a dot is required).
fn yaml11_float(s: &str) -> Option<f64> {
    let (sign, body) = split_sign(s);
    match body {
        ".inf" | ".Inf" | ".INF" => return Some(sign as f64 * f64::INFINITY),
        ".nan" | ".NaN" | ".NAN" if sign == 1 && !s.starts_with('+') => return Some(f64::NAN),
        _ => {}
    }
    if body.contains(':') {
        let (whole, frac) = body.rsplit_once('.')?;
        let mut parts = whole.split(':');
        let first = parts.next()?;
        if first.is_empty() || !first.chars().all(|c| c.is_ascii_digit() || c == '_') {
            return None;
        }
        let mut v: f64 = first.replace('_', "").parse().ok()?;
        for p in parts {
            if p.is_empty() || p.len() > 2 || !p.chars().all(|c| c.is_ascii_digit()) {
                return None;
            }
            let n: f64 = p.parse().ok()?;
            if n > 59.0 {
                return None;
            }
            v = v * 60.0 + n;
        }
        if !frac.chars().all(|c| c.is_ascii_digit() || c == '_') {
            return None;
        }
        let frac: String = frac.chars().filter(|c| *c != '_').collect();
        let f: f64 = format!("0.{frac}0").parse().ok()?;
        return Some(sign as f64 * (v + f));
    }
    let (mant, exp) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    };
    let (int, frac) = mant.split_once('.')?;
    if !int.is_empty() && !int.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    if int.is_empty() && !frac.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let ok = |t: &str| t.chars().all(|c| c.is_ascii_digit() || c == '_');
    if !ok(int) || !ok(frac) {
        return None;
    }
    if let Some(e) = exp {
        let digits = e.strip_prefix(['-', '+'])?;
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
    }
    let text: String = format!(
        "{}{}.{}0{}",
        if sign < 0 { "-" } else { "" },
        if int.is_empty() { "0" } else { int },
        frac,
        exp.map(|e| format!("e{e}")).unwrap_or_default()
    )
    .chars()
    .filter(|c| *c != '_')
    .collect();
    text.parse().ok()
}

/// A scalar with an explicit core tag (`!!str 42`, `!!int "7"`).
fn tagged_scalar(text: &str, tag: &str, span: &Span) -> Result<Value, YamlError> {
    let bad = || err_at(span, format!("`{text}` is not a valid !!{tag}"));
    Ok(match tag {
        "str" => Value::String(text.to_string()),
        "null" => Value::Null,
        "bool" => match resolve_plain(text) {
            v @ Value::Bool(_) => v,
            _ => return Err(bad()),
        },
        "int" => Value::Number(Number::Int(yaml11_int(text).ok_or_else(bad)?)),
        "float" => match resolve_plain(text) {
            Value::Number(n) => Value::Number(Number::Float(n.as_f64().ok_or_else(bad)?)),
            _ => Value::Number(Number::Float(text.parse().map_err(|_| bad())?)),
        },
        other => return Err(err_at(span, format!("unsupported YAML tag !!{other}"))),
    })
}

/// How deep collections may nest. Real configs stay under 10; the limit keeps a hostile file
/// from exhausting the stack of this recursive reader (it is refused at once instead).
pub const MAX_DEPTH: usize = 64;

struct Builder<'a> {
    parser: Parser<'a, saphyr_parser::StrInput<'a>>,
    anchors: HashMap<usize, Value>,
    positions: Positions,
}

impl<'a> Builder<'a> {
    fn next(&mut self) -> Result<(Event<'a>, Span), YamlError> {
        match self.parser.next_event() {
            Some(Ok(e)) => Ok(e),
            Some(Err(e)) => Err(YamlError {
                line: e.marker().line(),
                column: e.marker().col() + 1,
                message: if e.info().contains("recursion limit") {
                    "nested too deeply (the YAML parser's recursion limit); a config is a shallow mapping".into()
                } else {
                    e.info().to_string()
                },
            }),
            None => Err(YamlError {
                line: 0,
                column: 0,
                message: "unexpected end of the document".into(),
            }),
        }
    }

    fn anchor(&mut self, id: usize, v: &Value) {
        if id > 0 {
            self.anchors.insert(id, v.clone());
        }
    }

    /// Reads the node that starts with `ev` (its events up to its end).
    fn node(&mut self, ev: Event<'a>, span: Span, path: &[Seg]) -> Result<Value, YamlError> {
        if path.len() >= MAX_DEPTH
            && matches!(ev, Event::SequenceStart(..) | Event::MappingStart(..))
        {
            return Err(err_at(
                &span,
                format!("nested more than {MAX_DEPTH} levels deep; a config is a shallow mapping"),
            ));
        }
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let v = match &tag {
                    Some(t) if t.handle == "tag:yaml.org,2002:" || t.handle == "!!" => {
                        tagged_scalar(&text, &t.suffix, &span)?
                    }
                    Some(t) => {
                        return Err(err_at(&span, format!("unsupported YAML tag {t}")));
                    }
                    None if style == ScalarStyle::Plain => resolve_plain(&text),
                    None => Value::String(text.to_string()),
                };
                self.anchor(anchor, &v);
                Ok(v)
            }
            Event::Alias(id) => self
                .anchors
                .get(&id)
                .cloned()
                .ok_or_else(|| err_at(&span, "alias to an unknown anchor")),
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                loop {
                    let (ev, sp) = self.next()?;
                    if ev == Event::SequenceEnd {
                        break;
                    }
                    let mut p = path.to_vec();
                    p.push(Seg::Index(items.len()));
                    self.positions.at.insert(p.clone(), pos(&sp));
                    items.push(self.node(ev, sp, &p)?);
                }
                let v = Value::Sequence(items);
                self.anchor(anchor, &v);
                Ok(v)
            }
            Event::MappingStart(anchor, _) => {
                let v = Value::Mapping(self.mapping(path)?);
                self.anchor(anchor, &v);
                Ok(v)
            }
            other => Err(err_at(&span, format!("unexpected YAML event {other:?}"))),
        }
    }

    fn mapping(&mut self, path: &[Seg]) -> Result<Mapping, YamlError> {
        let mut m = Mapping::new();
        let mut merged: Vec<Mapping> = Vec::new();
        loop {
            let (ev, ksp) = self.next()?;
            if ev == Event::MappingEnd {
                break;
            }
            let is_merge =
                matches!(&ev, Event::Scalar(t, ScalarStyle::Plain, _, None) if t == "<<");
            let key = self.node(ev, ksp, path)?;
            let mut p = path.to_vec();
            p.push(Seg::Key(match &key {
                Value::String(s) => s.clone(),
                other => other.inline(),
            }));
            let (vev, vsp) = self.next()?;
            let value = self.node(vev, vsp, &p)?;
            if is_merge {
                match value {
                    Value::Mapping(x) => merged.push(x),
                    Value::Sequence(xs) => {
                        for x in xs {
                            match x {
                                Value::Mapping(x) => merged.push(x),
                                _ => return Err(err_at(&ksp, "`<<` merges mappings only")),
                            }
                        }
                    }
                    _ => return Err(err_at(&ksp, "`<<` merges mappings only")),
                }
                continue;
            }
            if m.contains_key(&key) {
                self.positions.duplicates.push((p.clone(), pos(&ksp)));
            }
            self.positions.at.insert(p, pos(&ksp));
            m.insert(key, value);
        }
        // Merged entries fill in keys the mapping does not set itself (earlier merges first).
        for x in merged {
            for (k, v) in x {
                if !m.contains_key(&k) {
                    m.insert(k, v);
                }
            }
        }
        Ok(m)
    }
}

/// Parses one YAML document; an empty document is `Null`.
///
/// libyaml and PyYAML accept a flow collection's closing `]` or `}` on a line of its own at the
/// parent key's indentation (one of Axolotl's own examples does this); YAML 1.2 and saphyr
/// refuse it. The bracket's indentation means nothing, so on that error the line is indented like
/// the line before it and parsing starts over (other lines, and every position, are unchanged).
pub fn parse(text: &str) -> Result<(Value, Positions), YamlError> {
    let mut text = std::borrow::Cow::Borrowed(text);
    for _ in 0..64 {
        match parse_strict(&text) {
            Err(e) if e.message == "invalid indentation" => {
                let Some(fixed) = indent_closing_bracket(&text, e.line) else {
                    return Err(e);
                };
                text = std::borrow::Cow::Owned(fixed);
            }
            other => return other,
        }
    }
    parse_strict(&text)
}

/// `text` with line `line` (1-based) indented like the previous non-blank line, when that line
/// holds only closing flow brackets (and what may follow them).
fn indent_closing_bracket(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.split('\n').collect();
    let i = line.checked_sub(1)?;
    let l = lines.get(i)?;
    let body = l.trim_start();
    if !body.starts_with([']', '}']) {
        return None;
    }
    let prev = lines[..i].iter().rev().find(|p| !p.trim().is_empty())?;
    let want = prev.len() - prev.trim_start().len();
    let have = l.len() - body.len();
    if want <= have {
        return None;
    }
    let mut out: Vec<String> = lines.iter().map(|x| x.to_string()).collect();
    out[i] = format!("{}{body}", " ".repeat(want));
    Some(out.join("\n"))
}

fn parse_strict(text: &str) -> Result<(Value, Positions), YamlError> {
    let mut b = Builder {
        parser: Parser::new_from_str(text),
        anchors: HashMap::new(),
        positions: Positions::default(),
    };
    let mut root = Value::Null;
    let mut docs = 0;
    loop {
        let (ev, span) = b.next()?;
        match ev {
            Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
            Event::StreamEnd => break,
            Event::DocumentStart(_) => {
                docs += 1;
                if docs > 1 {
                    return Err(err_at(
                        &span,
                        "more than one YAML document (`---`); a config is one document",
                    ));
                }
            }
            other => root = b.node(other, span, &[])?,
        }
    }
    Ok((root, b.positions))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Value {
        parse(&format!("k: {text}\n"))
            .unwrap()
            .0
            .as_mapping()
            .unwrap()
            .get("k")
            .cloned()
            .unwrap()
    }

    #[test]
    fn scalars_resolve_as_pyyaml_does() {
        // Oracle: PyYAML 6.0 `yaml.safe_load("k: ...")["k"]` for each.
        let int = |i| Value::Number(Number::Int(i));
        let float = |f| Value::Number(Number::Float(f));
        assert_eq!(one("2_048"), int(2048));
        assert_eq!(one("500_000"), int(500_000));
        assert_eq!(one("-12"), int(-12));
        assert_eq!(one("0x1F"), int(31));
        assert_eq!(one("017"), int(15));
        assert_eq!(one("0b101"), int(5));
        assert_eq!(one("1:30"), int(90));
        assert_eq!(one("0"), int(0));
        assert_eq!(one("1.5"), float(1.5));
        assert_eq!(one("2.0e-5"), float(2e-5));
        assert_eq!(one("1_000.5"), float(1000.5));
        assert_eq!(one(".5"), float(0.5));
        assert_eq!(one("-.inf"), float(f64::NEG_INFINITY));
        // No dot: a string to PyYAML, a float to Axolotl's schema after it, and to kiln.
        assert_eq!(one("1e-4"), float(1e-4));
        assert_eq!(one("2E5"), float(2e5));
        assert_eq!(one("1.0e5"), float(1e5));
        assert_eq!(one("e5"), Value::String("e5".into()));
        assert_eq!(one("1e"), Value::String("1e".into()));
        assert_eq!(one("1.2.3e4"), Value::String("1.2.3e4".into()));
        for t in ["yes", "Yes", "on", "ON", "true", "True"] {
            assert_eq!(one(t), Value::Bool(true), "{t}");
        }
        for f in ["no", "No", "off", "OFF", "false", "FALSE"] {
            assert_eq!(one(f), Value::Bool(false), "{f}");
        }
        for n in ["~", "null", "Null", ""] {
            assert_eq!(one(n), Value::Null, "{n:?}");
        }
        assert_eq!(one("\"yes\""), Value::String("yes".into()));
        assert_eq!(one("'2_048'"), Value::String("2_048".into()));
        assert_eq!(one("y"), Value::String("y".into()));
        assert_eq!(one("auto"), Value::String("auto".into()));
        assert_eq!(one("08"), Value::String("08".into()));
        assert_eq!(one("!!str 12"), Value::String("12".into()));
        assert_eq!(one("!!float 1"), float(1.0));
    }

    #[test]
    fn positions_cover_block_and_flow_style() {
        let text = "base_model: x\ndatasets:\n  - path: a.jsonl\n    type: alpaca\n  - {path: b.jsonl, type: completion}\nsequence_len: 512\n";
        let (_, p) = parse(text).unwrap();
        let k = |s: &str| Seg::Key(s.into());
        assert_eq!(p.find(&[k("sequence_len")]), Some((6, 1)));
        assert_eq!(
            p.find(&[k("datasets"), Seg::Index(0), k("type")]),
            Some((4, 5))
        );
        assert_eq!(p.find(&[k("datasets"), Seg::Index(1)]), Some((5, 5)));
        assert_eq!(
            p.find(&[k("datasets"), Seg::Index(1), k("type")]),
            Some((5, 21))
        );
        // A path below a located one answers the nearest located prefix.
        assert_eq!(
            p.find(&[k("datasets"), Seg::Index(0), k("type"), k("x")]),
            Some((4, 5))
        );
    }

    #[test]
    fn anchors_merges_and_duplicates() {
        let text = "base: &b {lr: 1.0e-4, r: 8}\nrun:\n  <<: *b\n  r: 16\nalias: *b\nk: 1\nk: 2\n";
        let (v, p) = parse(text).unwrap();
        let m = v.as_mapping().unwrap();
        let run = m.get("run").unwrap().as_mapping().unwrap();
        assert_eq!(run.get("r"), Some(&Value::Number(Number::Int(16))));
        assert_eq!(run.get("lr"), Some(&Value::Number(Number::Float(1e-4))));
        assert_eq!(m.get("alias"), m.get("base"));
        assert_eq!(m.get("k"), Some(&Value::Number(Number::Int(2))));
        assert_eq!(p.duplicates, vec![(vec![Seg::Key("k".into())], (7, 1))]);
    }

    #[test]
    fn a_closing_bracket_at_the_parent_indent_reads_as_pyyaml_reads_it() {
        // As in Axolotl's examples/llama-3/sparse-finetuning.yaml.
        let text = "a:\n  b:\n    targets: [\n      'x',\n      'y',\n    ]\n    start: 0\n";
        let (v, p) = parse(text).unwrap();
        let b = v
            .as_mapping()
            .unwrap()
            .get("a")
            .unwrap()
            .as_mapping()
            .unwrap()
            .get("b")
            .unwrap();
        let b = b.as_mapping().unwrap();
        assert_eq!(
            b.get("targets"),
            Some(&Value::Sequence(vec![
                Value::String("x".into()),
                Value::String("y".into())
            ]))
        );
        assert_eq!(b.get("start"), Some(&Value::Number(Number::Int(0))));
        let k = |s: &str| Seg::Key(s.into());
        assert_eq!(p.find(&[k("a"), k("b"), k("start")]), Some((7, 5)));
        // Real indentation errors still fail.
        assert!(parse("a:\n  b: 1\n c: 2\n").is_err());
    }

    #[test]
    fn deep_nesting_is_refused_at_once() {
        let t = std::time::Instant::now();
        for text in [
            format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000)),
            format!("a: {}1{}\n", "{b: ".repeat(10_000), "}".repeat(10_000)),
            (0..200)
                .map(|d| format!("{}k{d}:\n", "  ".repeat(d)))
                .collect::<String>(),
        ] {
            let e = parse(&text).unwrap_err();
            assert!(e.message.contains("nested"), "{e}");
        }
        // Block style is this reader's own limit (the parser does not stop it).
        let block: String = (0..200)
            .map(|d| format!("{}k{d}:\n", "  ".repeat(d)))
            .collect();
        let e = parse(&block).unwrap_err();
        assert!(e.message.contains("more than 64 levels"), "{e}");
        // 64 levels still read.
        let ok = format!("a: {}{}\n", "[".repeat(63), "]".repeat(63));
        assert!(parse(&ok).is_ok());
        assert!(t.elapsed().as_secs() < 5, "{:?}", t.elapsed());
    }

    #[test]
    fn errors_carry_positions() {
        let e = parse("a: 1\nb: [1, 2\n").unwrap_err();
        assert!(e.line >= 2, "{e}");
        let e = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert!(e.message.contains("more than one"), "{e}");
        let e = parse("a: !custom 1\n").unwrap_err();
        assert_eq!((e.line, e.column), (1, 4), "{e}");
    }
}
