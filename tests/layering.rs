//! kiln's top-level modules form a layered graph: this test reads every `crate::<module>` path in
//! `src/**` (use lines and inline paths alike, comments skipped), fails on a forbidden arrow and
//! on any import cycle between top-level modules. The rules are kept here and in
//! ARCHITECTURE.md ("Module layering"); the test checks the two lists agree.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// (module, modules it must not import); `*` = any other kiln module.
const FORBIDDEN: &[(&str, &[&str])] = &[
    ("config", &["*"]),
    ("rng", &["*"]),
    ("hash", &["*"]),
    ("ioerr", &["*"]),
    ("scheduler", &["model", "train", "data", "text"]),
    ("model", &["cache", "stages", "data"]),
    ("data", &["model"]),
    ("text", &["model", "data", "stages"]),
    ("stages", &["cli", "scheduler", "workspace"]),
];

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Top-level module -> the other top-level modules it names (`crate::x`).
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        // main.rs and src/cli/ are the binary: they may use everything (through `kiln::`).
        if top == "main" || top == "lib" || top == "cli" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let entry = g.entry(top.clone()).or_default();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            let mut rest = code;
            while let Some(i) = rest.find("crate::") {
                let after = &rest[i + "crate::".len()..];
                let name: String = after
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                // `use crate::{a, b}` lists are spelled out one path per module in kiln.
                if !name.is_empty() && name != top {
                    entry.insert(name);
                }
                rest = after;
            }
        }
    }
    g
}

#[test]
fn no_forbidden_arrow_between_modules() {
    let g = imports();
    let mut bad = Vec::new();
    for (m, banned) in FORBIDDEN {
        assert!(g.contains_key(*m), "module `{m}` not found under src/");
        for to in &g[*m] {
            if banned.contains(&"*") || banned.contains(&to.as_str()) {
                bad.push(format!("{m} → {to}"));
            }
        }
    }
    assert!(bad.is_empty(), "forbidden imports: {}", bad.join(", "));
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    let g = imports();
    // Depth-first search with colours; report the first cycle found as a path.
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|x| x == m).unwrap_or(0);
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(m, g, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, &g, &mut state, &mut Vec::new()) {
                panic!("import cycle: {}", c.join(" → "));
            }
        }
    }
}

#[test]
fn architecture_md_lists_the_same_rules() {
    let arch =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md"))
            .unwrap();
    for (m, banned) in FORBIDDEN {
        let line = if banned == &["*"] {
            format!("- `{m}` imports no other kiln module")
        } else {
            let list: Vec<String> = banned.iter().map(|b| format!("`{b}`")).collect();
            format!("- `{m}` never imports {}", list.join(", "))
        };
        assert!(
            arch.contains(&line),
            "ARCHITECTURE.md is missing the rule line: {line}"
        );
    }
}
