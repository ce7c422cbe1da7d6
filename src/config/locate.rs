//! Finds the line and column of a key path (`datasets[2].type`) in YAML text, for error messages.
//! serde_yaml's `Value` carries no positions, so this scans the block-style text directly; for
//! flow-style values it answers the nearest enclosing key's position.

#[derive(Debug, Clone, PartialEq, Eq)]
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

struct Line<'a> {
    /// Column where the content starts, after indentation and any `- ` list markers.
    col: usize,
    /// Column of the first `- ` marker if this line starts a list item.
    dash_col: Option<usize>,
    content: &'a str,
}

pub struct Locator<'a> {
    lines: Vec<Option<Line<'a>>>,
}

impl<'a> Locator<'a> {
    pub fn new(text: &'a str) -> Self {
        let lines = text
            .lines()
            .map(|raw| {
                let trimmed = raw.trim_start();
                if trimmed.is_empty() || trimmed.starts_with('#') {
                    return None;
                }
                let indent = raw.len() - trimmed.len();
                let mut col = indent;
                let mut rest = trimmed;
                let mut dash_col = None;
                while rest.starts_with("- ") || rest == "-" {
                    if dash_col.is_none() {
                        dash_col = Some(col);
                    }
                    let after = rest[1..].trim_start();
                    col += rest.len() - after.len();
                    rest = after;
                }
                Some(Line {
                    col,
                    dash_col,
                    content: rest,
                })
            })
            .collect();
        Self { lines }
    }

    /// 1-based (line, column) of the path, or of its deepest locatable prefix.
    pub fn find(&self, path: &[Seg]) -> Option<(usize, usize)> {
        let mut start = 0;
        let mut end = self.lines.len();
        let mut min_col = 0;
        let mut found = None;
        for seg in path {
            match seg {
                Seg::Key(k) => {
                    let target_col = self.block_col(start, end, min_col)?;
                    let mut hit = None;
                    for i in start..end {
                        if let Some(l) = &self.lines[i] {
                            if l.col == target_col && key_of(l.content) == Some(k.as_str()) {
                                hit = Some(i);
                                break;
                            }
                        }
                    }
                    let i = hit?;
                    let col = self.lines[i].as_ref().map(|l| l.col).unwrap_or(0);
                    found = Some((i + 1, col + 1));
                    start = i + 1;
                    end = self.block_end(i + 1, end, col);
                    min_col = col + 1;
                }
                Seg::Index(n) => {
                    let mut items: Vec<usize> = Vec::new();
                    for i in start..end {
                        let Some(dc) = self.lines[i].as_ref().and_then(|l| l.dash_col) else {
                            continue;
                        };
                        let first = items
                            .first()
                            .and_then(|&f| self.lines[f].as_ref())
                            .and_then(|x| x.dash_col);
                        if dc >= min_col.saturating_sub(1) && (first.is_none() || first == Some(dc))
                        {
                            items.push(i);
                        }
                    }
                    let i = *items.get(*n)?;
                    let l = self.lines[i].as_ref()?;
                    found = Some((i + 1, l.dash_col.unwrap_or(l.col) + 1));
                    let next = items.get(n + 1).copied().unwrap_or(end);
                    // The item's own first key sits on the dash line.
                    start = i;
                    end = next;
                    min_col = l.col;
                }
            }
        }
        found
    }

    fn block_col(&self, start: usize, end: usize, min_col: usize) -> Option<usize> {
        (start..end)
            .filter_map(|i| self.lines[i].as_ref())
            .map(|l| l.col)
            .filter(|c| *c >= min_col)
            .min()
    }

    fn block_end(&self, from: usize, end: usize, col: usize) -> usize {
        for i in from..end {
            if let Some(l) = &self.lines[i] {
                let c = l.dash_col.unwrap_or(l.col);
                if c <= col && !(l.dash_col.is_some() && c == col) {
                    return i;
                }
            }
        }
        end
    }
}

fn key_of(content: &str) -> Option<&str> {
    let idx = content.find(':')?;
    let k = content[..idx].trim();
    let k = k.trim_matches(|c| c == '"' || c == '\'');
    Some(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_keys_and_items() {
        let text = "base_model: x\ndatasets:\n  - path: a.jsonl\n    type: alpaca\n  - path: b.jsonl\n    type: completion\nsequence_len: 512\n";
        let loc = Locator::new(text);
        assert_eq!(loc.find(&[Seg::Key("sequence_len".into())]), Some((7, 1)));
        assert_eq!(
            loc.find(&[
                Seg::Key("datasets".into()),
                Seg::Index(1),
                Seg::Key("type".into())
            ]),
            Some((6, 5))
        );
        assert_eq!(
            loc.find(&[
                Seg::Key("datasets".into()),
                Seg::Index(0),
                Seg::Key("path".into())
            ]),
            Some((3, 5))
        );
    }
}
