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
    let losses = metric_values(&events, "loss");
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
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata().as_ref().and_then(|m| m.get("format")),
        Some(&"pt".to_string())
    );
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
    let (code, stdout, stderr) = p.kiln(&["train", "kiln.yml", "--set", "max_steps=2"]);
    assert_eq!(code, Some(0), "{stderr}");
    // Not a terminal: one plain log line per logging step with every figure.
    let line = stdout
        .lines()
        .find(|l| l.contains("train step 2/2  loss "))
        .unwrap_or_else(|| panic!("no log line for step 2: {stdout}"));
    for part in [
        "lr ",
        "grad_norm ",
        "tokens/s",
        "samples/s",
        "elapsed 0m",
        "eta 0m00s",
        "peak ",
    ] {
        assert!(line.contains(part), "{part} missing in {line}");
    }
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

/// The bytes of the built train stage's adapter.
fn adapter(p: &Project) -> Vec<u8> {
    std::fs::read(
        p.ws(&[])
            .entry_of("train")
            .unwrap()
            .join("adapter_model.safetensors"),
    )
    .unwrap()
}

fn with_checkpoints(p: &Project) {
    let cfg = std::fs::read_to_string(&p.config)
        .unwrap()
        .replace("max_steps: 6", "max_steps: 12");
    std::fs::write(&p.config, cfg + "save_steps: 2\nsave_total_limit: 2\n").unwrap();
}

/// Runs `kiln train` on `p` and SIGKILLs it as soon as a checkpoint is complete.
fn kill_after_first_checkpoint(b: &Project) {
    kill_after_checkpoints(b, 1)
}

/// Runs `kiln train` on `p` and SIGKILLs it as soon as `count` checkpoints are complete.
fn kill_after_checkpoints(b: &Project, count: usize) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", "kiln.yml"])
        .current_dir(b.dir.path())
        .env("KILN_NUM_THREADS", "1")
        .env_remove("KILN_CACHE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let work = b.path("cache/work");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut seen = false;
    while std::time::Instant::now() < deadline {
        let found = std::fs::read_dir(&work)
            .ok()
            .into_iter()
            .flatten()
            .flatten()
            .any(|k| {
                std::fs::read_dir(k.path())
                    .ok()
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|c| {
                        let n = c.file_name().to_string_lossy().to_string();
                        n.starts_with("checkpoint-") && !n.ends_with(".partial")
                    })
                    .count()
                    >= count
            });
        if found {
            seen = true;
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen, "no checkpoint appeared before the run ended");
}

/// Every file under `dir` (relative path -> bytes).
fn tree_bytes(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    tree_files(dir).into_iter().map(|(k, v)| (k, v.3)).collect()
}

#[test]
fn killed_training_resumes_from_its_checkpoint_and_ends_bit_identical() {
    one_thread();
    // Reference: uninterrupted.
    let a = project();
    with_checkpoints(&a);
    a.run(&[]);
    let a_dir = a.ws(&[]).entry_of("train").unwrap();
    let kept: Vec<String> = {
        let mut v: Vec<String> = std::fs::read_dir(&a_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("checkpoint-"))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        kept,
        vec!["checkpoint-10", "checkpoint-8"],
        "save_total_limit keeps the newest 2"
    );

    // Interrupted with SIGKILL once a checkpoint exists, then rerun.
    let b = project();
    with_checkpoints(&b);
    kill_after_first_checkpoint(&b);
    let work = b.path("cache/work");
    let plan = b.plan(&[]);
    assert_eq!(
        status(&plan, "train").state,
        State::Stale,
        "the killed run published nothing"
    );
    let (_, events) = b.run(&[]);
    assert!(
        events.iter().any(|e| matches!(e, kiln::events::Event::Warning { message } if message.contains("resuming from checkpoint-"))),
        "{events:?}"
    );
    let b_dir = b.ws(&[]).entry_of("train").unwrap();
    assert_eq!(
        std::fs::read(a_dir.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(b_dir.join("adapter_model.safetensors")).unwrap(),
        "a resumed run ends with exactly the uninterrupted run's weights"
    );
    // Every file, not only the weights: trainer_state.json's logged floats (lr, loss) survive
    // the checkpoint's JSON round trip digit for digit, and so do the kept checkpoints.
    let (fa, fb) = (tree_bytes(&a_dir), tree_bytes(&b_dir));
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    for (name, bytes) in &fa {
        assert!(
            fb[name] == *bytes,
            "{name} differs after resume:\n{}\n---\n{}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(600)]),
            String::from_utf8_lossy(&fb[name][..fb[name].len().min(600)])
        );
    }
    let keys = |p: &Project| {
        p.plan(&[])
            .iter()
            .map(|s| (s.name.clone(), s.key.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(&a), keys(&b), "downstream keys agree too");
    assert!(
        !work
            .join(
                b.plan(&[])
                    .iter()
                    .find(|s| s.name == "train")
                    .unwrap()
                    .key
                    .clone()
                    .unwrap()
            )
            .exists(),
        "work dir removed after publish"
    );
}

/// Flips a byte of a checkpoint's adapter weights.
fn damage(ck: &std::path::Path) {
    let w = ck.join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let at = bytes.len() - 5;
    bytes[at] ^= 0x10;
    std::fs::write(&w, &bytes).unwrap();
}

/// The complete checkpoints of the one train work directory, by step.
fn work_checkpoints(p: &Project) -> Vec<(u64, std::path::PathBuf)> {
    let key_dir = std::fs::read_dir(p.path("cache/work"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let mut v: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(&key_dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            Some((
                name.strip_prefix("checkpoint-")?.parse::<u64>().ok()?,
                e.path(),
            ))
        })
        .collect();
    v.sort();
    v
}

fn warned(events: &[kiln::events::Event], text: &str) -> bool {
    events
        .iter()
        .any(|e| matches!(e, kiln::events::Event::Warning { message } if message.contains(text)))
}

#[test]
fn a_damaged_checkpoint_is_skipped_with_a_message_and_the_run_still_ends_identical() {
    one_thread();
    let a = project();
    with_checkpoints(&a);
    a.run(&[]);
    let a_dir = a.ws(&[]).entry_of("train").unwrap();

    // The newest checkpoint damaged: resume from the one before it (or from the start).
    let b = project();
    with_checkpoints(&b);
    kill_after_first_checkpoint(&b);
    let (n, ck) = work_checkpoints(&b).pop().unwrap();
    assert!(
        ck.join("kiln-checkpoint.json").exists(),
        "sealed by its manifest"
    );
    damage(&ck);
    let (_, events) = b.run(&[]);
    assert!(
        warned(&events, &format!("checkpoint-{n} is damaged (adapter_model.safetensors: content changed (blake3 mismatch));")),
        "{events:?}"
    );
    assert!(
        !warned(&events, &format!("resumed from checkpoint-{n}")),
        "the damaged checkpoint is not resumed from"
    );
    let b_dir = b.ws(&[]).entry_of("train").unwrap();
    assert_eq!(
        tree_bytes(&a_dir),
        tree_bytes(&b_dir),
        "every file as uninterrupted"
    );

    // An older checkpoint damaged, a newer one intact: resuming from the newer one would
    // publish the damaged one; training starts before it and writes it again.
    let c = project();
    with_checkpoints(&c);
    kill_after_checkpoints(&c, 2);
    let cks = work_checkpoints(&c);
    assert!(cks.len() >= 2, "{cks:?}");
    let (lo, hi) = (cks[0].0, cks[cks.len() - 1].0);
    damage(&cks[0].1);
    let (_, events) = c.run(&[]);
    assert!(
        warned(&events, &format!("checkpoint-{lo} is damaged (adapter_model.safetensors: content changed (blake3 mismatch)); training from the start, so that it is written again")),
        "{events:?}"
    );
    assert!(
        !warned(&events, &format!("resumed from checkpoint-{hi}")),
        "not resumed past the damaged checkpoint"
    );
    let c_dir = c.ws(&[]).entry_of("train").unwrap();
    assert_eq!(
        tree_bytes(&a_dir),
        tree_bytes(&c_dir),
        "every file as uninterrupted"
    );
}

#[test]
fn eval_steps_report_validation_loss_and_perplexity() {
    one_thread();
    let p = project();
    let (_, events) = p.run(&["eval_steps=3"]);
    let evals: Vec<(u64, f64)> = events
        .iter()
        .filter_map(|e| match e {
            kiln::events::Event::Metric {
                step, name, value, ..
            } if name == "eval_loss" => Some((*step, *value)),
            _ => None,
        })
        .collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), vec![3, 6]);
    assert!(evals[1].1 < evals[0].1, "validation loss went {evals:?}");
    assert!(events.iter().any(|e| matches!(e, kiln::events::Event::Metric { name, value, .. } if name == "eval_perplexity" && (*value - evals[1].1.exp()).abs() < 1e-9)));
}

#[test]
fn train_debug_runs_one_step_and_publishes_no_train_entry() {
    let p = project();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", "kiln.yml", "--debug"])
        .current_dir(p.dir.path())
        .env("KILN_NUM_THREADS", "1")
        .env_remove("KILN_CACHE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("debug step: loss ") && stdout.contains("trainable parameters, peak RSS"),
        "{stdout}"
    );
    assert!(
        stdout.contains(", -100)"),
        "the decoded sample shows masked tokens: {stdout}"
    );
    let plan = p.plan(&[]);
    assert_eq!(status(&plan, "pack").state, State::Fresh);
    assert_eq!(
        status(&plan, "train").state,
        State::Stale,
        "debug publishes nothing"
    );
}

#[test]
fn neftune_noise_changes_training_reproducibly() {
    one_thread();
    let p = project();
    p.run(&[]);
    let plain = std::fs::read(
        p.ws(&[])
            .entry_of("train")
            .unwrap()
            .join("adapter_model.safetensors"),
    )
    .unwrap();
    let plan = p.plan(&["neftune_noise_alpha=5"]);
    assert_eq!(
        status(&plan, "train").reason.as_deref(),
        Some("neftune_noise_alpha changed unset → 5.0")
    );
    p.run(&["neftune_noise_alpha=5"]);
    let noised = std::fs::read(
        p.ws(&["neftune_noise_alpha=5"])
            .entry_of("train")
            .unwrap()
            .join("adapter_model.safetensors"),
    )
    .unwrap();
    assert_ne!(plain, noised, "noise changes the trajectory");
    let q = project();
    q.run(&["neftune_noise_alpha=5"]);
    let again = std::fs::read(
        q.ws(&["neftune_noise_alpha=5"])
            .entry_of("train")
            .unwrap()
            .join("adapter_model.safetensors"),
    )
    .unwrap();
    assert_eq!(noised, again, "the noise comes from kiln's seeded PRNG");
}

#[test]
fn lora_dropout_trains_reproducibly_and_resumes_bit_identical() {
    one_thread();
    let plain = project();
    plain.run(&[]);
    let with_dropout = |p: &Project| {
        let cfg = std::fs::read_to_string(&p.config).unwrap();
        std::fs::write(&p.config, cfg + "lora_dropout: 0.2\n").unwrap();
    };
    let a = project();
    with_dropout(&a);
    a.run(&[]);
    assert_ne!(
        adapter(&plain),
        adapter(&a),
        "dropout changes the trajectory"
    );
    // Same config in a fresh cache: the same bytes.
    let b = project();
    with_dropout(&b);
    b.run(&[]);
    assert_eq!(adapter(&a), adapter(&b));
    // Killed once a checkpoint exists, then resumed: the same bytes as uninterrupted.
    let c = project();
    with_dropout(&c);
    with_checkpoints(&c);
    let d = project();
    with_dropout(&d);
    with_checkpoints(&d);
    d.run(&[]);
    let reference = adapter(&d);
    kill_after_first_checkpoint(&c);
    let (_, events) = c.run(&[]);
    assert!(
        events.iter().any(|e| matches!(e, kiln::events::Event::Warning { message } if message.contains("resuming from checkpoint-"))),
        "{events:?}"
    );
    assert_eq!(adapter(&c), reference, "resumed with the same masks");
}

#[test]
fn resume_from_checkpoint_starts_from_a_given_checkpoint_and_hashes_it() {
    one_thread();
    let a = project();
    with_checkpoints(&a);
    a.run(&[]);
    let ck = a.ws(&[]).entry_of("train").unwrap().join("checkpoint-8");
    // Copied out of the cache, as a user would keep one.
    let b = project();
    with_checkpoints(&b);
    let mine = b.path("ck8");
    std::fs::create_dir_all(&mine).unwrap();
    for f in [
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        std::fs::copy(ck.join(f), mine.join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(&b.config).unwrap();
    std::fs::write(&b.config, cfg + "resume_from_checkpoint: ck8\n").unwrap();
    let plan = b.plan(&[]);
    assert_eq!(status(&plan, "fetch.checkpoint").state, State::Stale);
    let (_, events) = b.run(&[]);
    assert!(
        events.iter().any(|e| matches!(e, kiln::events::Event::Warning { message } if message.contains("resuming from checkpoint-8"))),
        "{events:?}"
    );
    assert_eq!(
        adapter(&a),
        adapter(&b),
        "steps 9-12 from the checkpoint end where A ended"
    );
    // The checkpoint is an input: changing its bytes makes the train stage stale.
    let st = mine.join("trainer_state.json");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&st).unwrap()).unwrap();
    assert_eq!(state["global_step"], 8);
    state["global_step"] = 6.into();
    std::fs::write(&st, state.to_string()).unwrap();
    let plan = b.plan(&[]);
    assert_eq!(status(&plan, "train").state, State::Stale);
    assert!(
        status(&plan, "fetch.checkpoint")
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("trainer_state.json")),
        "{:?}",
        status(&plan, "fetch.checkpoint").reason
    );

    // The CLI flag, and a clear error for a directory that is not a checkpoint.
    let c = project();
    with_checkpoints(&c);
    let (code, out, err) = c.kiln(&[
        "train",
        "kiln.yml",
        "--resume-from-checkpoint",
        mine.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        format!("{out}{err}").contains("resuming from checkpoint-6"),
        "{out}{err}"
    );
    let (code, _, err) = c.kiln(&["train", "kiln.yml", "--resume-from-checkpoint", "nowhere"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("resume_from_checkpoint") && err.contains("not a checkpoint"),
        "{err}"
    );
}

#[test]
fn no_adapter_means_full_fine_tuning_with_a_complete_model_out() {
    one_thread();
    let mk = || {
        let p = Project::new("max_steps: 4\nwarmup_steps: 1\nseed: 3\nsave_steps: 2\nevaluate: true\nexport:\n  - {format: gguf, quant: q8_0}\n");
        write_tiny_model_dir(&p.path("model"), 17);
        let cfg = std::fs::read_to_string(&p.config)
            .unwrap()
            .replace("learning_rate: 2e-4", "learning_rate: 3e-3");
        std::fs::write(&p.config, cfg).unwrap();
        p
    };
    let p = mk();
    let (s, events) = p.run(&[]);
    for st in ["train", "evaluate", "export.gguf.q8_0"] {
        assert!(s.built.contains(&st.to_string()), "{:?}", s.built);
    }
    let losses = metric_values(&events, "loss");
    assert_eq!(losses.len(), 4);
    assert!(losses[3] < losses[0], "loss went {losses:?}");
    let ws = p.ws(&[]);
    let dir = ws.entry_of("train").unwrap();
    assert!(dir.join("model.safetensors").exists());
    assert!(dir.join("config.json").exists() && dir.join("tokenizer.json").exists());
    assert!(!dir.join("adapter_config.json").exists());
    assert!(dir.join("checkpoint-2/model.safetensors").exists());
    // Every weight moved, including norms and the (tied) embeddings.
    let dev = candle_core::Device::Cpu;
    let base = candle_core::safetensors::load(p.path("model/model.safetensors"), &dev).unwrap();
    let tuned = candle_core::safetensors::load(dir.join("model.safetensors"), &dev).unwrap();
    assert_eq!(base.len(), tuned.len());
    for name in [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
    ] {
        let d = (&base[name] - &tuned[name])
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d > 0.0, "{name} did not train");
    }
    // The evaluate stage reads the trained model directly.
    let r: serde_json::Value = serde_json::from_slice(
        &std::fs::read(ws.entry_of("evaluate").unwrap().join("eval_results.json")).unwrap(),
    )
    .unwrap();
    assert!(r["eval_loss"].as_f64().unwrap() > 0.0);
    // Reproducible.
    let q = mk();
    q.run(&[]);
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        std::fs::read(
            q.ws(&[])
                .entry_of("train")
                .unwrap()
                .join("model.safetensors")
        )
        .unwrap()
    );
    // Nothing to merge; chat loads the trained model.
    let kiln = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .current_dir(p.dir.path())
            .env("KILN_NUM_THREADS", "1")
            .env_remove("KILN_CACHE")
            .output()
            .unwrap()
    };
    let out = kiln(&["merge-lora", "kiln.yml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to merge"));
    let out = kiln(&[
        "inference",
        "kiln.yml",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("fully fine-tuned model"));
}

/// Evaluations of a run: (step, eval_loss) from its trainer_state.json.
fn evals_of(dir: &std::path::Path) -> (u64, Vec<(u64, f64)>, serde_json::Value) {
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("trainer_state.json")).unwrap()).unwrap();
    let evals = st["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| Some((h["step"].as_u64()?, h["eval_loss"].as_f64()?)))
        .collect();
    (st["global_step"].as_u64().unwrap(), evals, st)
}

/// early_stopping_patience stops where HF's EarlyStoppingCallback would (the first evaluation
/// that is the `patience`-th in a row not to improve on the best), with the same bits as the
/// full run up to there; load_best_model_at_end publishes the best checkpoint's weights.
#[test]
fn early_stopping_and_the_best_checkpoint_follow_hf_trainer() {
    one_thread();
    // A learning rate high enough that the validation loss turns back up.
    let sets = [
        "max_steps=14",
        "gradient_accumulation_steps=1",
        "learning_rate=8e-2",
        "eval_steps=1",
        "save_steps=1",
    ];
    let full = project();
    full.run(&sets);
    let full_dir = full.ws(&sets).entry_of("train").unwrap();
    let (n, evals, _) = evals_of(&full_dir);
    assert_eq!(n, 14);
    // Where patience 2 stops, and the best evaluation before it.
    let (mut best, mut bad, mut stop) = (f64::INFINITY, 0, None);
    let mut best_step = 0;
    for &(s, l) in &evals {
        if l < best {
            (best, bad, best_step) = (l, 0, s);
        } else {
            bad += 1;
        }
        if bad >= 2 {
            stop = Some(s);
            break;
        }
    }
    let stop =
        stop.unwrap_or_else(|| panic!("the validation loss never stopped improving: {evals:?}"));
    assert!(best_step < stop);

    let es = project();
    let mut with = sets.to_vec();
    with.push("early_stopping_patience=2");
    let (_, events) = es.run(&with);
    let dir = es.ws(&with).entry_of("train").unwrap();
    let (last, es_evals, _) = evals_of(&dir);
    assert_eq!(
        last, stop,
        "stopped at step {last}; the rule says {stop}: {evals:?}"
    );
    assert_eq!(
        es_evals[..],
        evals[..es_evals.len()],
        "the same run up to the stop"
    );
    assert!(events.iter().any(|e| matches!(e, kiln::events::Event::Note { message } if message.contains(&format!("early stopping at step {stop}")))));
    let weights = |d: &std::path::Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    // Without load_best_model_at_end: the stop step's weights, the full run's checkpoint there.
    assert_eq!(
        weights(&dir),
        weights(&full_dir.join(format!("checkpoint-{stop}")))
    );

    let lb = project();
    with.push("load_best_model_at_end=true");
    with.push("save_total_limit=1");
    lb.run(&with);
    let dir = lb.ws(&with).entry_of("train").unwrap();
    let (_, _, st) = evals_of(&dir);
    assert_eq!(
        st["best_model_checkpoint"],
        format!("checkpoint-{best_step}")
    );
    assert_eq!(
        weights(&dir),
        weights(&full_dir.join(format!("checkpoint-{best_step}")))
    );
    // The best checkpoint outlived save_total_limit: 1.
    assert!(dir.join(format!("checkpoint-{best_step}")).is_dir());

    // Another metric: perplexity (lower is better when said so) stops where eval_loss does;
    // eval_loss with greater_is_better stops where the reversed rule says.
    let rule = |greater: bool| {
        let (mut best, mut bad) = (None::<f64>, 0);
        for &(s, l) in &evals {
            if best.is_none_or(|b| if greater { l > b } else { l < b }) {
                (best, bad) = (Some(l), 0);
            } else {
                bad += 1;
            }
            if bad >= 2 {
                return s;
            }
        }
        14
    };
    for (extra, greater) in [
        (
            &[
                "metric_for_best_model=perplexity",
                "greater_is_better=false",
            ][..],
            false,
        ),
        (&["greater_is_better=true"][..], true),
    ] {
        let q = project();
        let mut w = sets.to_vec();
        w.push("early_stopping_patience=2");
        w.extend_from_slice(extra);
        q.run(&w);
        let (last, _, _) = evals_of(&q.ws(&w).entry_of("train").unwrap());
        assert_eq!(last, rule(greater), "{extra:?}: {evals:?}");
    }
    let (_, _, err) = es.kiln(&[
        "validate",
        "kiln.yml",
        "--set",
        "metric_for_best_model=accuracy",
    ]);
    assert!(
        err.contains(
            "`metric_for_best_model`: `accuracy` is not a metric this run's evaluation logs"
        ),
        "{err}"
    );

    // Without evaluations there is nothing to compare: refused before work.
    let bad_cfg = project();
    let (code, _, err) = bad_cfg.kiln(&[
        "validate",
        "kiln.yml",
        "--set",
        "early_stopping_patience=2",
        "--set",
        "val_set_size=0",
    ]);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("`early_stopping_patience`: needs validation losses to compare"),
        "{err}"
    );
}
