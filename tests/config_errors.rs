//! Config validation: every problem at once, each with file, key, line and a fix.

use kiln::config::{load_str, ConfigError};
use std::path::Path;

fn problems(yaml: &str) -> Vec<kiln::config::Problem> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("d.jsonl"), "{}\n").unwrap();
    std::fs::create_dir_all(dir.path().join("m")).unwrap();
    let path = dir.path().join("c.yml");
    match load_str(&path, yaml, &[]) {
        Err(ConfigError::Invalid(p, _)) => p,
        Err(e) => panic!("unexpected error {e}"),
        Ok(l) => l.warnings,
    }
}

const BASE: &str = "base_model: m\ndatasets:\n  - path: d.jsonl\n    type: alpaca\n";

#[test]
fn unknown_key_gets_did_you_mean_with_line() {
    let p = problems(&format!("{BASE}learning_rat: 1e-4\n"));
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].key, "learning_rat");
    assert_eq!(p[0].line, Some(5));
    assert_eq!(p[0].fix.as_deref(), Some("did you mean `learning_rate`?"));
}

#[test]
fn every_problem_is_reported_at_once() {
    let p = problems("base_model: m\nsequence_len: 0\nlearning_rate: fast\ndatasets:\n  - path: d.jsonl\n    type: alpacca\n  - path: nope.jsonl\n    type: alpaca\n");
    let keys: Vec<&str> = p.iter().map(|x| x.key.as_str()).collect();
    assert_eq!(
        keys,
        vec![
            "sequence_len",
            "learning_rate",
            "datasets[0].type",
            "datasets[1].path"
        ],
        "{p:#?}"
    );
    assert_eq!(p[1].line, Some(3));
    assert!(p[1].message.contains("expected a number"));
    assert_eq!(p[2].line, Some(6));
    assert_eq!(p[2].fix.as_deref(), Some("did you mean `alpaca`?"));
    assert_eq!(p[3].line, Some(7));
    assert!(p[3].message.contains("no such file"));
}

#[test]
fn axolotl_keys_are_never_unknown() {
    // Every key of Axolotl's schema is recognised: handled, no effect, or not supported yet.
    for k in kiln::config::axolotl_keys::TOP_LEVEL {
        if ["base_model", "datasets"].contains(k) {
            continue;
        }
        let yaml = format!("{BASE}{k}: 123456\n");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("d.jsonl"), "{}\n").unwrap();
        std::fs::create_dir_all(dir.path().join("m")).unwrap();
        let r = load_str(&dir.path().join("c.yml"), &yaml, &[]);
        let all: Vec<kiln::config::Problem> = match r {
            Ok(l) => l.warnings,
            Err(ConfigError::Invalid(p, _)) => p,
            Err(e) => panic!("{k}: {e}"),
        };
        assert!(
            all.iter().all(|p| !p.message.contains("unknown key")),
            "{k} reported unknown: {all:?}"
        );
    }
}

#[test]
fn unsupported_keys_warn_or_fail_under_strict_and_nulls_are_absent() {
    let p = problems(&format!(
        "{BASE}adapter: lora\nloss_watchdog_threshold: 5.0\nfsdp: null\nxformers_attention: false\nbf16: auto\n"
    ));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(
        p[0].message,
        "not supported yet: loss_watchdog_threshold (stopping a run whose loss diverges)"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("d.jsonl"), "{}\n").unwrap();
    std::fs::create_dir_all(dir.path().join("m")).unwrap();
    let r = load_str(
        &dir.path().join("c.yml"),
        &format!("{BASE}strict: true\nloss_watchdog_threshold: 5.0\n"),
        &[],
    );
    assert!(
        matches!(r, Err(ConfigError::Invalid(p, _)) if p[0].message.starts_with("not supported yet: loss_watchdog_threshold"))
    );
}

#[test]
fn lenient_scalars_and_overrides() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("d.jsonl"), "{}\n").unwrap();
    std::fs::create_dir_all(dir.path().join("m")).unwrap();
    let yaml = format!("{BASE}learning_rate: 2e-5\nval_set_size: 100\nwandb_project: null\n");
    let l = load_str(
        &dir.path().join("c.yml"),
        &yaml,
        &["datasets[0].type=completion".into(), "seed=7".into()],
    )
    .unwrap();
    assert_eq!(l.settings.train.optim.learning_rate, 2e-5);
    assert_eq!(
        l.settings.val_set_size,
        kiln::config::ValSetSize::Count(100)
    );
    assert_eq!(l.settings.seed, 7);
    assert!(matches!(
        l.settings.datasets[0].format,
        kiln::config::DataFormat::Completion { .. }
    ));
    let _ = Path::new("");
}

#[test]
fn a_messy_axolotl_example_config_validates_with_warnings() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/axolotl-style-lora.yml");
    let text = std::fs::read_to_string(&path).unwrap();
    let l = load_str(&path, &text, &[]).unwrap();
    let s = &l.settings;
    assert_eq!(s.train.optim.learning_rate, 2e-4);
    assert_eq!(s.train.lora.lora_target_modules.len(), 7);
    assert_eq!(
        s.special_tokens.get("pad_token").map(String::as_str),
        Some("<|end_of_text|>")
    );
    assert!(
        matches!(&s.base_model, kiln::config::ModelSource::Hub { repo, .. } if repo == "NousResearch/Llama-3.2-1B")
    );
    assert_eq!(s.train.lora.lora_dropout, 0.05);
    let mut warned: Vec<String> = l
        .warnings
        .iter()
        .map(|w| format!("{}: {}", w.key, w.message.split(" (").next().unwrap_or("")))
        .collect();
    warned.sort();
    assert_eq!(
        warned,
        vec![
            "eval_max_new_tokens: not supported yet: eval_max_new_tokens",
            "flash_attention: has no effect in kiln: a PyTorch kernel choice; kiln uses its own kernels",
            "loss_watchdog_patience: not supported yet: loss_watchdog_patience",
            "loss_watchdog_threshold: not supported yet: loss_watchdog_threshold",
        ]
    );
    // Its 8-bit LoRA recipe is read: an int8 base, bitsandbytes' 8-bit AdamW, checkpointing.
    assert!(s.train.gradient_checkpointing);
    assert_eq!(
        s.train.base_weights,
        kiln::config::precision::BaseWeights::Int8
    );
    assert_eq!(
        s.train.optimizer_states,
        kiln::config::precision::OptimStates::Bnb8bit
    );
}

#[test]
fn lora_dropout_must_be_a_probability_and_waits_for_dora() {
    let p = problems(&format!("{BASE}adapter: lora\nlora_dropout: 1.5\n"));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].key, "lora_dropout");
    assert!(p[0].message.contains("not a dropout probability"), "{p:?}");
    let p = problems(&format!(
        "{BASE}adapter: lora\nlora_dropout: 0.1\npeft_use_dora: true\n"
    ));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].message
            .starts_with("not supported yet: lora_dropout > 0 together with peft_use_dora"),
        "{p:?}"
    );
    assert!(problems(&format!("{BASE}adapter: lora\nlora_dropout: 0.05\n")).is_empty());
}

fn settings(yaml: &str) -> kiln::config::Loaded {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("d.jsonl"), "{}\n").unwrap();
    std::fs::create_dir_all(dir.path().join("m")).unwrap();
    load_str(&dir.path().join("c.yml"), yaml, &[]).unwrap()
}

#[test]
fn yaml_reads_as_pyyaml_reads_it() {
    // Two of Axolotl's published examples write `sequence_len: 2_048` and `500_000`; PyYAML
    // (YAML 1.1) reads both as integers, and yes/no/on/off as booleans.
    let l = settings(&format!(
        "{BASE}sequence_len: 2_048\nmax_steps: 500_000\nlearning_rate: 1e-4\nweight_decay: 1.0e-2\nsample_packing: yes\ntrain_on_inputs: on\nshuffle_merged_datasets: no\ngroup_by_length: Off\n"
    ));
    let s = &l.settings;
    assert_eq!(s.sequence_len, 2048);
    assert_eq!(s.train.steps.max_steps, Some(500_000));
    assert_eq!(s.train.optim.learning_rate, 1e-4);
    assert_eq!(s.train.optim.weight_decay, 1e-2);
    assert!(s.sample_packing && s.train_on_inputs);
    assert!(!s.shuffle_merged_datasets && !s.group_by_length);
    // Quoted, they stay strings: a boolean key rejects "yes".
    let p = problems(&format!("{BASE}sample_packing: \"yes\"\n"));
    assert_eq!(p[0].key, "sample_packing", "{p:#?}");
}

#[test]
fn flow_style_values_are_located_exactly() {
    let p = problems(
        "base_model: m\ndatasets: [{path: d.jsonl, type: alpacca}]\nmicro_batch_size: {a: 1}\n",
    );
    let keys: Vec<&str> = p.iter().map(|x| x.key.as_str()).collect();
    assert_eq!(keys, ["micro_batch_size", "datasets[0].type"], "{p:#?}");
    assert_eq!((p[1].line, p[1].column), (Some(2), Some(28)));
    assert_eq!((p[0].line, p[0].column), (Some(3), Some(1)));
}

#[test]
fn yaml_syntax_errors_name_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yml");
    let Err(e) = load_str(&path, "base_model: m\ndatasets: [a, b\nseed: 1\n", &[]) else {
        panic!("invalid YAML accepted")
    };
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("{}:", path.display())) && msg.contains("not valid YAML"),
        "{msg}"
    );
    let ConfigError::Yaml { source, .. } = e else {
        panic!("{msg}")
    };
    assert!(source.line >= 2, "{msg}");
}

#[test]
fn a_key_given_twice_warns_and_the_later_value_wins() {
    let l = settings(&format!("{BASE}seed: 1\nseed: 7\n"));
    assert_eq!(l.settings.seed, 7);
    let w: Vec<&kiln::config::Problem> = l.warnings.iter().filter(|w| w.key == "seed").collect();
    assert_eq!(w.len(), 1, "{:#?}", l.warnings);
    assert_eq!(w[0].line, Some(6));
    assert!(w[0].message.contains("given twice"));
}

#[test]
fn run_lengths_that_train_nothing_are_refused_before_any_work() {
    let keys = |yaml: &str| -> Vec<String> {
        problems(&format!("{BASE}{yaml}"))
            .into_iter()
            .map(|p| p.key)
            .collect()
    };
    assert_eq!(keys("adapter: lora\nlora_r: 0\n"), ["lora_r"]);
    assert_eq!(keys("num_epochs: 0\n"), ["num_epochs"]);
    assert_eq!(keys("num_epochs: 0\nmax_steps: 10\n"), Vec::<String>::new());
    assert_eq!(keys("max_steps: 0\n"), ["max_steps"]);
    assert_eq!(
        keys("save_steps: -5\neval_steps: -0.5\n"),
        ["save_steps", "eval_steps"]
    );
    assert_eq!(keys("warmup_ratio: 1.5\n"), ["warmup_ratio"]);
    assert_eq!(keys("max_steps: 10\nwarmup_steps: 20\n"), ["warmup_steps"]);
    assert_eq!(
        keys("max_steps: 10\nwarmup_steps: 5\nsave_steps: 0\n"),
        Vec::<String>::new()
    );
    let p = problems(&format!("{BASE}adapter: lora\nlora_r: 0\n"));
    assert_eq!(p[0].line, Some(6));
    assert!(p[0].message.contains("trains nothing"), "{p:#?}");
}

#[test]
fn a_missing_local_looking_file_is_not_a_hub_lookup() {
    // `data/nope.jsonl` has the shape of `org/name`; its extension says it is a file.
    let p = problems(
        "base_model: models/nope.gguf\ndatasets:\n  - path: data/nope.jsonl\n    type: alpaca\n",
    );
    let keys: Vec<&str> = p.iter().map(|x| x.key.as_str()).collect();
    assert_eq!(keys, ["base_model", "datasets[0].path"], "{p:#?}");
    assert!(p[1].message.contains("no such file"), "{p:#?}");
    assert_eq!(p[1].line, Some(3));
}
