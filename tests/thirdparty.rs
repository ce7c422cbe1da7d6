//! Real third-party data and tokenizers (fetched by scripts/fetch-test-data.sh, never committed).
//! Enabled with `--features thirdparty-tests`; `.ci/run` fetches the data and enables them.
#![cfg(feature = "thirdparty-tests")]

mod common;
use common::*;
use kiln::text::TextTokenizer;
use std::path::PathBuf;

fn testdata() -> PathBuf {
    let d = std::env::var("KILN_TESTDATA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/kiln-testdata")
        });
    assert!(
        d.join("SmolLM2-135M-Instruct.Q4_1.gguf").exists(),
        "run scripts/fetch-test-data.sh first ({})",
        d.display()
    );
    d
}

/// pipelines/quickstart.yml with its relative paths made absolute (model from the test data).
fn quickstart_yaml(td: &std::path::Path, repo: &std::path::Path) -> String {
    let data = repo.join("pipelines/data");
    std::fs::read_to_string(repo.join("pipelines/quickstart.yml"))
        .unwrap()
        .replace(
            "../cache/models/SmolLM2-135M-Instruct.Q4_1.gguf",
            &td.join("SmolLM2-135M-Instruct.Q4_1.gguf")
                .display()
                .to_string(),
        )
        .replace(
            "data/kiln-qa.jsonl",
            &data.join("kiln-qa.jsonl").display().to_string(),
        )
        .replace(
            "data/quickstart-prompts.jsonl",
            &data.join("quickstart-prompts.jsonl").display().to_string(),
        )
}

fn project(yaml: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("kiln.yml");
    std::fs::write(&cfg, format!("{yaml}\ncache_dir: cache\n")).unwrap();
    (dir, cfg)
}

/// Builds up to `pack` (the data stages these tests are about).
fn run(cfg: &std::path::Path) -> kiln::workspace::Workspace {
    one_thread();
    let ws = kiln::workspace::Workspace::open(cfg, &[]).unwrap();
    let opts = kiln::scheduler::RunOptions {
        targets: vec!["pack".into()],
        force: vec![],
        ..Default::default()
    };
    ws.scheduler().run(&opts, &mut |_| {}).unwrap();
    ws
}

#[test]
fn smollm2_gguf_tokenizer_matches_reference_ids() {
    let gguf = testdata().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let files = kiln::text::gguf::tokenizer_files(&gguf).unwrap();
    assert_eq!(files.architecture, "llama");
    let (_dir, t) = gguf_tokenizer(&gguf);
    // Reference ids from the HF tokenizer of SmolLM2-135M-Instruct.
    let enc = t
        .tokenizer
        .encode("Hello, world! What is the capital of France?", false)
        .unwrap();
    assert_eq!(
        enc.get_ids(),
        &[19556, 28, 905, 17, 1812, 314, 260, 3575, 282, 4649, 47]
    );
    assert_eq!(t.eos_token.as_deref(), Some("<|im_end|>"));
    assert!(t.chat_template.as_deref().unwrap().contains("<|im_start|>"));
    // Digits split one by one (SmolLM's pre-tokenizer).
    assert_eq!(
        t.tokenizer.encode("2024", false).unwrap().get_ids().len(),
        4
    );
}

/// The tokenizer fast path equals the `tokenizers` crate on SmolLM2's tokenizer (rebuilt from the
/// GGUF: digits split, GPT-2 pattern) and Qwen3's (NFC, Qwen2 split pattern, 151k vocab, real
/// merges) over generated alpaca rows, Moby-Dick, HumanEval's code and corner-case text.
#[test]
fn tokenizer_fast_path_equals_the_tokenizers_crate_on_real_tokenizers() {
    let td = testdata();
    let (_dir, smol) = gguf_tokenizer(&td.join("SmolLM2-135M-Instruct.Q4_1.gguf"));
    let qwen = TextTokenizer::load_dir(&td.join("qwen3")).unwrap();

    let mut texts: Vec<String> = Vec::new();
    for line in kiln::bench::alpaca_rows(300, 9).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for k in ["instruction", "input", "output"] {
            texts.push(v[k].as_str().unwrap().to_string());
        }
    }
    let moby = std::fs::read_to_string(td.join("moby-dick.txt")).unwrap();
    texts.extend(moby.split("\n\n").take(600).map(String::from));
    let gz = std::fs::File::open(td.join("HumanEval.jsonl.gz")).unwrap();
    let mut he = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(gz), &mut he).unwrap();
    for line in he.lines().take(80) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        texts.push(format!(
            "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n{}<|im_end|>\n",
            v["prompt"].as_str().unwrap(),
            v["canonical_solution"].as_str().unwrap()
        ));
    }
    texts.extend(corner_texts(2000, 11));
    for t in [&smol, &qwen] {
        let n = assert_same(t, &texts);
        assert!(n > texts.len(), "most texts take the fast path: {n}");
    }
}

#[test]
fn humaneval_gz_as_alpaca_with_smollm2() {
    let td = testdata();
    let (_d, cfg) = project(&format!(
        "base_model: {}\ndatasets:\n  - path: {}\n    type: alpaca\n    field_instruction: prompt\n    field_output: canonical_solution\nsequence_len: 2048\nsample_packing: true\nval_set_size: 0.05",
        td.join("SmolLM2-135M-Instruct.Q4_1.gguf").display(),
        td.join("HumanEval.jsonl.gz").display()
    ));
    let ws = run(&cfg);
    let st = ws.pack_stats().unwrap();
    assert_eq!(st.datasets[0].1.records, 164);
    assert_eq!(st.datasets[0].1.samples, 164, "{:?}", st.datasets[0].1);
    assert_eq!(st.train.samples + st.val.samples, 164);
    assert!(st.train.efficiency > 0.9, "{}", st.train.efficiency);
    let ex = ws.debug_examples(1).unwrap();
    let trained: Vec<u32> = ex[0]
        .labels
        .iter()
        .filter(|&&l| l >= 0)
        .map(|&l| l as u32)
        .collect();
    assert!(
        ex[0].text.contains("def has_close_elements"),
        "record 0 is HumanEval/0"
    );
    let tok = TextTokenizer::load_dir(&ws.entry_of("fetch.model").unwrap()).unwrap();
    let out = tok.tokenizer.decode(&trained, false).unwrap();
    // The response starts with indentation; the byte-level pre-tokenizer joins the prompt's last
    // newline with it into one token, which the overlap rule trains.
    assert!(
        out.trim_start()
            .starts_with("for idx, elem in enumerate(numbers):"),
        "{out}"
    );
    assert!(!out.contains("### Response"), "{out}");
    assert!(out.ends_with("<|im_end|>"));
}

#[test]
fn moby_dick_as_completion_with_qwen3_tokenizer() {
    let td = testdata();
    let (d, _) = project("");
    let text = std::fs::read_to_string(td.join("moby-dick.txt")).unwrap();
    let mut rows = String::new();
    let mut n = 0;
    for para in text
        .split("\n\n")
        .map(|p| p.trim())
        .filter(|p| p.len() > 200)
    {
        rows.push_str(&serde_json::json!({ "text": para }).to_string());
        rows.push('\n');
        n += 1;
    }
    std::fs::write(d.path().join("moby.jsonl"), rows).unwrap();
    let cfg = d.path().join("kiln.yml");
    std::fs::write(&cfg, format!(
        "base_model: {}\ndatasets:\n  - path: moby.jsonl\n    type: completion\nsequence_len: 256\nexcess_length_strategy: truncate\nsample_packing: true\ncache_dir: cache\n",
        td.join("qwen3").display()
    )).unwrap();
    let ws = run(&cfg);
    let st = ws.pack_stats().unwrap();
    let s = &st.datasets[0].1;
    assert_eq!(s.records, n as u64);
    assert!(s.truncated > 0 && s.length.max == 256, "{s:?}");
    assert_eq!(
        s.trained_tokens, s.tokens,
        "completion trains on everything"
    );
    let ex = ws.debug_examples(50).unwrap();
    let whole = ex
        .iter()
        .find(|e| e.input_ids.len() < 256)
        .expect("some paragraph fits");
    assert!(
        whole.text.ends_with("<|im_end|>"),
        "Qwen3's eos is appended: {}",
        whole.text
    );
}

#[test]
fn qwen3_real_chat_template_masks_assistant_content() {
    let td = testdata();
    let (d, cfg) = project("");
    std::fs::write(d.path().join("chat.jsonl"), concat!(
        r#"{"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Capital of France?"},{"role":"assistant","content":"Paris."},{"role":"user","content":"And of Italy?"},{"role":"assistant","content":"Rome."}]}"#, "\n",
        r#"{"conversations":[{"from":"human","value":"hi"},{"from":"gpt","value":"hello there"}]}"#, "\n",
    )).unwrap();
    std::fs::write(&cfg, format!(
        "base_model: {}\ndatasets:\n  - path: chat.jsonl\n    type: chat_template\n    data_files: []\nsequence_len: 512\ncache_dir: cache\n",
        td.join("qwen3").display()
    )).unwrap();
    // The second record uses ShareGPT fields: dropped and counted, named by its line.
    one_thread();
    let ws = kiln::workspace::Workspace::open(&cfg, &[]).unwrap();
    let mut warnings = Vec::new();
    let opts = kiln::scheduler::RunOptions {
        targets: vec!["tokenize".into()],
        ..Default::default()
    };
    ws.scheduler()
        .run(&opts, &mut |e| {
            if let kiln::events::Event::Warning { message } = e {
                warnings.push(message)
            }
        })
        .unwrap();
    assert!(
        warnings.iter().any(|w| w.contains("1 of 2 records dropped")
            && w.contains("line 2: missing field `messages`")),
        "{warnings:?}"
    );
    // Fix the data: only OpenAI-style messages.
    let good: String = std::fs::read_to_string(d.path().join("chat.jsonl"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string()
        + "\n";
    std::fs::write(d.path().join("chat.jsonl"), good).unwrap();
    let ws = run(&cfg);
    let ex = ws.debug_examples(1).unwrap();
    // Qwen3 adds an empty think block to the final assistant turn; the mask still finds content.
    assert!(
        ex[0]
            .text
            .contains("<|im_start|>assistant\n<think>\n\n</think>\n\nRome.<|im_end|>"),
        "{}",
        ex[0].text
    );
    let tok = TextTokenizer::load_dir(&ws.entry_of("fetch.model").unwrap()).unwrap();
    let trained: Vec<u32> = ex[0]
        .labels
        .iter()
        .filter(|&&l| l >= 0)
        .map(|&l| l as u32)
        .collect();
    assert_eq!(
        tok.tokenizer.decode(&trained, false).unwrap(),
        "Paris.<|im_end|>Rome.<|im_end|>"
    );
}

#[test]
fn quickstart_preprocesses_with_the_real_model() {
    let td = testdata();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let (_d, cfg) = project(&quickstart_yaml(&td, &repo));
    let ws = run(&cfg);
    let st = ws.pack_stats().unwrap();
    assert_eq!(st.datasets[0].1.records, st.datasets[0].1.samples);
    assert!(st.train.efficiency > 0.9);
}

#[test]
fn smollm2_logits_match_candle_quantized_reference_and_greedy_answers() {
    use candle_core::{Device, Tensor};
    one_thread();
    let gguf = testdata().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let dev = Device::Cpu;
    let files = kiln::text::gguf::tokenizer_files(&gguf).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tokenizer.json"),
        files.tokenizer_json.to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        files.tokenizer_config.to_string(),
    )
    .unwrap();
    let tok = TextTokenizer::load_dir(dir.path()).unwrap();
    let prompt =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let ids: Vec<u32> = tok
        .tokenizer
        .encode(prompt, false)
        .unwrap()
        .get_ids()
        .to_vec();

    let (cfg, w) = kiln::model::weights::load_gguf(&gguf, &dev).unwrap();
    assert_eq!(
        (
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.num_key_value_heads,
            cfg.tie_word_embeddings
        ),
        (30, 576, 3, true)
    );
    let exact_cfg = candle_transformers::models::llama::Config {
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        vocab_size: cfg.vocab_size,
        num_hidden_layers: cfg.num_hidden_layers,
        num_attention_heads: cfg.num_attention_heads,
        num_key_value_heads: cfg.num_key_value_heads,
        use_flash_attn: false,
        rms_norm_eps: cfg.rms_norm_eps,
        rope_theta: cfg.rope_theta as f32,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: None,
        max_position_embeddings: cfg.max_position_embeddings,
        tie_word_embeddings: true,
    };
    let vb = candle_nn::VarBuilder::from_tensors(w.clone(), candle_core::DType::F32, &dev);
    let exact = candle_transformers::models::llama::Llama::load(vb, &exact_cfg).unwrap();
    let model = kiln::model::Llama::from_weights(cfg, w, &dev).unwrap();
    let ours = model
        .forward_one(&ids, &dev)
        .unwrap()
        .get(ids.len() - 1)
        .unwrap();

    // Oracle 1 (exact): candle-transformers' f32 llama (HF layout, rotate-half RoPE) on the same
    // dequantized, un-permuted weights. Same math, other code: tolerance 1e-3 for f32 order.
    let mut cache = candle_transformers::models::llama::Cache::new(
        false,
        candle_core::DType::F32,
        &exact_cfg,
        &dev,
    )
    .unwrap();
    let exact_logits = exact
        .forward(
            &Tensor::from_vec(ids.clone(), (1, ids.len()), &dev).unwrap(),
            0,
            &mut cache,
        )
        .unwrap()
        .squeeze(0)
        .unwrap();
    let d_exact = (&ours - &exact_logits)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    eprintln!("vs f32 llama: max abs diff {d_exact}");
    assert!(d_exact < 1e-3, "max abs diff vs f32 reference {d_exact}");

    // Oracle 2 (the GGUF as llama.cpp reads it, interleaved RoPE and all): candle-transformers'
    // quantized llama on the same file. It multiplies Q4_1 weights
    // with activations quantized to Q8_1, so its logits carry quantization noise of its own;
    // kiln dequantizes the weights to f32 exactly. Tolerance: same argmax, max abs diff < 1.0
    // on logits whose spread is ~30.
    let mut f = std::fs::File::open(&gguf).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut reference = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        content, &mut f, &dev,
    )
    .unwrap();
    let theirs = reference
        .forward(
            &Tensor::from_vec(ids.clone(), (1, ids.len()), &dev).unwrap(),
            0,
        )
        .unwrap()
        .squeeze(0)
        .unwrap();
    let diff = (&ours - &theirs)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let spread = (ours.max_all().unwrap() - ours.min_all().unwrap())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let (a, b) = (
        ours.argmax(0).unwrap().to_scalar::<u32>().unwrap(),
        theirs.argmax(0).unwrap().to_scalar::<u32>().unwrap(),
    );
    eprintln!("logits max abs diff {diff} (spread {spread}), argmax {a} vs {b}");
    assert_eq!(a, b);
    assert!(diff < 1.0, "max abs diff {diff}");

    let out = model.greedy(&ids, 12, tok.eos_id(), &dev).unwrap();
    let text = tok.tokenizer.decode(&out, true).unwrap();
    assert!(text.contains("Paris"), "{text}");

    // The inference engine (what `kiln inference` uses) gives the same greedy tokens, from the
    // f32 model and from the GGUF file's own quantized weights.
    let stop: Vec<u32> = tok.eos_id().into_iter().collect();
    let greedy = |e: &kiln::model::engine::Engine| {
        let mut cache = e.new_cache();
        let mut sampler =
            kiln::model::generate::Sampler::new(kiln::model::generate::SamplingOptions::default());
        let mut got = Vec::new();
        kiln::model::generate::generate(e, &mut cache, &ids, 12, &stop, &mut sampler, &mut |t| {
            got.push(t);
            true
        })
        .unwrap();
        got
    };
    let engine = kiln::model::engine::Engine::from_llama(&model).unwrap();
    assert_eq!(greedy(&engine), out);
    drop(engine);
    let quantized = kiln::model::engine::Engine::from_gguf(&gguf).unwrap();
    assert!(
        quantized.weight_formats().contains("q4_1"),
        "{}",
        quantized.weight_formats()
    );
    let got = greedy(&quantized);
    let text = tok.tokenizer.decode(&got, true).unwrap();
    assert!(text.contains("Paris"), "quantized engine: {text}");
}

#[test]
fn quickstart_lora_steps_on_smollm2_lower_the_loss_and_generation_still_works() {
    use candle_core::Device;
    let td = testdata();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let yaml = quickstart_yaml(&td, &repo);
    let (_d, cfg) = project(&yaml);
    one_thread();
    let sets: Vec<String> = [
        "max_steps=12",
        "sequence_len=128",
        "gradient_accumulation_steps=1",
        "learning_rate=1e-3",
        "warmup_ratio=0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let ws = kiln::workspace::Workspace::open(&cfg, &sets).unwrap();
    let mut losses = Vec::new();
    let opts = kiln::scheduler::RunOptions {
        targets: vec!["train".into()],
        force: vec![],
        ..Default::default()
    };
    ws.scheduler()
        .run(&opts, &mut |e| {
            if let kiln::events::Event::Metric { name, value, .. } = e {
                if name == "loss" {
                    losses.push(value);
                }
            }
        })
        .unwrap();
    assert_eq!(losses.len(), 12);
    let first: f64 = losses[..3].iter().sum::<f64>() / 3.0;
    let last: f64 = losses[9..].iter().sum::<f64>() / 3.0;
    eprintln!("losses {losses:?}");
    assert!(
        last < first,
        "mean loss of the last 3 steps {last} is not below the first 3 {first}"
    );

    // Generation with the trained adapter applied still produces text.
    let dev = Device::Cpu;
    let dir = ws.entry_of("train").unwrap();
    let mut model =
        kiln::stages::train::load_model(&ws.entry_of("fetch.model").unwrap(), &dev).unwrap();
    let spec = kiln::train::LoraSpec {
        r: 16,
        alpha: 32.0,
        target_modules: vec![],
        target_linear: true,
        rslora: false,
        dora: false,
    };
    let vars = kiln::train::attach_lora(&mut model, &spec, 0, &dev).unwrap();
    let trained =
        candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &dev).unwrap();
    for (name, v) in &vars {
        v.set(&trained[name]).unwrap();
    }
    let tok = TextTokenizer::load_dir(&dir).unwrap();
    let prompt = "<|im_start|>user\nWhat does `kiln plan` show?<|im_end|>\n<|im_start|>assistant\n";
    let ids = tok
        .tokenizer
        .encode(prompt, false)
        .unwrap()
        .get_ids()
        .to_vec();
    let out = model.greedy(&ids, 16, tok.eos_id(), &dev).unwrap();
    let text = tok.tokenizer.decode(&out, true).unwrap();
    eprintln!("answer: {text}");
    assert!(text.split_whitespace().count() >= 3, "{text:?}");
}

/// The exported GGUF in the real llama.cpp (scripts/check-llamacpp.sh installs it; ignored in the
/// normal run because building llama-cpp-python takes ~15 minutes on 2 cores).
#[test]
#[ignore = "needs llama-cpp-python: run scripts/check-llamacpp.sh"]
fn exported_gguf_runs_in_llama_cpp() {
    use candle_core::Device;
    let td = testdata();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("chat.jsonl"), chat_rows(40)).unwrap();
    let cfg = dir.path().join("kiln.yml");
    std::fs::write(
        &cfg,
        format!(
            "base_model: {}\ndatasets:\n  - path: chat.jsonl\n    type: chat_template\nsequence_len: 256\nval_set_size: 0.1\ncache_dir: cache\nadapter: lora\nmax_steps: 1\nlearning_rate: 1e-6\nexport:\n  - {{format: gguf, quant: q8_0}}\n  - {{format: gguf, quant: q4_k_m}}\n",
            td.join("SmolLM2-135M-Instruct.Q4_1.gguf").display()
        ),
    )
    .unwrap();
    one_thread();
    let ws = kiln::workspace::Workspace::open(&cfg, &[]).unwrap();
    ws.scheduler()
        .run(&Default::default(), &mut |_| {})
        .unwrap();
    let prompt =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let dev = Device::Cpu;
    for q in ["q8_0", "q4_k_m"] {
        let path = ws
            .entry_of(&format!("export.gguf.{q}"))
            .unwrap()
            .join(format!("model-{q}.gguf"));
        let out = std::process::Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/llamacpp_greedy.py"
            ))
            .arg(&path)
            .arg(prompt)
            .arg("12")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "llama.cpp failed on {q}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        // Same tokenizer: llama.cpp reads the exported vocabulary and merges.
        let tok = TextTokenizer::load_dir(&ws.entry_of("fetch.model").unwrap()).unwrap();
        let ours = tok
            .tokenizer
            .encode(prompt, false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(ids(&r["prompt_ids"]), ours, "{q}: tokenization differs");
        // Same model: kiln reading the same file greedily picks the same tokens.
        let (c, w) = kiln::model::weights::load_gguf(&path, &dev).unwrap();
        let m = kiln::model::Llama::from_weights(c, w, &dev).unwrap();
        let kiln_out = m.greedy(&ours, 12, tok.eos_id(), &dev).unwrap();
        let theirs = ids(&r["generated"]);
        eprintln!(
            "{q}: llama.cpp {:?} / kiln {:?}",
            tok.tokenizer.decode(&theirs, true).unwrap(),
            tok.tokenizer.decode(&kiln_out, true).unwrap()
        );
        let text = tok.tokenizer.decode(&theirs, true).unwrap();
        assert!(text.contains("Paris"), "{q}: llama.cpp answered {text:?}");
        assert_eq!(theirs[..6], kiln_out[..6], "{q}: greedy tokens differ");
    }
}

/// kiln's YAML reader against PyYAML on Axolotl 0.19.0's own example configs (269 files): the
/// same value for every file, except kiln's one deliberate difference — an exponent float
/// without a dot (`1e-4`), a string to PyYAML that Axolotl's schema then reads as a float, is a
/// float to kiln.
#[test]
fn yaml_reads_axolotls_examples_as_pyyaml_does() {
    use serde_json::Value as J;
    fn same(kiln: &J, py: &J, path: &str, diffs: &mut Vec<String>) {
        match (kiln, py) {
            (J::Number(a), J::String(s)) if s.parse::<f64>().ok() == a.as_f64() => {}
            (J::Number(a), J::Number(b)) if a.as_f64() == b.as_f64() => {
                if a.is_f64() != b.is_f64() {
                    diffs.push(format!("{path}: {a} vs {b} (int/float)"));
                }
            }
            (J::Object(a), J::Object(b)) => {
                let ka: Vec<&String> = a.keys().collect();
                let kb: Vec<&String> = b.keys().collect();
                if ka != kb {
                    diffs.push(format!("{path}: keys {ka:?} vs {kb:?}"));
                    return;
                }
                for (k, v) in a {
                    same(v, &b[k], &format!("{path}.{k}"), diffs);
                }
            }
            (J::Array(a), J::Array(b)) if a.len() == b.len() => {
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    same(x, y, &format!("{path}[{i}]"), diffs);
                }
            }
            (a, b) if a == b => {}
            (a, b) => diffs.push(format!("{path}: kiln {a} vs PyYAML {b}")),
        }
    }
    let td = testdata();
    let dir = td.join("axolotl-examples");
    let reference: J =
        serde_json::from_slice(&std::fs::read(td.join("axolotl-examples.pyyaml.json")).unwrap())
            .unwrap();
    let files = reference.as_object().unwrap();
    assert!(files.len() > 250, "{} files", files.len());
    let mut diffs = Vec::new();
    for (rel, r) in files {
        let text = std::fs::read_to_string(dir.join(rel)).unwrap();
        match (kiln::config::yaml::parse(&text), r.get("value")) {
            (Ok((v, _)), Some(py)) => {
                // serde_json with sorted maps, as the reference's sort_keys.
                let k: J = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
                same(&k, py, rel, &mut diffs);
            }
            (Err(e), Some(_)) => diffs.push(format!("{rel}: kiln refused it: {e}")),
            (Ok(_), None) => diffs.push(format!("{rel}: PyYAML refused it, kiln did not")),
            (Err(_), None) => {}
        }
    }
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

/// Axolotl's own example configs (axolotl 0.19.0's examples/): every one that kiln refuses names
/// the exact key and says "not supported yet" — never "unknown" — except keys no Axolotl schema
/// defines (typos in the examples themselves, which get a did-you-mean). Prints how many
/// validate and what refuses the rest.
#[test]
fn axolotl_examples_are_refused_only_by_keys_kiln_does_not_support_yet() {
    let td = testdata();
    let dir = td.join("axolotl-examples");
    let mut files = Vec::new();
    fn walk(d: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "yml" || x == "yaml") {
                out.push(p);
            }
        }
    }
    walk(&dir, &mut files);
    files.sort();
    // Not keys of any Axolotl schema: misspellings in the examples.
    const TYPOS: &[&str] = &["adam_eps", "context_parapllel_size", "test_value"];
    let mut ok = 0;
    let mut reasons: std::collections::BTreeMap<String, usize> = Default::default();
    let mut bad = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&dir).unwrap().display().to_string();
        let problems = match kiln::config::load_variants(f, &[]) {
            Ok(_) => {
                ok += 1;
                continue;
            }
            Err(kiln::config::ConfigError::Invalid(e, _)) => e,
            Err(e) => {
                bad.push(format!("{rel}: {e}"));
                continue;
            }
        };
        for p in problems {
            let first = p.message.split(" (").next().unwrap_or("").to_string();
            let typo = TYPOS.contains(&p.key.as_str());
            // Placeholders (`<your-hf-dataset-id>`) and outputs of an earlier run are files
            // that are not there: said so, naming the key.
            let named = p.message.starts_with("not supported yet:")
                || p.message.starts_with("missing:")
                || p.message.contains("no such file or directory")
                || (typo && p.message == "unknown key");
            if !named {
                bad.push(format!("{rel}: `{}`: {}", p.key, p.message));
            }
            *reasons.entry(first).or_default() += 1;
        }
    }
    let mut top: Vec<(&String, &usize)> = reasons.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1));
    println!(
        "{ok} of {} Axolotl example configs validate; refusals: {:?}",
        files.len(),
        &top[..top.len().min(12)]
    );
    assert!(files.len() > 250, "{} files", files.len());
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// TRL's bundled chat templates (trl 1.16.0's trl/chat_templates/*.jinja, real models'
/// templates and their `_training` variants with `{% generation %}` blocks) render
/// byte-identically to Python's Jinja2 set up as Hugging Face sets it up
/// (scripts/jinja-reference.py, run here), and the trained spans the tokenize stage takes from
/// `{% generation %}` blocks are Jinja2's. Goal: at least 95% of the templates identical.
#[test]
fn trl_chat_templates_render_as_python_jinja2() {
    use kiln::config::{DataFormat, TrainOnEos};
    use kiln::data::format::{format_record, FormatCtx};
    use kiln::text::template::{ChatTemplate, Message};
    let td = testdata();
    let dir = td.join("trl-chat-templates");
    let convs = serde_json::json!({
        "one_turn": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
        "system_two_turns": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}],
        "unicode_lines": [{"role": "user", "content": "  Ünïcödé — spaces  "}, {"role": "assistant", "content": "Line one\nLine two"}],
    });
    let tmp = tempfile::tempdir().unwrap();
    // TRL's templates, and two of kiln's own that put whitespace control and indentation
    // around the generation tags (TRL's have none).
    let dir = {
        let all = tmp.path().join("templates");
        std::fs::create_dir_all(&all).unwrap();
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            std::fs::copy(e.path(), all.join(e.file_name())).unwrap();
        }
        std::fs::write(
            all.join("kiln_dashes.jinja"),
            "{%- for m in messages %}\n<|{{ m.role }}|>\n  {%- if m.role == 'assistant' %}\n    {%- generation -%}\n  {{ m.content }}</s>\n    {%- endgeneration -%}\n  {%- else %}\n{{ m.content }}\n  {%- endif %}\n{%- endfor %}\n",
        )
        .unwrap();
        std::fs::write(
            all.join("kiln_indented.jinja"),
            "{% for m in messages %}\n  {% if m.role == 'assistant' %}\n  {% generation %}\n[{{ m.content }}]\n  {% endgeneration %}\n  {% else %}\n({{ m.content }})\n  {% endif %}\n{% endfor %}",
        )
        .unwrap();
        all
    };
    let conv_file = tmp.path().join("convs.json");
    std::fs::write(&conv_file, convs.to_string()).unwrap();
    let out = std::process::Command::new(td.join("jinja-venv/bin/python"))
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/jinja-reference.py"
        ))
        .arg(&dir)
        .arg(&conv_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let fmt = DataFormat::ChatTemplate {
        field_messages: "messages".into(),
        role_field: "role".into(),
        content_field: "content".into(),
        roles: ["system", "user", "assistant"]
            .iter()
            .map(|r| (r.to_string(), r.to_string()))
            .collect(),
        roles_to_train: vec!["assistant".into()],
        train_on_eos: TrainOnEos::Turn,
        drop_system_message: false,
        template: None,
    };
    let (mut same, mut compared, mut with_generation) = (0, 0, 0);
    let mut diffs = Vec::new();
    for (name, per_conv) in reference.as_object().unwrap() {
        let source = std::fs::read_to_string(dir.join(name)).unwrap();
        let t = match ChatTemplate::new(&source, Some("<s>"), Some("</s>")) {
            Ok(t) => t,
            Err(e) => {
                compared += 1;
                diffs.push(format!("{name}: does not compile in kiln: {e}"));
                continue;
            }
        };
        let mut ok = true;
        let mut any = false;
        for (conv, want) in per_conv.as_object().unwrap() {
            if want.get("error").is_some() {
                continue;
            }
            any = true;
            let msgs: Vec<Message> = convs[conv]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| Message {
                    role: m["role"].as_str().unwrap().into(),
                    content: m["content"].as_str().unwrap().into(),
                })
                .collect();
            let want_text = want["text"].as_str().unwrap();
            let want_spans: Vec<(usize, usize)> = want["spans"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    (
                        s[0].as_u64().unwrap() as usize,
                        s[1].as_u64().unwrap() as usize,
                    )
                })
                .collect();
            match t.render_spans(&msgs, false) {
                Ok((text, spans)) if text == want_text && spans == want_spans => {}
                Ok((text, spans)) => {
                    ok = false;
                    let at = text
                        .bytes()
                        .zip(want_text.bytes())
                        .position(|(a, b)| a != b)
                        .unwrap_or(text.len().min(want_text.len()));
                    diffs.push(format!(
                        "{name} / {conv}: differs at byte {at}: kiln {:?} vs Jinja2 {:?}; spans {spans:?} vs {want_spans:?}",
                        &text[at.min(text.len())..(at + 40).min(text.len())],
                        &want_text[at.min(want_text.len())..(at + 40).min(want_text.len())]
                    ));
                }
                Err(e) => {
                    ok = false;
                    diffs.push(format!("{name} / {conv}: kiln failed: {e}"));
                }
            }
            // The tokenize stage's trained spans are the generation blocks' spans.
            if t.has_generation_blocks() && ok {
                let rec = serde_json::json!({ "messages": convs[conv] });
                let ctx = FormatCtx {
                    template: Some(&t),
                    eos_token: Some("</s>"),
                    eot_tokens: &[],
                    default_system_message: None,
                };
                let f = format_record(&fmt, &rec, &ctx).unwrap();
                assert_eq!(f.text, want_text, "{name} / {conv}");
                assert_eq!(f.trained, want_spans, "{name} / {conv}: trained spans");
            }
        }
        if any {
            compared += 1;
            if ok {
                same += 1;
                if t.has_generation_blocks() {
                    with_generation += 1;
                }
            }
        }
    }
    println!(
        "{same} of {compared} TRL chat templates render as Jinja2 does ({with_generation} with generation blocks); differences:\n{}",
        diffs.join("\n")
    );
    assert!(compared >= 60, "{compared} templates compared");
    assert!(
        !diffs.iter().any(|d| d.starts_with("kiln_")),
        "{}",
        diffs.join("\n")
    );
    assert!(
        same * 100 >= compared * 95,
        "{same} of {compared} identical:\n{}",
        diffs.join("\n")
    );
}

/// DPO on SmolLM2 (the real GGUF, LoRA) with a small synthetic preference set: the
/// chosen-minus-rejected margin and the reward accuracy rise over the run (TRL's metrics).
#[test]
fn dpo_on_smollm2_raises_the_margin() {
    let td = testdata();
    let (d, cfg) = project(&format!(
        "base_model: {}\ndatasets:\n  - path: pairs.jsonl\n    type: chatml.prompt_pairs\nrl: dpo\nrl_beta: 0.1\nadapter: lora\nlora_r: 8\nlora_alpha: 16\nlora_target_linear: true\nlearning_rate: 2e-3\nlr_scheduler: constant\nmax_steps: 8\nmicro_batch_size: 1\nsequence_len: 96\nseed: 1",
        td.join("SmolLM2-135M-Instruct.Q4_1.gguf").display()
    ));
    let pairs: String = (0..8)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("What is {i} plus {i}?"),
                "chosen": format!("{i} plus {i} is {}.", 2 * i),
                "rejected": format!("{i} plus {i} is {}.", 2 * i + 7),
            })
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(d.path().join("pairs.jsonl"), pairs).unwrap();
    one_thread();
    let ws = kiln::workspace::Workspace::open(&cfg, &[]).unwrap();
    let mut m: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    let opts = kiln::scheduler::RunOptions {
        targets: vec!["train".into()],
        force: vec![],
        ..Default::default()
    };
    ws.scheduler()
        .run(&opts, &mut |e| {
            if let kiln::events::Event::Metric { name, value, .. } = e {
                m.entry(name).or_default().push(value);
            }
        })
        .unwrap();
    let margins = &m["rewards/margins"];
    let loss = &m["loss"];
    eprintln!(
        "margins {margins:?}\nloss {loss:?}\naccuracies {:?}",
        m["rewards/accuracies"]
    );
    assert_eq!(margins.len(), 8);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(
        margins[0].abs() < 1e-3,
        "step 1: policy = reference: {margins:?}"
    );
    assert!(
        mean(&margins[5..]) > mean(&margins[..3]) + 0.05,
        "{margins:?}"
    );
    assert!(mean(&loss[5..]) < mean(&loss[..3]), "{loss:?}");
}
