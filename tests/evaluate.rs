//! The evaluate stage on a tiny generated model: validation loss and perplexity (the same on the
//! merged model as on base + adapter), greedy answers to a prompts file, caching and stale
//! reasons, `kiln evaluate`, and config errors.

mod common;
use common::*;

fn project(extra: &str) -> Project {
    let p = Project::new(&format!(
        "adapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_linear: true\nmax_steps: 3\nwarmup_steps: 1\nseed: 3\n{extra}"
    ));
    write_tiny_model_dir(&p.path("model"), 17);
    std::fs::write(
        p.path("prompts.jsonl"),
        "{\"prompt\": \"the answer\"}\n{\"messages\": [{\"role\": \"system\", \"content\": \"be brief\"}, {\"role\": \"user\", \"content\": \"in the sea\"}]}\n",
    )
    .unwrap();
    p
}

fn results(p: &Project, sets: &[&str]) -> serde_json::Value {
    let dir = p.ws(sets).entry_of("evaluate").unwrap();
    serde_json::from_slice(&std::fs::read(dir.join("eval_results.json")).unwrap()).unwrap()
}

#[test]
fn evaluate_reports_loss_perplexity_and_answers_and_is_cached() {
    one_thread();
    let p = project("evaluate:\n  prompts: prompts.jsonl\n  max_new_tokens: 5\n");
    let (s, events) = p.run(&[]);
    assert!(s.built.contains(&"evaluate".to_string()), "{:?}", s.built);
    let r = results(&p, &[]);
    let loss = r["eval_loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{r}");
    assert!((r["eval_perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-9);
    assert!(r["samples"].as_u64().unwrap() > 0);
    assert_eq!(r["generations"], 2);
    assert!(events.iter().any(|e| matches!(e,
        kiln::events::Event::Metric { stage, name, .. } if stage == "evaluate" && name == "eval_loss")));

    // Recorded in the index's metrics table under the stage's key.
    let ws = p.ws(&[]);
    let key = ws.entry_of("evaluate").unwrap();
    let key = key.file_name().unwrap().to_str().unwrap();
    let m = ws.index.metrics(key).unwrap();
    assert!(
        m.iter()
            .any(|(_, n, v)| n == "eval_loss" && (*v - loss).abs() < 1e-12),
        "{m:?}"
    );

    let gens = std::fs::read_to_string(key_dir(&p, "evaluate").join("generations.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = gens
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l["response"].is_string()));
    assert_eq!(lines[1]["messages"][0]["role"], "system");

    // Nothing changed: nothing evaluated again.
    let (s, _) = p.run(&[]);
    assert!(s.built.is_empty(), "{:?}", s.built);
    // A new prompts file re-evaluates without retraining.
    std::fs::write(p.path("prompts.jsonl"), "{\"prompt\": \"other\"}\n").unwrap();
    let plan = p.plan(&[]);
    assert_eq!(stale_names(&plan), vec!["fetch.prompts", "evaluate"]);
    // A training change re-evaluates after retraining.
    let plan = p.plan(&["learning_rate=1e-3"]);
    assert!(stale_names(&plan).contains(&"evaluate".to_string()));
    assert_eq!(
        status(&plan, "evaluate").reason.as_deref(),
        Some("waiting on train")
    );

    // Through a merge stage: another key, the same loss within float tolerance.
    let (s, _) = p.run(&["merge_lora=true"]);
    assert!(s.built.contains(&"merge".to_string()));
    let merged = results(&p, &["merge_lora=true"]);
    let d = (merged["eval_loss"].as_f64().unwrap() - loss).abs();
    assert!(d < 1e-4, "merged vs unmerged eval loss differ by {d}");
}

fn key_dir(p: &Project, stage: &str) -> std::path::PathBuf {
    p.ws(&[]).entry_of(stage).unwrap()
}

#[test]
fn evaluate_output_is_reproducible_byte_for_byte() {
    one_thread();
    let a = project("evaluate:\n  prompts: prompts.jsonl\n  max_new_tokens: 4\n");
    let b = project("evaluate:\n  prompts: prompts.jsonl\n  max_new_tokens: 4\n");
    a.run(&[]);
    b.run(&[]);
    for f in ["eval_results.json", "generations.jsonl"] {
        assert_eq!(
            std::fs::read(key_dir(&a, "evaluate").join(f)).unwrap(),
            std::fs::read(key_dir(&b, "evaluate").join(f)).unwrap(),
            "{f} differs"
        );
    }
}

#[test]
fn kiln_evaluate_adds_the_stage_and_writes_output_dir_eval() {
    let p = project("");
    let (code, stdout, stderr) = p.kiln(&["evaluate", "kiln.yml"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("eval loss"), "{stdout}");
    assert!(stdout.contains("perplexity"), "{stdout}");
    assert!(p.path("outputs/eval/eval_results.json").exists());
}

#[test]
fn evaluate_config_errors_name_the_key_and_the_fix() {
    let p = project("evaluate:\n  prompt: prompts.jsonl\n");
    let e = kiln::workspace::Workspace::open(&p.config, &[])
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("evaluate.prompt") && e.contains("did you mean `prompts`"),
        "{e}"
    );

    let p = project("evaluate: true\n");
    let e = kiln::workspace::Workspace::open(&p.config, &["val_set_size=0".into()])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("nothing to evaluate"), "{e}");

    let p = project("evaluate:\n  prompts: missing.jsonl\n");
    let e = kiln::workspace::Workspace::open(&p.config, &[])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("missing.jsonl: no such file"), "{e}");
}
