//! QLoRA and low-precision bases through the real pipeline on a tiny generated model: an
//! Axolotl-style QLoRA config validates, trains (the loss falls), merges into the widened NF4
//! base, and reproduces its bytes; 8-bit and 16-bit bases and the 8-bit optimizers train; the
//! rules Axolotl enforces are errors before any work.

mod common;
use candle_core::Device;
use common::*;
use kiln::events::Event;
use kiln::model::adapter::PeftAdapter;

const QLORA: &str = "adapter: qlora\nload_in_4bit: true\nlora_r: 4\nlora_alpha: 8\nlora_target_linear: true\nmax_steps: 8\nwarmup_steps: 1\nseed: 3\nbf16: auto\nlearning_rate: 2e-2\n";

fn project(extra: &str) -> Project {
    let p = Project::new(extra);
    write_tiny_model_dir(&p.path("model"), 17);
    // The tests set their own learning rate.
    let cfg = std::fs::read_to_string(&p.config)
        .unwrap()
        .replace("learning_rate: 2e-4\n", "");
    std::fs::write(&p.config, cfg).unwrap();
    p
}

fn losses(dir: &std::path::Path) -> Vec<f64> {
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("trainer_state.json")).unwrap()).unwrap();
    st["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["loss"].as_f64())
        .collect()
}

fn notes(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Note { message } => Some(message.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn qlora_trains_merges_into_the_widened_base_and_reproduces() {
    one_thread();
    let p = project(&format!(
        "{QLORA}merge_lora: true\nexport:\n  - {{format: gguf, quant: q8_0}}\n"
    ));
    let (s, events) = p.run(&[]);
    for stage in ["quantize", "train", "merge", "export.gguf.q8_0"] {
        assert!(
            s.built.contains(&stage.to_string()),
            "{stage}: {:?}",
            s.built
        );
    }
    let ws = p.ws(&[]);
    let train = ws.entry_of("train").unwrap();
    let l = losses(&train);
    assert!(l.len() == 8 && l[7] < l[0], "QLoRA loss should fall: {l:?}");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(train.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["kiln_base_weights"], "nf4_double_quant", "{cfg}");
    let n = notes(&events);
    assert!(
        n.iter().any(|m| m.contains("NF4") && m.contains("nf4+dq")),
        "training says what it stored: {n:?}"
    );
    assert!(
        n.iter()
            .any(|m| m.contains("merged the adapter into the base")),
        "{n:?}"
    );

    // The merged model is the widened NF4 base plus the deltas (not the f32 original).
    let dev = Device::Cpu;
    let base_dir = ws.entry_of("fetch.model").unwrap();
    let merged = kiln::stages::train::load_model(&ws.entry_of("merge").unwrap(), &dev).unwrap();
    let (mut quantised, _) = kiln::stages::train::load_model_as(
        &base_dir,
        kiln::config::precision::BaseWeights::Nf4DoubleQuant,
    )
    .unwrap();
    PeftAdapter::load(&train, &dev)
        .unwrap()
        .apply(&mut quantised)
        .unwrap();
    let ids: Vec<u32> = (0..24).map(|i| (i * 7 + 3) % 60).collect();
    let a = merged.forward_one(&ids, &dev).unwrap();
    let b = quantised.forward_one(&ids, &dev).unwrap();
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-4, "merged vs NF4 base + adapter: {d}");

    // The quantize entry train read holds the very weights packing at load gives.
    let (from_entry, _) = kiln::stages::train::load_quantized(
        &ws.entry_of("quantize").unwrap(),
        kiln::config::precision::BaseWeights::Nf4DoubleQuant,
    )
    .unwrap();
    let (packed_now, _) = kiln::stages::train::load_model_as(
        &base_dir,
        kiln::config::precision::BaseWeights::Nf4DoubleQuant,
    )
    .unwrap();
    let bits = |m: &kiln::model::Llama| -> Vec<u32> {
        m.forward_one(&ids, &dev)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    assert!(
        bits(&from_entry) == bits(&packed_now),
        "quantize entry round trip"
    );

    // Another LoRA setting reuses the quantized base: only train (and merge) rebuild.
    let (s2, _) = p.run(&["lora_r=8"]);
    assert!(
        !s2.built.contains(&"quantize".to_string()),
        "{:?}",
        s2.built
    );
    assert!(s2.built.contains(&"train".to_string()), "{:?}", s2.built);

    // Same config, fresh cache: the same adapter bytes.
    let q = project(&format!("{QLORA}merge_lora: true\n"));
    q.run(&[]);
    let again = q.ws(&[]).entry_of("train").unwrap();
    assert_eq!(
        std::fs::read(train.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(again.join("adapter_model.safetensors")).unwrap(),
        "QLoRA is deterministic"
    );
}

#[test]
fn int8_and_bf16_bases_and_8bit_optimizers_train() {
    one_thread();
    for (extra, stored, states) in [
        ("adapter: lora\nload_in_8bit: true\n", "int8", None),
        ("adapter: lora\nbf16: true\n", "bf16", None),
        // lora_r 128: the A and B matrices reach the 4096 values where moments go 8-bit.
        ("adapter: qlora\nload_in_4bit: true\nlora_r: 128\noptimizer: adamw_bnb_8bit\nbnb_config_kwargs:\n  bnb_4bit_quant_type: fp4\n  bnb_4bit_use_double_quant: false\n", "fp4", Some("Bnb8bit")),
        ("adapter: lora\nlora_r: 128\noptimizer: adamw_torch_4bit\n", "", Some("Torchao4bit")),
    ] {
        let p = project(&format!(
            "{extra}lora_alpha: 8\nlora_target_linear: true\nmax_steps: 6\nwarmup_steps: 1\nseed: 5\nlearning_rate: 1e-2\n"
        ));
        let (_, events) = p.run(&[]);
        let l = losses(&p.ws(&[]).entry_of("train").unwrap());
        assert!(l[l.len() - 1] < l[0], "{extra}: loss should fall: {l:?}");
        let n = notes(&events);
        if !stored.is_empty() {
            assert!(n.iter().any(|m| m.contains(stored)), "{extra}: {n:?}");
        }
        if let Some(s) = states {
            assert!(n.iter().any(|m| m.contains(s)), "{extra}: {n:?}");
        }
    }
}

#[test]
fn axolotl_precision_rules_are_errors_before_work() {
    for (extra, key, says) in [
        ("adapter: qlora\n", "adapter", "needs `load_in_4bit: true`"),
        (
            "adapter: qlora\nload_in_8bit: true\n",
            "load_in_8bit",
            "cannot load in 8 bits",
        ),
        ("load_in_4bit: true\n", "load_in_4bit", "full fine-tuning"),
        (
            "adapter: lora\nload_in_4bit: true\nload_in_8bit: true\n",
            "load_in_8bit",
            "both set",
        ),
        (
            "adapter: qlora\nload_in_4bit: true\nbnb_config_kwargs:\n  bnb_4bit_quant_type: int4\n",
            "bnb_4bit_quant_type",
            "not a bitsandbytes 4-bit type",
        ),
    ] {
        let p = project(extra);
        let (code, _, err) = p.kiln(&["validate", "kiln.yml"]);
        assert_eq!(code, Some(2), "{extra}: {err}");
        assert!(err.contains(key) && err.contains(says), "{extra}: {err}");
    }
    // Accepted as written: Axolotl's QLoRA recipe, with the keys that have no effect here noted.
    let p = project("adapter: qlora\nload_in_4bit: true\nbf16: auto\ntf32: false\noptimizer: paged_adamw_8bit\nbnb_config_kwargs:\n  llm_int8_has_fp16_weight: false\n  bnb_4bit_quant_type: nf4\n  bnb_4bit_use_double_quant: true\n");
    let (code, out, err) = p.kiln(&["validate", "kiln.yml"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(err.contains("paged"), "{err}");
}

#[test]
fn gradient_checkpointing_keeps_the_key_and_the_bytes() {
    one_thread();
    let extra = format!("{QLORA}optimizer: adamw_bnb_8bit\n");
    let p = project(&extra);
    p.run(&[]);
    let plain = p.ws(&[]).entry_of("train").unwrap();
    // The same gradients bit for bit, so the same key: nothing rebuilds.
    let (s, _) = p.run(&["gradient_checkpointing=true"]);
    assert!(s.built.is_empty(), "{:?}", s.built);
    // And built from scratch with it on, the same adapter.
    let q = project(&format!("{extra}gradient_checkpointing: true\n"));
    q.run(&[]);
    let ckpt = q.ws(&[]).entry_of("train").unwrap();
    assert_eq!(
        std::fs::read(plain.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(ckpt.join("adapter_model.safetensors")).unwrap()
    );
}

#[test]
fn qlora_on_a_gguf_base_keeps_its_blocks() {
    one_thread();
    use kiln::model::packed::{BaseWeight, Store};
    // A quantized GGUF of the tiny model (kiln's own export), then QLoRA on it.
    let p = project(
        "adapter: lora\nlora_r: 4\nlora_alpha: 8\nmax_steps: 2\nlearning_rate: 1e-2\nmerge_lora: true\nexport:\n  - {format: gguf, quant: q8_0}\n",
    );
    p.run(&[]);
    let gguf = p
        .ws(&[])
        .entry_of("export.gguf.q8_0")
        .unwrap()
        .join("model-q8_0.gguf");
    let q = project(&QLORA.replace("bf16: auto\n", ""));
    let cfg = std::fs::read_to_string(&q.config)
        .unwrap()
        .replace("base_model: ./model", "base_model: ./model-q8_0.gguf");
    std::fs::write(&q.config, cfg).unwrap();
    std::fs::copy(&gguf, q.path("model-q8_0.gguf")).unwrap();
    let (s, events) = q.run(&[]);
    assert!(s.built.contains(&"train".to_string()), "{:?}", s.built);
    let n = notes(&events);
    assert!(
        n.iter().any(|m| m.contains("q8_0")),
        "stored as the file's blocks: {n:?}"
    );
    let l = losses(&q.ws(&[]).entry_of("train").unwrap());
    assert!(l[l.len() - 1] < l[0], "{l:?}");
    // The kept blocks widen to exactly what loading the GGUF at f32 gives, Q and K rows back
    // in HF's order included.
    let dir = q.ws(&[]).entry_of("fetch.model").unwrap();
    let dense = kiln::stages::train::load_model(&dir, &Device::Cpu).unwrap();
    let (packed, _) = kiln::stages::train::load_model_as(
        &dir,
        kiln::config::precision::BaseWeights::Nf4DoubleQuant,
    )
    .unwrap();
    let mut kept = Vec::new();
    for ((name, a), (_, b)) in packed.linears().into_iter().zip(dense.linears()) {
        let BaseWeight::Packed(pw) = &a.weight else {
            panic!("{name}: not packed");
        };
        if let Store::Ggml(_) = &pw.store {
            let got = pw
                .to_tensor()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want = b
                .weight
                .to_f32()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(
                got == want,
                "{name}: widened blocks differ from the f32 load"
            );
            kept.push(name);
        }
    }
    assert!(
        kept.iter().any(|n| n.ends_with("q_proj")) && kept.iter().any(|n| n.ends_with("k_proj")),
        "{kept:?}"
    );
}

/// `kiln train --debug` steps the model as training stores it: on an NF4 base its first loss
/// is the packed base's, not the f32 one's.
#[test]
fn train_debug_steps_on_the_packed_base() {
    let loss = |extra: &str| -> f64 {
        let p = project(extra);
        let (code, out, err) = p.kiln(&["train", "kiln.yml", "--debug"]);
        assert_eq!(code, Some(0), "{err}");
        let at = out.find("debug step: loss ").expect("a debug line") + "debug step: loss ".len();
        out[at..]
            .split(',')
            .next()
            .and_then(|x| x.trim().parse().ok())
            .expect("a loss")
    };
    let nf4 = loss(QLORA);
    let f32 = loss(&QLORA.replace("adapter: qlora\nload_in_4bit: true\n", "adapter: lora\n"));
    assert!(nf4.is_finite() && f32.is_finite());
    assert_ne!(nf4, f32, "the NF4 base gives its own loss");
}
