//! The build-system promises: keys cover exactly what a stage reads, stale reasons name the
//! change, early cutoff, corruption detection, interruption safety.

mod common;
use common::*;
use kiln::events::Event;
use kiln::scheduler::{RunOptions, State};

#[test]
fn second_run_does_nothing() {
    one_thread();
    let p = Project::new("");
    let (s1, _) = p.run(&[]);
    assert_eq!(s1.built.len(), 6, "{:?}", s1.built);
    let (s2, ev) = p.run(&[]);
    assert!(s2.built.is_empty());
    assert_eq!(s2.fresh.len(), 6);
    assert!(ev.iter().all(|e| matches!(e, Event::StageFresh { .. })));
}

#[test]
fn training_keys_leave_data_stages_fresh() {
    one_thread();
    let p = Project::new("");
    p.run(&[]);
    for set in [
        "learning_rate=1e-4",
        "num_epochs=3",
        "micro_batch_size=8",
        "lora_r=64",
    ] {
        let plan = p.plan(&[set]);
        assert!(
            stale_data_names(&plan).is_empty(),
            "{set} made {:?} stale",
            stale_data_names(&plan)
        );
    }
}

#[test]
fn sequence_len_makes_tokenize_and_pack_stale_with_reason() {
    one_thread();
    let p = Project::new("");
    p.run(&[]);
    let plan = p.plan(&["sequence_len=1024"]);
    assert_eq!(status(&plan, "fetch.model").state, State::Fresh);
    assert_eq!(status(&plan, "fetch.data[0]").state, State::Fresh);
    let t = status(&plan, "tokenize[0]");
    assert_eq!(t.state, State::Stale);
    assert_eq!(t.reason.as_deref(), Some("sequence_len changed 512 → 1024"));
    assert_eq!(
        status(&plan, "pack").reason.as_deref(),
        Some("waiting on tokenize[0]")
    );
    let (s, _) = p.run(&["sequence_len=1024"]);
    assert_eq!(s.built, vec!["tokenize[0]", "tokenize[1]", "pack"]);
}

#[test]
fn seed_only_restales_pack() {
    one_thread();
    let p = Project::new("seed: 42\n");
    p.run(&[]);
    let plan = p.plan(&["seed=7"]);
    assert_eq!(stale_data_names(&plan), vec!["pack"]);
    assert_eq!(
        status(&plan, "pack").reason.as_deref(),
        Some("seed changed 42 → 7")
    );
}

#[test]
fn train_on_inputs_restales_tokenize() {
    one_thread();
    let p = Project::new("");
    p.run(&[]);
    let plan = p.plan(&["train_on_inputs=true"]);
    assert_eq!(
        stale_data_names(&plan),
        vec!["tokenize[0]", "tokenize[1]", "pack"]
    );
    assert_eq!(
        status(&plan, "tokenize[0]").reason.as_deref(),
        Some("train_on_inputs changed false → true")
    );
}

#[test]
fn chat_template_change_restales_only_chat_datasets() {
    one_thread();
    let p = Project::new("");
    p.run(&[]);
    let plan = p.plan(&["chat_template=llama3"]);
    assert_eq!(
        status(&plan, "tokenize[0]").state,
        State::Fresh,
        "alpaca does not read the template"
    );
    let t = status(&plan, "tokenize[1]");
    assert_eq!(t.state, State::Stale);
    assert_eq!(t.reason.as_deref(), Some("chat_template changed"));
}

#[test]
fn tokenizer_bytes_change_restales_fetch_and_tokenize() {
    one_thread();
    let p = Project::new("");
    p.run(&[]);
    let cfg_path = p.path("model/tokenizer_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["chat_template"] = serde_json::json!(CHATML.replacen(
        "'\\n' + message['content']",
        "': ' + message['content']",
        1
    ));
    assert_ne!(cfg["chat_template"], serde_json::json!(CHATML));
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let plan = p.plan(&[]);
    let f = status(&plan, "fetch.model");
    assert_eq!(f.state, State::Stale);
    assert!(
        f.reason
            .as_deref()
            .unwrap()
            .contains("tokenizer_config.json changed"),
        "{:?}",
        f.reason
    );
    let (s, _) = p.run(&[]);
    assert_eq!(
        s.built,
        vec!["fetch.model", "tokenize[0]", "tokenize[1]", "pack"]
    );
    // Changing weights-only files would not touch tokenize: config.json is not a tokenizer file.
    std::fs::write(
        p.path("model/config.json"),
        b"{\"model_type\":\"llama\",\"hidden_size\":32}",
    )
    .unwrap();
    let (s, _) = p.run(&[]);
    assert_eq!(s.built, vec!["fetch.model"]);
}

#[test]
fn dataset_bytes_change_names_the_file_and_early_cutoff_keeps_pack() {
    one_thread();
    let p = Project::new("");
    p.run(&[]);
    let f = p.path("data/chat.jsonl");
    let text = std::fs::read_to_string(&f).unwrap();
    // Same records, different bytes: reformatted JSON.
    let reformatted: String = text
        .lines()
        .map(|l| {
            serde_json::to_string_pretty(&serde_json::from_str::<serde_json::Value>(l).unwrap())
                .unwrap()
                .replace('\n', " ")
                + "\n"
        })
        .collect();
    std::fs::write(&f, reformatted).unwrap();
    let plan = p.plan(&[]);
    let st = status(&plan, "fetch.data[1]");
    assert_eq!(st.state, State::Stale);
    assert!(
        st.reason.as_deref().unwrap().starts_with("input file ")
            && st
                .reason
                .as_deref()
                .unwrap()
                .ends_with("chat.jsonl changed"),
        "{:?}",
        st.reason
    );
    let (s, ev) = p.run(&[]);
    assert_eq!(
        s.built,
        vec!["fetch.data[1]", "tokenize[1]"],
        "pack must stay fresh: tokenize output is identical"
    );
    assert!(ev.contains(&Event::EarlyCutoff {
        name: "tokenize[1]".into()
    }));
    // A real content change goes all the way through.
    std::fs::write(&f, chat_rows(31)).unwrap();
    let (s, _) = p.run(&[]);
    assert_eq!(s.built, vec!["fetch.data[1]", "tokenize[1]", "pack"]);
}

#[test]
fn target_builds_only_what_it_needs() {
    one_thread();
    let p = Project::new("");
    let (s, _) = p.run_opts(
        &[],
        RunOptions {
            targets: vec!["tokenize[0]".into()],
            force: vec![],
            ..Default::default()
        },
    );
    assert_eq!(s.built, vec!["fetch.model", "fetch.data[0]", "tokenize[0]"]);
    let (s, _) = p.run_opts(
        &[],
        RunOptions {
            targets: vec!["tokenize".into()],
            force: vec![],
            ..Default::default()
        },
    );
    assert_eq!(s.built, vec!["fetch.data[1]", "tokenize[1]"]);
    let (s, _) = p.run_opts(
        &[],
        RunOptions {
            targets: vec![],
            force: vec!["pack".into()],
            ..Default::default()
        },
    );
    assert_eq!(s.built, vec!["pack"]);
}

#[test]
fn corrupted_entry_is_detected_and_rebuilt() {
    one_thread();
    let p = Project::new("");
    p.run(&[]);
    let ws = p.ws(&[]);
    let plan = ws.scheduler().assess().unwrap();
    let key = status(&plan, "tokenize[0]").key.clone().unwrap();
    let file = ws.cache.entry_dir(&key).join("tokens/tokens.u32");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[5] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    assert!(
        !ws.cache.verify(&key).is_empty(),
        "verify must see the flipped byte"
    );
    // A run that reads the entry (pack is forced to rebuild) detects it, quarantines, rebuilds.
    let (s, ev) = p.run_opts(
        &[],
        RunOptions {
            targets: vec![],
            force: vec!["pack".into()],
            ..Default::default()
        },
    );
    assert!(ev
        .iter()
        .any(|e| matches!(e, Event::Corrupt { name, .. } if name == "tokenize[0]")));
    assert!(s.built.contains(&"tokenize[0]".to_string()));
    assert!(ws.cache.verify(&key).is_empty());
}

#[test]
fn leftover_staging_from_a_killed_build_is_not_an_entry() {
    one_thread();
    let p = Project::new("");
    let ws = p.ws(&[]);
    // What kill -9 leaves behind: a staging directory of a process that no longer exists.
    let dead = ws.cache.root().join("tmp").join("deadbeef.999999999");
    std::fs::create_dir_all(dead.join("tokens")).unwrap();
    std::fs::write(dead.join("tokens/tokens.u32"), b"half").unwrap();
    assert!(ws.cache.keys().unwrap().is_empty());
    let (s, _) = p.run(&[]);
    assert_eq!(s.built.len(), 6);
    assert!(
        !dead.exists(),
        "the next run cleans dead staging directories"
    );
}

#[test]
fn two_concurrent_runs_build_each_key_once() {
    one_thread();
    let p = Project::new("");
    std::fs::write(p.path("data/alpaca.jsonl"), alpaca_rows(3000)).unwrap();
    let built: Vec<Vec<String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2).map(|_| s.spawn(|| p.run(&[]).0.built)).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut all: Vec<String> = built.concat();
    all.sort();
    let mut uniq = all.clone();
    uniq.dedup();
    assert_eq!(all, uniq, "a stage was built twice: {built:?}");
    assert_eq!(all.len(), 6);
}
