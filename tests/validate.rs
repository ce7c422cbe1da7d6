//! Inputs checked before work starts (`kiln validate`, and `kiln run` before it builds): bad
//! chat records named by data file and line, Jinja syntax errors named by config key (or
//! template file) and line, a training step that cannot fit in memory, and stage errors that name
//! the user's files rather than kiln's cache copies of them.

mod common;
use common::*;

/// Nothing was built: the cache holds no entry.
fn nothing_built(p: &Project) -> bool {
    !p.path("cache/objects").exists()
        || std::fs::read_dir(p.path("cache/objects")).unwrap().count() == 0
}

fn refused(p: &Project, want: &[&str]) -> String {
    let (code, out, err) = p.kiln(&["validate", "kiln.yml"]);
    assert_eq!(code, Some(2), "{out}{err}");
    for w in want {
        assert!(err.contains(w), "wanted {w:?} in:\n{err}");
    }
    let (code, _, err2) = p.kiln(&["run", "kiln.yml"]);
    assert_eq!(code, Some(2), "run: {err2}");
    for w in want {
        assert!(err2.contains(w), "run: wanted {w:?} in:\n{err2}");
    }
    assert!(nothing_built(p), "nothing is built before the refusal");
    err
}

#[test]
fn chat_records_with_null_or_non_string_content_are_named_by_file_and_line_and_dropped() {
    let p = Project::new("");
    let good = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}"#;
    let rows = [
        good,
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": null}]}"#,
        good,
        r#"{"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "x"}]}"#,
        r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}"#,
        r#"{"messages": [{"role": "user"}, {"role": "assistant", "content": "x", "tool_calls": null}]}"#,
        r#"{"messages": ["hello"]}"#,
        r#"{"messages": [{"role": 7, "content": "x"}]}"#,
    ];
    std::fs::write(p.path("data/chat.jsonl"), rows.join("\n") + "\n").unwrap();
    // validate names each by file and line, as warnings: the records are dropped, not fatal.
    let (code, out, err) = p.kiln(&["validate", "kiln.yml"]);
    assert_eq!(code, Some(0), "{out}{err}");
    for w in [
        "warning: data/chat.jsonl:2: `messages[1]`.content is null",
        "warning: data/chat.jsonl:4: `messages[0]`.content is a number, not a string",
        "warning: data/chat.jsonl:5: `messages[0]`.content is a list of content parts; not supported yet",
        "warning: data/chat.jsonl:6: `messages[0]`.content is missing",
        "warning: data/chat.jsonl:7: `messages[0]` is a string, not a message object",
        "1 more records the format cannot use, not shown (dropped too)",
    ] {
        assert!(err.contains(w), "wanted {w:?} in:\n{err}");
    }
    assert!(!err.contains("data/chat.jsonl:1:"), "{err}");
    assert!(!err.contains("data/chat.jsonl:3:"), "{err}");
    // The tokenize stage drops and counts them, naming the first few.
    let (code, out, err) = p.kiln(&["run", "kiln.yml", "--target", "pack"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        err.contains("datasets[1] (data/chat.jsonl): 6 of 8 records dropped: the format cannot use them (line 2: `messages[1]`.content is null;"),
        "{err}"
    );
    let ws = p.ws(&[]);
    let stats: serde_json::Value = serde_json::from_slice(
        &std::fs::read(ws.entry_of("tokenize[1]").unwrap().join("stats.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(stats["dropped_unusable"], 6);
    assert_eq!(stats["samples"], 2);
    assert_eq!(stats["unusable"].as_array().unwrap().len(), 5);

    // Nothing usable at all: the stage fails, saying why with the first record.
    std::fs::write(p.path("data/chat.jsonl"), rows[1].to_string() + "\n").unwrap();
    let (code, _, err) = p.kiln(&["run", "kiln.yml", "--target", "pack"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("no usable samples out of 1 records (1 the format cannot use,")
            && err.contains("the first unusable one, line 1: `messages[1]`.content is null"),
        "{err}"
    );
}

#[test]
fn validate_shows_the_warnings_with_the_errors() {
    let p = Project::new(
        "wandb_project: x
learning_rate: fast
",
    );
    let (code, _, err) = p.kiln(&["validate", "kiln.yml"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("error: kiln.yml:"), "{err}");
    assert!(
        err.contains("`learning_rate`: expected a number")
            && err.contains("warning: kiln.yml:")
            && err.contains("`wandb_project`: has no effect in kiln"),
        "{err}"
    );
}

#[test]
fn a_jinja_syntax_error_names_the_key_and_the_line_it_is_on() {
    // A `|` block: the template's line 3 is the config's line after the key, plus two.
    let p = Project::new("chat_template: jinja\nchat_template_jinja: |\n  {% for m in messages %}\n  {{ m.content }}\n  {% if m.role == %}x{% endif %}\n  {% endfor %}\n");
    let text = std::fs::read_to_string(&p.config).unwrap();
    let key_line = text
        .lines()
        .position(|l| l.starts_with("chat_template_jinja:"))
        .unwrap()
        + 1;
    refused(
        &p,
        &[
            &format!("kiln.yml:{}: `chat_template_jinja`: the chat template does not parse (its line 3): syntax error", key_line + 3),
        ],
    );

    // A template file named by the key: its own path and line.
    let p = Project::new("chat_template: jinja\nchat_template_jinja: templates/bad.jinja\n");
    std::fs::create_dir_all(p.path("templates")).unwrap();
    std::fs::write(
        p.path("templates/bad.jinja"),
        "{% for m in messages %}\n{{ m.content }}\n{% endfor\n",
    )
    .unwrap();
    refused(
        &p,
        &["templates/bad.jinja:3: `chat_template_jinja`: the chat template does not parse (its line 3)"],
    );
    // A missing template file is not taken for template text.
    std::fs::remove_file(p.path("templates/bad.jinja")).unwrap();
    refused(&p, &["templates/bad.jinja: no such template file"]);

    // The local model's own template.
    let p = Project::new("");
    let tc = p.path("model/tokenizer_config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&tc).unwrap()).unwrap();
    v["chat_template"] = serde_json::json!("{% for m in messages %}\n{{ m.content }\n{% endfor %}");
    std::fs::write(&tc, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    refused(
        &p,
        &[
            "model/tokenizer_config.json:",
            "`chat_template`: the model's chat template does not parse (its line 2)",
        ],
    );
}

#[test]
fn a_training_step_that_cannot_fit_in_memory_is_refused_with_the_estimate() {
    let p = Project::new("adapter: lora\nlora_r: 4\nlora_target_linear: true\nmax_steps: 1\nmicro_batch_size: 100000000\n");
    write_tiny_model_dir(&p.path("model"), 5);
    let err = refused(
        &p,
        &[
            "`micro_batch_size`: a training step of 100000000 × 512 tokens needs at least",
            "lower micro_batch_size or sequence_len",
        ],
    );
    assert!(
        err.contains("GiB for this model, and this machine has"),
        "{err}"
    );
}

#[test]
fn the_memory_bound_does_not_refuse_real_configs() {
    // SmolLM2-135M at 2048 tokens: a lower bound well under a laptop's memory, and above the
    // weights alone.
    let cfg = kiln::model::LlamaConfig {
        architecture: "llama".into(),
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: 30,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        rms_norm_eps: 1e-5,
        rope_theta: 1e5,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        attention_bias: false,
        sliding_window: None,
    };
    let b = kiln::plan::checks::step_memory_bound(&cfg, 1, 2048);
    let gib = b as f64 / (1u64 << 30) as f64;
    assert!((1.0..6.0).contains(&gib), "{gib} GiB");
    let b4 = kiln::plan::checks::step_memory_bound(&cfg, 4, 2048);
    assert!(b4 > b * 3, "activations grow with the batch");
}

#[test]
fn a_stage_error_names_the_users_file_not_the_cache_copy() {
    let p = Project::new("");
    // Valid JSON, but not a tokenizer: the tokenize stage fails reading its fetched copy.
    std::fs::write(
        p.path("model/tokenizer.json"),
        br#"{"model": {"type": "Nope"}}"#,
    )
    .unwrap();
    let (code, out, err) = p.kiln(&["run", "kiln.yml"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("model/tokenizer.json"), "{err}");
    assert!(
        !err.contains("objects/") && !err.contains("cache/tmp") && !err.contains("cache/work"),
        "a cache path in:\n{err}"
    );
}

#[test]
fn validate_checks_every_variant_of_a_sweep_or_the_one_picked() {
    let p = Project::new("sweep:\n  learning_rate: [1e-4, 2e-4]\n  lora_r: [4, 8]\n");
    let (code, out, err) = p.kiln(&["validate", "kiln.yml"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("kiln.yml: ok (4 variants, 2 datasets,"),
        "{out}"
    );
    // One bad value fails validation naming its variant.
    let p = Project::new("sweep:\n  learning_rate: [1e-4, fast]\n");
    let (code, _, err) = p.kiln(&["validate", "kiln.yml"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("`learning_rate`: expected a number") && err.contains("(sweep variant"),
        "{err}"
    );
    // --variant validates just that one (the sweep narrowed to it).
    let p = Project::new("sweep:\n  learning_rate: [1e-4, 3e-4]\n");
    let (_, out, _) = p.kiln(&["plan", "kiln.yml"]);
    let id = out
        .lines()
        .find(|l| l.contains("learning_rate=0.0003") || l.contains("learning_rate=3e-4"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("{out}"))
        .to_string();
    let (code, out, err) = p.kiln(&["validate", "kiln.yml", "--variant", &id]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("kiln.yml: ok (2 datasets"), "{out}");
}
