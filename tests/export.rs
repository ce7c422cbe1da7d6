//! The export stage on a tiny generated model: GGUF files that read back to the same model
//! (f32 exactly, quantized within tolerance) with llama.cpp's names, metadata and tokenizer;
//! safetensors exports; size and perplexity reports; `kiln export`; config errors.

mod common;
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use candle_core::Device;
use common::*;
use kiln::model::Llama;

fn project(extra: &str) -> Project {
    let p = Project::new(&format!(
        "adapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_linear: true\nmax_steps: 3\nwarmup_steps: 1\nseed: 3\n{extra}"
    ));
    write_tiny_model_dir(&p.path("model"), 17);
    let cfg = std::fs::read_to_string(&p.config)
        .unwrap()
        .replace("learning_rate: 2e-4", "learning_rate: 2e-2");
    std::fs::write(&p.config, cfg).unwrap();
    p
}

fn report(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("export.json")).unwrap()).unwrap()
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
fn gguf_exports_read_back_to_the_fine_tuned_model() {
    one_thread();
    let p = project(
        "merge_lora: true\nexport:\n  - {format: gguf, quant: f32}\n  - {format: gguf, quant: q8_0}\n  - {format: gguf, quant: q4_k_m}\n  - {format: safetensors, quant: f16}\n",
    );
    let names: Vec<String> = p.plan(&[]).into_iter().map(|s| s.name).collect();
    for n in [
        "export.gguf.f32",
        "export.gguf.q8_0",
        "export.gguf.q4_k_m",
        "export.safetensors.f16",
    ] {
        assert!(names.contains(&n.to_string()), "{names:?}");
    }
    let (s, _) = p.run(&[]);
    assert_eq!(
        s.built.iter().filter(|n| n.starts_with("export.")).count(),
        4
    );
    let ws = p.ws(&[]);
    let dev = Device::Cpu;
    let merged = kiln::stages::train::load_model(&ws.entry_of("merge").unwrap(), &dev).unwrap();
    let ids: Vec<u32> = (0..24).map(|i| (i * 7 + 3) % 60).collect();
    let want = merged.forward_one(&ids, &dev).unwrap();

    let f32_dir = ws.entry_of("export.gguf.f32").unwrap();
    let path = f32_dir.join("model-f32.gguf");
    let (cfg, w) = kiln::model::weights::load_gguf(&path, &dev).unwrap();
    assert_eq!(cfg.num_key_value_heads, 2);
    let back = Llama::from_weights(cfg, w, &dev).unwrap();
    let d = max_abs_diff(&back.forward_one(&ids, &dev).unwrap(), &want);
    assert!(d < 1e-5, "f32 GGUF round trip differs by {d}");

    // llama.cpp's names, types and metadata.
    let mut f = std::fs::File::open(&path).unwrap();
    let c = Content::read(&mut f).unwrap();
    let md = |k: &str| c.metadata.get(k).unwrap_or_else(|| panic!("no {k}"));
    assert_eq!(md("general.architecture").to_string().unwrap(), "llama");
    assert_eq!(md("llama.block_count").to_u32().unwrap(), 2);
    assert_eq!(md("llama.attention.head_count_kv").to_u32().unwrap(), 2);
    assert_eq!(md("tokenizer.ggml.model").to_string().unwrap(), "gpt2");
    let n_tokens = md("tokenizer.ggml.tokens").to_vec().unwrap().len();
    assert_eq!(n_tokens, md("llama.vocab_size").to_u32().unwrap() as usize);
    assert!(md("tokenizer.chat_template")
        .to_string()
        .unwrap()
        .contains("im_start"));
    let eos = md("tokenizer.ggml.eos_token_id").to_u32().unwrap();
    let tok = kiln::text::TextTokenizer::load_dir(&p.path("model")).unwrap();
    assert_eq!(Some(eos), tok.eos_id());
    assert!(c.tensor_infos.contains_key("blk.1.attn_q.weight"));
    assert!(c.tensor_infos.contains_key("output_norm.weight"));

    // Quantized: smaller, close, and the report says what it cost.
    let f32_report = report(&f32_dir);
    assert_eq!(f32_report["val_loss"], f32_report["val_loss_f32"]);
    let mut last = f32_report["bytes"].as_u64().unwrap();
    for q in ["q8_0", "q4_k_m"] {
        let dir = ws.entry_of(&format!("export.gguf.{q}")).unwrap();
        let r = report(&dir);
        let bytes = r["bytes"].as_u64().unwrap();
        assert!(bytes < last, "{q}: {bytes} bytes, not smaller than {last}");
        last = bytes;
        let (a, b) = (
            r["val_perplexity_f32"].as_f64().unwrap(),
            r["val_perplexity"].as_f64().unwrap(),
        );
        assert!((b - a).abs() / a < 0.2, "{q}: perplexity {b} vs {a}");
        let mut f = std::fs::File::open(dir.join(format!("model-{q}.gguf"))).unwrap();
        let c = Content::read(&mut f).unwrap();
        let ty = |n: &str| c.tensor_infos[n].ggml_dtype;
        assert_eq!(ty("blk.0.attn_norm.weight"), GgmlDType::F32);
        if q == "q8_0" {
            assert_eq!(ty("blk.0.ffn_up.weight"), GgmlDType::Q8_0);
        } else {
            // Rows of 32 are too short for k-quants: llama.cpp's fallbacks.
            assert_eq!(ty("blk.0.ffn_up.weight"), GgmlDType::Q5_0);
            assert_eq!(ty("blk.0.attn_v.weight"), GgmlDType::Q5_0);
            assert_eq!(
                ty("blk.1.attn_v.weight"),
                GgmlDType::Q8_0,
                "more bits for the last layers"
            );
            assert_eq!(ty("blk.0.ffn_down.weight"), GgmlDType::F16, "rows of 48");
        }
    }

    let st = ws.entry_of("export.safetensors.f16").unwrap();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(st.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "float16");
    let half = kiln::stages::train::load_model(&st, &dev).unwrap();
    let d = max_abs_diff(&half.forward_one(&ids, &dev).unwrap(), &want);
    assert!(d < 0.05, "f16 export differs by {d}");

    // Same inputs elsewhere, same GGUF bytes.
    let q = project("merge_lora: true\nexport:\n  - {format: gguf, quant: q8_0}\n");
    q.run(&[]);
    let name = "export.gguf.q8_0";
    assert_eq!(
        std::fs::read(ws.entry_of(name).unwrap().join("model-q8_0.gguf")).unwrap(),
        std::fs::read(q.ws(&[]).entry_of(name).unwrap().join("model-q8_0.gguf")).unwrap()
    );
}

#[test]
fn kiln_export_writes_the_gguf_into_output_dir_and_reports_perplexity() {
    let p = project("");
    let (code, stdout, stderr) =
        p.kiln(&["export", "kiln.yml", "--format", "gguf", "--quant", "q4_0"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("val perplexity"), "{stdout}");
    assert!(p.path("outputs/export/gguf.q4_0/model-q4_0.gguf").exists());

    // The exported file chats on its own: quantized weights, tokenizer and chat template from
    // the file.
    let (code, stdout, stderr) = p.kiln(&[
        "inference",
        "kiln.yml",
        "--gguf",
        "outputs/export/gguf.q4_0/model-q4_0.gguf",
        "--prompt",
        "hello there",
        "--max-new-tokens",
        "4",
    ]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("weights: ") && stderr.contains("q4_0 "),
        "{stderr}"
    );
    let (code, _, stderr) = p.kiln(&[
        "inference",
        "kiln.yml",
        "--gguf",
        "outputs/export/gguf.q4_0/model-q4_0.gguf",
        "--lora-model-dir",
        "x",
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--lora-model-dir"), "{stderr}");

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["export", "kiln.yml", "--quant", "q9_9"])
        .current_dir(p.dir.path())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("q4_k_m") && stderr.contains("q9_9"),
        "{stderr}"
    );
}

#[test]
fn export_config_errors_name_the_entry() {
    let p = project("export:\n  - {format: gguf, quant: q9}\n  - {formt: gguf}\n");
    let e = kiln::workspace::Workspace::open(&p.config, &[])
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("export[0]") && e.contains("unknown GGUF quant `q9`"),
        "{e}"
    );
    assert!(
        e.contains("export[1].formt") && e.contains("did you mean `format`"),
        "{e}"
    );
}
