//! Every key Axolotl defines is handled, "no effect", or "not supported yet" (a warning, or an
//! error where ignoring it would train something else) — never unknown; plugins and their keys
//! are known; docs/config.md's key table is the one the code generates; and the trainer keys
//! kiln implements change training as Axolotl defines them.

mod common;
use common::*;
use kiln::config::keys::{self, Class};
use kiln::config::{axolotl_keys, ConfigError};

fn problems(yaml: &str) -> (Vec<String>, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yml");
    std::fs::write(dir.path().join("d.jsonl"), alpaca_rows(3)).unwrap();
    let text =
        format!("base_model: org/model\ndatasets:\n  - path: d.jsonl\n    type: alpaca\n{yaml}");
    std::fs::write(&path, &text).unwrap();
    match kiln::config::load(&path, &[]) {
        Ok(l) => (vec![], l.warnings.iter().map(|w| w.to_string()).collect()),
        Err(ConfigError::Invalid(e, w)) => (
            e.iter().map(|p| p.to_string()).collect(),
            w.iter().map(|p| p.to_string()).collect(),
        ),
        Err(other) => panic!("{other}"),
    }
}

#[test]
fn every_axolotl_key_has_exactly_one_class() {
    for k in axolotl_keys::TOP_LEVEL {
        let handled = kiln::config::handled(k);
        let class = keys::class_of(k);
        assert!(
            handled ^ class.is_some(),
            "`{k}`: handled {handled}, class {class:?} (exactly one)"
        );
    }
    for k in axolotl_keys::DATASET {
        let handled = kiln::config::DATASET_KEYS_HANDLED.contains(k);
        let class = keys::dataset_class_of(k);
        assert!(
            handled ^ class.is_some(),
            "dataset key `{k}`: handled {handled}, class {class:?} (exactly one)"
        );
    }
    // The table lists no key twice.
    let mut seen = std::collections::BTreeSet::new();
    for (k, _) in keys::TOP_LEVEL.iter().chain(keys::LEGACY) {
        assert!(seen.insert(*k), "`{k}` listed twice");
        assert!(!kiln::config::handled(k), "`{k}` is handled and listed");
    }
}

#[test]
fn real_config_keys_get_the_right_answer() {
    // Liger and CCE are what kiln's fused ops do: accepted with a note, not an error.
    let (e, w) = problems("plugins:\n  - axolotl.integrations.liger.LigerPlugin\n  - axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin\nliger_rope: true\nliger_rms_norm: true\nliger_glu_activation: true\nliger_fused_linear_cross_entropy: true\ncut_cross_entropy: true\nattention: flash\ndeepspeed: deepspeed_configs/zero2.json\nbf16: true\ngradient_checkpointing: true\nswanlab_project: x\n");
    assert!(e.is_empty(), "{e:?}");
    let all = w.join("\n");
    for want in [
        "`plugins[0]`: has no effect in kiln: kiln's own fused RMSNorm, SwiGLU, RoPE and cross-entropy ops do this job",
        "`plugins[1]`: has no effect in kiln: kiln's fused cross-entropy op",
        "`attention`: has no effect in kiln: a PyTorch kernel choice",
        "`deepspeed`: has no effect in kiln: kiln trains on this machine's CPU cores",
        "`swanlab_project`: has no effect in kiln: kiln logs metrics",
    ] {
        assert!(all.contains(want), "wanted {want:?} in\n{all}");
    }
    assert!(!all.contains("unknown"), "{all}");
    // Read, not warned about: kiln recomputes layers in backward (tests/train.rs).
    assert!(!all.contains("gradient_checkpointing"), "{all}");
    // One note for the plugin, not one per key.
    assert_eq!(all.matches("kiln's own fused RMSNorm").count(), 1, "{all}");
    let (_, w) = problems("liger_rope: true\nliger_rms_norm: true\n");
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("`liger_rope`: has no effect in kiln"),
        "{w:?}"
    );

    // Keys that would train something else are refused, naming the key, with no did-you-mean.
    for (yaml, key) in [
        ("rl: gdpo\n", "rl"),
        ("rl: grpo\n", "rl"),
        ("reward_model: true\n", "reward_model"),
        ("gptq: true\n", "gptq"),
        (
            "pretraining_dataset:\n  - path: allenai/c4\n",
            "pretraining_dataset",
        ),
        ("kd_alpha: 0.5\n", "kd_alpha"),
        ("model_config:\n  rope_theta: 1000000\n", "model_config"),
        (
            "plugins:\n  - axolotl.integrations.spectrum.SpectrumPlugin\n",
            "plugins[0]",
        ),
    ] {
        let (e, _) = problems(yaml);
        let all = e.join("\n");
        assert!(
            all.contains(&format!("`{key}`: not supported yet:"))
                && all.contains("kiln would train something else without it"),
            "{yaml}: {all}"
        );
        assert!(
            !all.contains("unknown") && !all.contains("did you mean"),
            "{all}"
        );
    }
    let (e, _) = problems("pretraining_dataset:\n  - path: allenai/c4\n");
    assert!(!e.join("\n").contains("`datasets`"), "{e:?}");

    // An unknown plugin is not supported yet (a warning), never "unknown key".
    let (e, w) = problems("plugins:\n  - my_company.plugins.Custom\n");
    assert!(e.is_empty(), "{e:?}");
    assert!(
        w.join("\n")
            .contains("`plugins[0]`: not supported yet: plugin `my_company.plugins.Custom`"),
        "{w:?}"
    );
    // Dataset keys of the schema's other dataset kinds are known.
    let (e, _) = problems(
        "test_datasets:\n  - path: d.jsonl\n    type: alpaca\n    step_separator: \"\\n\"\n",
    );
    assert!(
        e.join("\n").contains("`test_datasets[0].step_separator`: not supported yet: step_separator (stepwise supervised"),
        "{e:?}"
    );
}

#[test]
fn the_key_table_in_docs_is_the_generated_one() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/config.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let (begin, end) = ("<!-- keys:begin -->\n", "<!-- keys:end -->");
    let b = doc
        .find(begin)
        .expect("docs/config.md has a keys:begin marker")
        + begin.len();
    let e = doc.find(end).expect("docs/config.md has a keys:end marker");
    let want = keys::reference_markdown();
    if std::env::var_os("KILN_UPDATE_DOCS").is_some() {
        let new = format!("{}{want}{}", &doc[..b], &doc[e..]);
        std::fs::write(&path, new).unwrap();
        return;
    }
    assert!(
        doc[b..e] == want,
        "docs/config.md's key table is out of date: run `KILN_UPDATE_DOCS=1 cargo test --test config_keys`"
    );
    // Every class appears in it.
    for c in [
        "no effect",
        "not supported yet (warning)",
        "not supported yet (error)",
    ] {
        assert!(want.contains(c));
    }
    let _ = Class::NoEffect("");
}

#[test]
fn batch_size_and_trainer_keys_are_read_and_checked() {
    let (e, _) = problems("micro_batch_size: 2\nbatch_size: 7\n");
    assert!(
        e.join("\n")
            .contains("`batch_size`: 7 is not a multiple of micro_batch_size 2"),
        "{e:?}"
    );
    let (e, _) = problems("micro_batch_size: 2\ngradient_accumulation_steps: 2\nbatch_size: 8\n");
    assert!(
        e.join("\n")
            .contains("disagrees with micro_batch_size 2 × gradient_accumulation_steps 2 = 4"),
        "{e:?}"
    );
    let (e, _) = problems("adam_beta2: 1.5\nadam_epsilon: 0\n");
    let all = e.join("\n");
    assert!(
        all.contains("`adam_beta2`: 1.5 is outside [0, 1)")
            && all.contains("`adam_epsilon`: 0 must be positive"),
        "{all}"
    );
    let (e, _) = problems("lr_scheduler: linear\ncosine_min_lr_ratio: 0.1\n");
    assert!(
        e.join("\n").contains(
            "`cosine_min_lr_ratio`: shapes the cosine schedule, and lr_scheduler is `linear`"
        ),
        "{e:?}"
    );
    let (e, _) = problems("cosine_constant_lr_ratio: 0.8\n");
    assert!(e.join("\n").contains("needs cosine_min_lr_ratio"), "{e:?}");
    let (e, _) = problems("neftune_noise_alpha: 5\nnoisy_embedding_alpha: 5\n");
    assert!(
        e.join("\n")
            .contains("the older name of neftune_noise_alpha"),
        "{e:?}"
    );

    // batch_size sets gradient_accumulation_steps.
    let p = Project::new("micro_batch_size: 2\nbatch_size: 6\n");
    let text = std::fs::read_to_string(&p.config)
        .unwrap()
        .replace("micro_batch_size: 2\ncache_dir", "cache_dir");
    std::fs::write(&p.config, text).unwrap();
    let s = kiln::config::load(&p.config, &[]).unwrap().settings;
    assert_eq!(s.train.steps.gradient_accumulation_steps, 3);
}

/// The learning rates a train run logged, one per optimizer step.
fn lrs(p: &Project, sets: &[&str]) -> Vec<f64> {
    one_thread();
    let (_, events) = p.run(sets);
    metric_values(&events, "lr")
}

#[test]
fn schedule_keys_shape_the_learning_rate_as_axolotl_defines_them() {
    let p = Project::new("adapter: lora\nlora_r: 2\nlora_target_linear: true\nmax_steps: 10\nwarmup_steps: 2\nseed: 1\nlogging_steps: 1\n");
    write_tiny_model_dir(&p.path("model"), 3);
    let lr = 2e-4;
    let plain = lrs(&p, &[]);
    assert_eq!(plain.len(), 10);
    let min = lrs(&p, &["cosine_min_lr_ratio=0.5"]);
    // Cosine from lr to lr/2 over steps 2..10: (1 - 0.5) · ½(1 + cos(π·p)) + 0.5.
    for (s, got) in min.iter().enumerate().skip(2) {
        let prog = (s - 2) as f64 / 8.0;
        let want = lr * (0.5 * 0.5 * (1.0 + (std::f64::consts::PI * prog).cos()) + 0.5);
        assert!((got - want).abs() < 1e-12, "step {s}: {got} vs {want}");
    }
    assert!(min[9] > plain[9] * 2.0, "{min:?} vs {plain:?}");
    // Warmup-decay-constant: the minimum from step ⌊10 × 0.6⌋ = 6 on.
    let constant = lrs(
        &p,
        &["cosine_min_lr_ratio=0.1", "cosine_constant_lr_ratio=0.6"],
    );
    for got in &constant[6..] {
        assert!((got - lr * 0.1).abs() < 1e-12, "{constant:?}");
    }
    assert!(constant[3] > lr * 0.1 * 1.5, "{constant:?}");
    // Quadratic warmup: (1/2)² then (2/2)².
    let quad = lrs(&p, &["lr_quadratic_warmup=true"]);
    assert!(
        (quad[0] - lr * 0.25).abs() < 1e-12 && (plain[0] - lr * 0.5).abs() < 1e-12,
        "{quad:?}"
    );
    assert_eq!(quad[2..], plain[2..]);
}

#[test]
fn adam_betas_change_training_and_the_train_key() {
    let p = Project::new("adapter: lora\nlora_r: 2\nlora_target_linear: true\nmax_steps: 3\nseed: 1\nlearning_rate: 5e-3\n");
    write_tiny_model_dir(&p.path("model"), 3);
    let key = |sets: &[&str]| {
        p.plan(sets)
            .into_iter()
            .find(|s| s.name == "train")
            .unwrap()
            .key
            .unwrap()
    };
    let adapter = |sets: &[&str]| {
        one_thread();
        p.run(sets);
        std::fs::read(
            p.ws(sets)
                .entry_of("train")
                .unwrap()
                .join("adapter_model.safetensors"),
        )
        .unwrap()
    };
    let a = adapter(&[]);
    let base = key(&[]);
    // The defaults spelled out are the same training and the same key.
    assert_eq!(key(&["adam_beta1=0.9", "adam_epsilon=1e-8"]), base);
    assert_ne!(key(&["adam_beta2=0.95"]), base);
    let b = adapter(&["adam_beta2=0.95"]);
    let c = adapter(&["adam_epsilon=1e-3"]);
    assert_ne!(a, b, "adam_beta2 changes the trained weights");
    assert_ne!(a, c, "adam_epsilon changes the trained weights");
}

#[test]
fn template_names_dataset_types_and_fractional_warmup() {
    // A model family's template name renders with the model's own template, with a note.
    let (e, w) = problems("chat_template: qwen3\n");
    assert!(e.is_empty(), "{e:?}");
    assert!(
        w.join("\n").contains(
            "`chat_template`: kiln renders `qwen3` with the base model's own chat template"
        ),
        "{w:?}"
    );
    // Other Axolotl names are refused, always (another template would train on other text).
    for strict in ["", "strict: true\n"] {
        let (e, _) = problems(&format!("{strict}chat_template: metharme\n"));
        assert!(
            e.join("\n")
                .contains("`chat_template`: not supported yet: chat_template `metharme`"),
            "{e:?}"
        );
    }
    // Preference-pair types in a supervised config say so and how to train on them.
    let (e, _) = problems("test_datasets:\n  - path: d.jsonl\n    type: chatml.intel\n");
    assert!(
        e.join("\n").contains("`test_datasets[0].type`: dataset type `chatml.intel` holds preference pairs, and this config does supervised training")
            && e.join("\n").contains("set `rl: dpo`"),
        "{e:?}"
    );
    // Dataset types kiln does not implement are refused, not trained as another format.
    for ty in ["oasst", "zephyr.nectar", "my_module.transform"] {
        let (e, _) = problems(&format!(
            "test_datasets:\n  - path: d.jsonl\n    type: {ty}\n"
        ));
        assert!(
            e.join("\n").contains(&format!(
                "`test_datasets[0].type`: not supported yet: dataset type `{ty}`"
            )),
            "{ty}: {e:?}"
        );
    }
    // warmup_steps below 1 is a fraction of the run (Transformers' TrainingArguments).
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("d.jsonl"), alpaca_rows(3)).unwrap();
    let path = dir.path().join("c.yml");
    std::fs::write(&path, "base_model: org/model\ndatasets:\n  - path: d.jsonl\n    type: alpaca\nwarmup_steps: 0.1\n").unwrap();
    let s = kiln::config::load(&path, &[]).unwrap().settings;
    assert_eq!(
        (s.train.optim.warmup_steps, s.train.optim.warmup_ratio),
        (None, Some(0.1))
    );
    let (e, _) = problems("warmup_steps: 2.5\n");
    assert!(
        e.join("\n")
            .contains("`warmup_steps`: 2.5 is neither a whole number of steps nor a fraction"),
        "{e:?}"
    );
}

#[test]
fn the_bundled_examples_missing_model_says_how_to_fetch_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("d.jsonl"), alpaca_rows(3)).unwrap();
    let path = dir.path().join("c.yml");
    std::fs::write(&path, "base_model: ../cache/models/SmolLM2-135M-Instruct.Q4_1.gguf\ndatasets:\n  - path: d.jsonl\n    type: alpaca\n").unwrap();
    let Err(ConfigError::Invalid(e, _)) = kiln::config::load(&path, &[]) else {
        panic!("a missing model must be refused")
    };
    assert!(
        e[0].to_string()
            .contains("fetch it with scripts/fetch-smollm2.sh"),
        "{e:?}"
    );
}

#[test]
fn chat_template_kwargs_reach_the_template_and_the_tokenize_key() {
    let tmpl = "chat_template: jinja\nchat_template_jinja: \"{% for m in messages %}<|im_start|>{{ m.role }}\\n{% if m.role == 'assistant' and enable_thinking %}<think>{{ effort }}</think>{% endif %}{{ m.content }}<|im_end|>\\n{% endfor %}\"\n";
    let p = Project::new(tmpl);
    let key = |sets: &[&str]| {
        p.plan(sets)
            .into_iter()
            .find(|s| s.name == "tokenize[1]")
            .unwrap()
            .key
            .unwrap()
    };
    one_thread();
    p.run(&[]);
    let plain = key(&[]);
    let thinking = key(&["chat_template_kwargs={enable_thinking: true, effort: high}"]);
    assert_ne!(plain, thinking, "the kwargs are part of the tokenize key");
    // Tokenized with it: the assistant turns carry the think block the kwargs asked for.
    p.run(&["chat_template_kwargs={enable_thinking: true, effort: high}"]);
    let ex = p
        .ws(&["chat_template_kwargs={enable_thinking: true, effort: high}"])
        .debug_examples(1)
        .unwrap();
    let chat = ex.iter().find(|e| e.dataset == "datasets[1]").unwrap();
    assert!(
        chat.text.contains("<think>high</think>It is"),
        "{}",
        chat.text
    );
    p.run(&[]);
    let ex = p.ws(&[]).debug_examples(1).unwrap();
    let chat = ex.iter().find(|e| e.dataset == "datasets[1]").unwrap();
    assert!(!chat.text.contains("<think>"), "{}", chat.text);
    // kiln's own variables cannot be overridden.
    let (e, _) = problems("chat_template_kwargs:\n  bos_token: x\n");
    assert!(
        e.join("\n")
            .contains("`chat_template_kwargs.bos_token`: `bos_token` is set by kiln"),
        "{e:?}"
    );
}

#[test]
fn loraplus_scales_the_b_matrices_learning_rate() {
    let p = Project::new("adapter: lora\nlora_r: 2\nlora_target_linear: true\nmax_steps: 1\nwarmup_steps: 0\nlr_scheduler: constant\nlearning_rate: 1e-3\nseed: 1\n");
    write_tiny_model_dir(&p.path("model"), 3);
    let b_max = |sets: &[&str]| {
        one_thread();
        p.run(sets);
        let dir = p.ws(sets).entry_of("train").unwrap();
        let t = candle_core::safetensors::load(
            dir.join("adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let mut max = 0f32;
        for (name, v) in &t {
            if name.contains("lora_B") {
                let m = v
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                max = max.max(m);
            }
        }
        max
    };
    // B starts at zero; Adam's first step moves each entry by about lr·sign(g).
    let plain = b_max(&[]);
    let plus = b_max(&["loraplus_lr_ratio=8"]);
    assert!(plain > 0.0);
    let ratio = plus / plain;
    assert!((ratio - 8.0).abs() < 0.1, "B moved {ratio}× as far");
    let (e, _) = problems("loraplus_lr_ratio: 16\n");
    assert!(e.join("\n").contains("LoRA+ needs a LoRA adapter"), "{e:?}");
}

/// kiln's own corpus in the style of Axolotl's examples, one per family (Llama 3, Mistral,
/// Qwen2, Qwen3, Gemma, Phi), with plugins and trainer keys: each validates, nothing is
/// "unknown", and the keys kiln reads took effect.
#[test]
fn a_corpus_of_real_style_configs_validates_and_reads_its_keys() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/axolotl-corpus");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = e.path();
        let loaded = match kiln::config::load(&path, &[]) {
            Ok(l) => l,
            Err(e) => panic!("{}: {e}", path.display()),
        };
        for w in &loaded.warnings {
            assert!(!w.message.contains("unknown"), "{}: {w}", path.display());
        }
        let s = &loaded.settings;
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        match name.as_str() {
            "mistral-lora-alpaca.yml" => {
                assert_eq!(s.train.steps.gradient_accumulation_steps, 4);
                assert_eq!(s.train.optim.loraplus_lr_ratio, Some(16.0));
            }
            "qwen3-chat-kwargs.yml" => {
                assert_eq!(s.chat_template_kwargs["enable_thinking"], false);
                assert_eq!(s.train.optim.warmup_ratio, Some(0.03));
                assert_eq!(s.train.optim.cosine_constant_lr_ratio, Some(0.9));
            }
            "gemma-lora.yml" => assert_eq!(s.train.neftune_noise_alpha, Some(5.0)),
            "phi3-lora.yml" => assert_eq!(s.train.optim.adam_beta2, Some(0.95)),
            "llama3-lora-liger.yml" => {
                assert_eq!(s.train.optim.cosine_min_lr_ratio, Some(0.1));
                assert_eq!(s.train.optim.adam_epsilon, Some(1e-6));
            }
            "qwen2-full-ft.yml" => {
                assert!(s.train.adapter.is_none());
                assert!(s.train.optim.lr_quadratic_warmup);
            }
            other => panic!("{other}: add its checks here"),
        }
        n += 1;
    }
    assert_eq!(n, 6);
}

#[test]
fn unfrozen_parameters_train_only_the_matching_weights() {
    let p = Project::new("max_steps: 2\nlearning_rate: 1e-2\nwarmup_steps: 0\nseed: 2\nunfrozen_parameters:\n  - model\\.layers\\.1\\.\n  - ^model.norm\n");
    write_tiny_model_dir(&p.path("model"), 4);
    one_thread();
    p.run(&[]);
    let load = |path: std::path::PathBuf| {
        candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap()
    };
    let base = load(p.path("model/model.safetensors"));
    let out = load(
        p.ws(&[])
            .entry_of("train")
            .unwrap()
            .join("model.safetensors"),
    );
    let same = |n: &str| {
        let a: Vec<f32> = base[n].flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = out[n].flatten_all().unwrap().to_vec1().unwrap();
        a == b
    };
    assert!(
        same("model.layers.0.self_attn.q_proj.weight"),
        "layer 0 is frozen"
    );
    assert!(same("model.embed_tokens.weight"), "embeddings are frozen");
    assert!(
        !same("model.layers.1.mlp.down_proj.weight"),
        "layer 1 trains"
    );
    assert!(!same("model.norm.weight"), "the final norm trains");
    // With LoRA, or with row ranges: not supported yet.
    let (e, _) = problems("adapter: lora\nunfrozen_parameters: [lm_head]\n");
    assert!(
        e.join("\n").contains(
            "`unfrozen_parameters`: not supported yet: unfrozen_parameters with an adapter"
        ),
        "{e:?}"
    );
    let (e, _) = problems("unfrozen_parameters: ['^lm_head.weight[:1000]']\n");
    assert!(
        e.join("\n").contains("not supported yet: a row range"),
        "{e:?}"
    );
}
