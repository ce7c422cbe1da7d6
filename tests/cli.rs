//! The `kiln` binary: JSON plan shape, exit codes, clear errors that leave the cache clean.

mod common;
use common::*;
use std::process::Command;

fn kiln(p: &Project, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(p.dir.path())
        .env("KILN_NUM_THREADS", "1")
        .env_remove("KILN_CACHE")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn plan_json_run_and_noop() {
    let p = Project::new("");
    let (code, out, _) = kiln(&p, &["plan", "kiln.yml", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let stages = v["stages"].as_array().unwrap();
    // No adapter: full fine-tuning, so a train stage after the data stages.
    assert_eq!(stages.len(), 7);
    for s in stages {
        for k in ["name", "kind", "key", "state", "reason", "deps"] {
            assert!(s.get(k).is_some(), "missing {k} in {s}");
        }
        assert!(["fetch", "tokenize", "pack", "train"].contains(&s["kind"].as_str().unwrap()));
    }
    assert_eq!(stages[0]["reason"], "never built");
    let (code, out, err) = kiln(&p, &["preprocess", "kiln.yml"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("batches per epoch"), "{out}");
    assert!(out.contains("efficiency"));
    let (code, out, _) = kiln(&p, &["run", "kiln.yml", "--target", "pack"]);
    assert_eq!(code, 0);
    assert!(out.contains("nothing to do: all 6 stages fresh"), "{out}");
    let (code, out, _) = kiln(&p, &["dag", "kiln.yml", "--dot"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("digraph kiln") && out.contains("->"));
    let (code, out, _) = kiln(
        &p,
        &[
            "preprocess",
            "kiln.yml",
            "--debug",
            "--json",
            "--debug-num-examples",
            "1",
        ],
    );
    assert_eq!(code, 0);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "one example per dataset");
    assert!(lines[0]["labels"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l == -100));
    assert_eq!(
        lines[0]["input_ids"].as_array().unwrap().len(),
        lines[0]["labels"].as_array().unwrap().len()
    );
    let (code, out, _) = kiln(&p, &["cache", "verify", "--dir", "cache"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("6 ok, 0 corrupt"));
}

#[test]
fn config_errors_exit_2_with_location() {
    let p = Project::new("learning_rat: 1\n");
    let (code, _, err) = kiln(&p, &["validate", "kiln.yml"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("kiln.yml:13:1: `learning_rat`: unknown key"),
        "{err}"
    );
    assert!(err.contains("did you mean `learning_rate`?"));
    let p = Project::new("");
    let (code, _, err) = kiln(&p, &["run", "kiln.yml", "--target", "tokenise"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("did you mean"), "{err}");
}

#[test]
fn malformed_jsonl_reports_file_line_and_leaves_no_entry() {
    let p = Project::new("");
    let mut text = alpaca_rows(3);
    text.push_str("{\"instruction\": \"x\", \"output\": }\n");
    std::fs::write(p.path("data/alpaca.jsonl"), text).unwrap();
    // Refused before any work, as a problem of the user's input.
    let (code, _, err) = kiln(&p, &["run", "kiln.yml"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("alpaca.jsonl:4: malformed JSON"), "{err}");
    // Nothing half-built: no tokenize[0] or pack entry, no staging leftovers.
    let ws = p.ws(&[]);
    let plan = ws.scheduler().assess().unwrap();
    assert_eq!(
        status(&plan, "tokenize[0]").state,
        kiln::scheduler::State::Stale
    );
    assert_eq!(
        std::fs::read_dir(ws.cache.root().join("tmp"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
    for k in ws.cache.keys().unwrap() {
        assert!(ws.cache.verify(&k).is_empty());
    }
}

#[test]
fn empty_dataset_and_bad_template_are_clear_errors() {
    let p = Project::new("");
    std::fs::write(p.path("data/alpaca.jsonl"), "").unwrap();
    let (code, _, err) = kiln(&p, &["run", "kiln.yml"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("datasets[0] (data/alpaca.jsonl): is empty"),
        "{err}"
    );
    let p = Project::new("chat_template: jinja\nchat_template_jinja: \"{% for m in messages %}{{ raise_exception('no system role allowed') }}{% endfor %}\"\n");
    let (code, _, err) = kiln(&p, &["run", "kiln.yml"]);
    assert_eq!(code, 1);
    assert!(err.contains("no system role allowed"), "{err}");
}

#[test]
fn cache_gc_keeps_referenced_entries() {
    let p = Project::new("");
    kiln(&p, &["run", "kiln.yml", "--target", "pack"]);
    kiln(
        &p,
        &["run", "kiln.yml", "--target", "pack", "--set", "seed=9"],
    );
    let (code, out, _) = kiln(&p, &["cache", "gc", "--dir", "cache", "--keep", "kiln.yml"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("removed 1 entries"),
        "the seed=9 pack entry goes: {out}"
    );
    let (_, out, _) = kiln(&p, &["run", "kiln.yml", "--target", "pack"]);
    assert!(out.contains("nothing to do"), "{out}");
}

#[test]
fn kill_dash_nine_mid_run_never_leaves_a_finished_looking_entry() {
    let p = Project::new("");
    // Big enough that tokenize takes a while.
    std::fs::write(p.path("data/alpaca.jsonl"), alpaca_rows(30000)).unwrap();
    for delay_ms in [30u64, 120, 300, 600] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["run", "kiln.yml", "--target", "pack"])
            .current_dir(p.dir.path())
            .env("KILN_NUM_THREADS", "1")
            .env_remove("KILN_CACHE")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL: no destructors, no cleanup
        let _ = child.wait();
        let ws = p.ws(&[]);
        for k in ws.cache.keys().unwrap() {
            assert!(
                ws.cache.manifest(&k).unwrap().is_some(),
                "entry {k} without manifest after kill at {delay_ms} ms"
            );
            assert!(
                ws.cache.verify(&k).is_empty(),
                "entry {k} damaged after kill at {delay_ms} ms"
            );
        }
    }
    // The next run finishes the job, and cleans the dead staging directories.
    let (code, out, err) = kiln(&p, &["run", "kiln.yml", "--target", "pack"]);
    assert_eq!(code, 0, "{out}{err}");
    let ws = p.ws(&[]);
    assert!(
        kiln::scheduler::State::Fresh == status(&ws.scheduler().assess().unwrap(), "pack").state
    );
    assert_eq!(
        std::fs::read_dir(ws.cache.root().join("tmp"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
}

#[test]
fn runs_lists_past_runs_with_built_and_reused_counts() {
    let p = Project::new("");
    kiln(&p, &["run", "kiln.yml", "--target", "pack"]);
    kiln(&p, &["run", "kiln.yml", "--target", "pack"]);
    let (code, out, err) = kiln(&p, &["runs", "--dir", "cache", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    // Newest first: the second run reused everything.
    assert_eq!(
        (rows[0]["built"].as_i64(), rows[0]["reused"].as_i64()),
        (Some(0), Some(6))
    );
    assert_eq!(
        (rows[1]["built"].as_i64(), rows[1]["reused"].as_i64()),
        (Some(6), Some(0))
    );
    assert!(rows
        .iter()
        .all(|r| r["outcome"] == "ok" && r["config"].as_str().unwrap().ends_with("kiln.yml")));
}

/// Exit codes (docs/commands.md): 0 ok, 1 a build or run failed, 2 the user's input (the
/// config, a flag, a command this config cannot do) is wrong.
#[test]
fn exit_codes_separate_bad_input_from_failed_builds() {
    let p = Project::new("");
    let code = |args: &[&str]| kiln(&p, args).0;
    assert_eq!(code(&["validate", "kiln.yml"]), 0);
    // Flags clap rejects, and closed sets checked by clap's value enums.
    assert_eq!(code(&["run", "kiln.yml", "--no-such-flag"]), 2);
    assert_eq!(code(&["export", "kiln.yml", "--quant", "q9_9"]), 2);
    assert_eq!(code(&["compare", "kiln.yml", "--sort", "speed"]), 2);
    assert_eq!(code(&["bench", "train", "--case", "lora-9"]), 2);
    // Inputs kiln rejects: a stage that does not exist, a variant of a config with no sweep,
    // a safetensors dtype that is a GGUF quant, a plot format it cannot write.
    assert_eq!(code(&["why", "no-such-stage", "kiln.yml"]), 2);
    assert_eq!(code(&["plan", "kiln.yml", "--variant", "abc"]), 2);
    let (c, _, err) = kiln(
        &p,
        &[
            "export",
            "kiln.yml",
            "--format",
            "safetensors",
            "--quant",
            "q8_0",
        ],
    );
    assert_eq!(c, 2, "{err}");
    assert!(err.contains("safetensors export takes a dtype"), "{err}");
    assert_eq!(code(&["plot", "kiln.yml", "-o", "curves.gif"]), 2);
    let (c, _, err) = kiln(&p, &["validate", "missing.yml"]);
    assert_eq!(c, 2, "{err}");
    // A missing dataset file named by the config is the user's input too.
    std::fs::rename(p.path("data/chat.jsonl"), p.path("data/gone.jsonl")).unwrap();
    let (c, _, err) = kiln(&p, &["plan", "kiln.yml"]);
    assert_eq!(c, 2, "{err}");
    std::fs::rename(p.path("data/gone.jsonl"), p.path("data/chat.jsonl")).unwrap();
    // Needing an output that is not built is a run failure, not bad input.
    let (c, _, err) = kiln(&p, &["inference", "kiln.yml", "--prompt", "hi"]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("train is not built"), "{err}");
    // --locked with no kiln.lock: nothing to check against.
    let (c, _, err) = kiln(&p, &["run", "kiln.yml", "--locked"]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("commit kiln.lock"), "{err}");
}

#[test]
fn preprocess_reports_unpacked_rows_and_shows_non_ascii_text_readably() {
    let p = Project::new("");
    let text = std::fs::read_to_string(&p.config)
        .unwrap()
        .replace("sample_packing: true", "sample_packing: false");
    std::fs::write(&p.config, text).unwrap();
    std::fs::write(
        p.path("data/alpaca.jsonl"),
        "{\"instruction\": \"Ünïcödé — naïve café\", \"output\": \"Grüße, 世界\"}\n".repeat(8),
    )
    .unwrap();
    let (code, out, err) = kiln(&p, &["preprocess", "kiln.yml"]);
    assert_eq!(code, 0, "{err}");
    let train = out.lines().find(|l| l.starts_with("train: ")).unwrap();
    assert!(
        train.contains("rows (one sample each, up to 512 tokens)") && !train.contains(" 0 tokens"),
        "{out}"
    );
    let (code, out, err) = kiln(
        &p,
        &[
            "preprocess",
            "kiln.yml",
            "--debug",
            "--debug-num-examples",
            "1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    for word in ["Ü", "ï", "é", "—", "世", "界", "ü", "ß"] {
        assert!(out.contains(word), "{word} not shown in:\n{out}");
    }
    assert!(!out.contains('\u{FFFD}'), "{out}");
}
