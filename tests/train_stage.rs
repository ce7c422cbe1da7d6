//! The train stage end to end on a tiny generated model: PEFT output layout, metrics, stale
//! reasons for training keys, and bit-identical adapters for identical inputs.

mod common;
use common::*;
use kiln::scheduler::State;

fn project() -> Project {
    let p = Project::new("adapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_linear: true\nmax_steps: 6\ngradient_accumulation_steps: 2\nwarmup_steps: 1\nseed: 3\n");
    write_tiny_model_dir(&p.path("model"), 17);
    let cfg = std::fs::read_to_string(&p.config)
        .unwrap()
        .replace("learning_rate: 2e-4", "learning_rate: 5e-3");
    std::fs::write(&p.config, cfg).unwrap();
    p
}

#[test]
fn train_stage_writes_a_peft_adapter_and_is_reproducible() {
    one_thread();
    let p = project();
    let (s, events) = p.run(&[]);
    assert!(s.built.contains(&"train".to_string()), "{:?}", s.built);
    let losses: Vec<f64> = events
        .iter()
        .filter_map(|e| match e {
            kiln::events::Event::Metric { name, value, .. } if name == "loss" => Some(*value),
            _ => None,
        })
        .collect();
    assert_eq!(losses.len(), 6);
    assert!(losses[5] < losses[0], "loss went {losses:?}");
    let ws = p.ws(&[]);
    let dir = ws.entry_of("train").unwrap();
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "trainer_state.json",
    ] {
        assert!(dir.join(f).exists(), "missing {f}");
    }
    let t = candle_core::safetensors::load(
        dir.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let a = &t["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"];
    let b = &t["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"];
    assert_eq!(a.dims(), &[4, 48]);
    assert_eq!(b.dims(), &[32, 4]);
    assert_eq!(t.len(), 2 * 7 * 2);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8.0);

    // Same inputs elsewhere: the same key and the same adapter bytes.
    let q = project();
    q.run(&[]);
    let qdir = q.ws(&[]).entry_of("train").unwrap();
    assert_eq!(
        std::fs::read(dir.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(qdir.join("adapter_model.safetensors")).unwrap(),
        "training is bit-reproducible"
    );

    // A training key restales only train, and the reason names it.
    let plan = p.plan(&["learning_rate=1e-3"]);
    assert_eq!(stale_names(&plan), vec!["train"]);
    assert_eq!(
        status(&plan, "train").reason.as_deref(),
        Some("learning_rate changed 0.005 → 0.001")
    );
    assert_eq!(status(&plan, "pack").state, State::Fresh);
}

#[test]
fn kiln_train_materializes_the_adapter_in_output_dir() {
    let p = project();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", "kiln.yml", "--set", "max_steps=2"])
        .current_dir(p.dir.path())
        .env("KILN_NUM_THREADS", "1")
        .env_remove("KILN_CACHE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("train step     2  loss"), "{stdout}");
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "config.json",
        "tokenizer.json",
    ] {
        assert!(
            p.path("outputs").join(f).exists(),
            "outputs/{f} missing; stdout: {stdout}"
        );
    }
}
