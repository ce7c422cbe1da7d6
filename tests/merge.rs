//! The merge stage and `kiln merge-lora` on a tiny generated model: merged logits equal
//! base + adapter logits, sharded output with an index, stale reasons, and adapter errors.

mod common;
use candle_core::Device;
use common::*;
use kiln::model::adapter::PeftAdapter;
use kiln::stages::train::load_model;

fn project() -> Project {
    let p = Project::new("adapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_linear: true\nmax_steps: 4\nwarmup_steps: 1\nseed: 3\nmerge_lora: true\nmax_shard_size: 40KB\n");
    write_tiny_model_dir(&p.path("model"), 17);
    let cfg = std::fs::read_to_string(&p.config)
        .unwrap()
        .replace("learning_rate: 2e-4", "learning_rate: 2e-2");
    std::fs::write(&p.config, cfg).unwrap();
    p
}

fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn merged_model_gives_the_logits_of_base_plus_adapter() {
    one_thread();
    let p = project();
    let (s, _) = p.run(&[]);
    assert!(s.built.contains(&"merge".to_string()), "{:?}", s.built);
    let ws = p.ws(&[]);
    let merged = ws.entry_of("merge").unwrap();
    let base_dir = ws.entry_of("fetch.model").unwrap();
    let adapter_dir = ws.entry_of("train").unwrap();

    // Sharded: several files under HF's names, and an index naming every tensor once.
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(merged.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    let shards: std::collections::BTreeSet<&str> =
        map.values().map(|v| v.as_str().unwrap()).collect();
    assert!(shards.len() > 1, "{shards:?}");
    assert!(shards.iter().all(|s| merged.join(s).exists()));
    assert!(map.contains_key("model.layers.1.mlp.down_proj.weight"));
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(merged.join(f).exists(), "missing {f}");
    }
    let gen: serde_json::Value =
        serde_json::from_slice(&std::fs::read(merged.join("generation_config.json")).unwrap())
            .unwrap();
    assert!(gen["eos_token_id"].is_u64(), "{gen}");

    let dev = Device::Cpu;
    let m = load_model(&merged, &dev).unwrap();
    let mut with_adapter = load_model(&base_dir, &dev).unwrap();
    PeftAdapter::load(&adapter_dir, &dev)
        .unwrap()
        .apply(&mut with_adapter)
        .unwrap();
    let base = load_model(&base_dir, &dev).unwrap();
    let ids: Vec<u32> = (0..24).map(|i| (i * 7 + 3) % 60).collect();
    let lm = m.forward_one(&ids, &dev).unwrap();
    let la = with_adapter.forward_one(&ids, &dev).unwrap();
    let lb = base.forward_one(&ids, &dev).unwrap();
    let d = max_abs_diff(&lm, &la);
    assert!(d < 1e-4, "merged vs base+adapter differ by {d}");
    let moved = max_abs_diff(&lm, &lb);
    assert!(
        moved > 1e-3,
        "the adapter changed nothing ({moved}); the test would prove nothing"
    );

    // A merge-only key restales merge alone; a training key restales train and merge.
    let plan = p.plan(&["max_shard_size=1GB"]);
    assert_eq!(stale_names(&plan), vec!["merge"]);
    let plan = p.plan(&["learning_rate=1e-2"]);
    assert_eq!(stale_names(&plan), vec!["train", "merge"]);
    assert_eq!(
        status(&plan, "merge").reason.as_deref(),
        Some("waiting on train")
    );
}

#[test]
fn kiln_merge_lora_writes_output_dir_merged_and_merges_a_given_adapter() {
    let p = project();
    // No merge_lora in the config: the command adds the stage.
    let cfg = std::fs::read_to_string(&p.config)
        .unwrap()
        .replace("merge_lora: true\n", "")
        .replace("max_shard_size: 40KB\n", "");
    std::fs::write(&p.config, cfg).unwrap();
    assert!(p.plan(&[]).iter().all(|s| s.name != "merge"));
    let kiln = |args: &[&str]| p.kiln(args);
    let (code, stdout, stderr) = kiln(&["merge-lora", "kiln.yml"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let merged = p.path("outputs/merged");
    assert!(merged.join("model.safetensors").exists(), "{stdout}");
    // transformers' from_pretrained refuses safetensors without {"format": "pt"} metadata.
    let bytes = std::fs::read(merged.join("model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata().as_ref().and_then(|m| m.get("format")),
        Some(&"pt".to_string())
    );
    assert!(merged.join("tokenizer.json").exists());
    assert!(p.path("outputs/adapter_model.safetensors").exists());

    // Again: nothing rebuilt.
    let (code, stdout, _) = kiln(&["merge-lora", "kiln.yml"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("nothing to do"), "{stdout}");

    // An adapter from elsewhere, written where asked; same bytes as the cached merge of the
    // same adapter.
    let (code, stdout, stderr) = kiln(&[
        "merge-lora",
        "kiln.yml",
        "--lora-model-dir",
        "outputs",
        "--output-dir",
        "elsewhere/m",
    ]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert_eq!(
        std::fs::read(p.path("elsewhere/m/model.safetensors")).unwrap(),
        std::fs::read(merged.join("model.safetensors")).unwrap()
    );
    assert!(!p.path("elsewhere/.m.kiln-partial").exists());

    // A DoRA adapter is refused with a clear reason, and nothing is written.
    let cfg_path = p.path("outputs/adapter_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["use_dora"] = serde_json::Value::Bool(true);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let (code, _, stderr) = kiln(&[
        "merge-lora",
        "kiln.yml",
        "--lora-model-dir",
        "outputs",
        "--output-dir",
        "dora",
    ]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("DoRA"), "{stderr}");
    assert!(!p.path("dora").exists());
}

#[test]
fn an_adapter_for_another_model_is_refused_naming_the_module() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let mut t = std::collections::HashMap::new();
    t.insert(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string(),
        candle_core::Tensor::zeros((2, 99), candle_core::DType::F32, &dev).unwrap(),
    );
    t.insert(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".to_string(),
        candle_core::Tensor::zeros((32, 2), candle_core::DType::F32, &dev).unwrap(),
    );
    candle_core::safetensors::save(&t, dir.path().join("adapter_model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("adapter_config.json"),
        r#"{"peft_type":"LORA","r":2,"lora_alpha":4}"#,
    )
    .unwrap();
    let a = PeftAdapter::load(dir.path(), &dev).unwrap();
    let mut m = tiny_model(1);
    let e = a.apply(&mut m).unwrap_err().to_string();
    assert!(
        e.contains("model.layers.0.self_attn.q_proj") && e.contains("another model"),
        "{e}"
    );
}

#[test]
fn dora_trains_a_magnitude_vector_and_merges_to_the_same_logits() {
    one_thread();
    let p = Project::new("adapter: lora\npeft_use_dora: true\nlora_r: 4\nlora_alpha: 8\nlora_target_linear: true\nmax_steps: 4\nwarmup_steps: 1\nseed: 3\nmerge_lora: true\n");
    write_tiny_model_dir(&p.path("model"), 17);
    let cfg = std::fs::read_to_string(&p.config)
        .unwrap()
        .replace("learning_rate: 2e-4", "learning_rate: 2e-2");
    std::fs::write(&p.config, cfg).unwrap();
    let (_, events) = p.run(&[]);
    let losses = metric_values(&events, "loss");
    assert!(losses[3] < losses[0], "{losses:?}");
    let ws = p.ws(&[]);
    let adapter = ws.entry_of("train").unwrap();
    let dev = Device::Cpu;
    let t =
        candle_core::safetensors::load(adapter.join("adapter_model.safetensors"), &dev).unwrap();
    let m = &t["base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"];
    assert_eq!(m.dims(), &[32]);
    assert_eq!(t.len(), 3 * 7 * 2, "A, B and a magnitude per adapted layer");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(adapter.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["use_dora"], true);

    let base_dir = ws.entry_of("fetch.model").unwrap();
    let merged = load_model(&ws.entry_of("merge").unwrap(), &dev).unwrap();
    let mut with_adapter = load_model(&base_dir, &dev).unwrap();
    PeftAdapter::load(&adapter, &dev)
        .unwrap()
        .apply(&mut with_adapter)
        .unwrap();
    let base = load_model(&base_dir, &dev).unwrap();
    let ids: Vec<u32> = (0..24).map(|i| (i * 5 + 1) % 60).collect();
    let lm = merged.forward_one(&ids, &dev).unwrap();
    let la = with_adapter.forward_one(&ids, &dev).unwrap();
    let d = max_abs_diff(&lm, &la);
    assert!(d < 1e-4, "merged DoRA vs applied DoRA differ by {d}");
    assert!(max_abs_diff(&lm, &base.forward_one(&ids, &dev).unwrap()) > 1e-3);
    // A DoRA config keys the train stage differently from plain LoRA.
    let plan = p.plan(&["peft_use_dora=false"]);
    assert_eq!(status(&plan, "train").state, kiln::scheduler::State::Stale);
}

#[test]
fn modules_to_save_train_whole_tensors_that_merge_and_apply_alike() {
    one_thread();
    let p = Project::new("adapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_modules: [q_proj, v_proj]\nlora_modules_to_save: [lm_head, norm]\nmax_steps: 4\nwarmup_steps: 1\nseed: 3\nmerge_lora: true\n");
    write_untied_tiny_model_dir(&p.path("model"), 17);
    let cfg = std::fs::read_to_string(&p.config)
        .unwrap()
        .replace("learning_rate: 2e-4", "learning_rate: 5e-3");
    std::fs::write(&p.config, cfg).unwrap();
    p.run(&[]);
    let ws = p.ws(&[]);
    let adapter_dir = ws.entry_of("train").unwrap();
    let base_dir = ws.entry_of("fetch.model").unwrap();
    // PEFT's layout: the whole tensors under base_model.model.<name>, listed in the config.
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(adapter_dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        cfg["modules_to_save"],
        serde_json::json!(["lm_head", "norm"])
    );
    let dev = Device::Cpu;
    let a = candle_core::safetensors::load(adapter_dir.join("adapter_model.safetensors"), &dev)
        .unwrap();
    let base = candle_core::safetensors::load(base_dir.join("model.safetensors"), &dev).unwrap();
    for (k, hf) in [
        ("base_model.model.lm_head.weight", "lm_head.weight"),
        ("base_model.model.model.norm.weight", "model.norm.weight"),
    ] {
        let t = a.get(k).unwrap_or_else(|| panic!("no {k}"));
        assert!(max_abs_diff(t, &base[hf]) > 1e-4, "{k} was trained");
    }
    assert!(!a.contains_key("base_model.model.model.embed_tokens.weight"));
    // Merged = base + adapter (deltas and replaced tensors) = what inference applies.
    let merged = load_model(&ws.entry_of("merge").unwrap(), &dev).unwrap();
    let mut applied = load_model(&base_dir, &dev).unwrap();
    PeftAdapter::load(&adapter_dir, &dev)
        .unwrap()
        .apply(&mut applied)
        .unwrap();
    let ids: Vec<u32> = (0..24).map(|i| (i * 7 + 3) % 60).collect();
    let lm = merged.forward_one(&ids, &dev).unwrap();
    let la = applied.forward_one(&ids, &dev).unwrap();
    assert!(max_abs_diff(&lm, &la) < 1e-4);
    assert!(
        max_abs_diff(
            merged.lm_head.as_ref().unwrap(),
            &a["base_model.model.lm_head.weight"]
        ) == 0.0
    );

    // A tied model cannot hold a separate head: a clear error, not a silent tie-break.
    let t = Project::new(
        "adapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_modules_to_save: [lm_head]\nmax_steps: 1\n",
    );
    write_tiny_model_dir(&t.path("model"), 17);
    let (code, _, err) = t.kiln(&["train", "kiln.yml"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("ties lm_head to embed_tokens"), "{err}");
    // And a name that matches nothing says so.
    let u = Project::new(
        "adapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_modules_to_save: [score]\nmax_steps: 1\n",
    );
    write_tiny_model_dir(&u.path("model"), 17);
    let (_, _, err) = u.kiln(&["train", "kiln.yml"]);
    assert!(err.contains("`score` matches no module"), "{err}");
}
