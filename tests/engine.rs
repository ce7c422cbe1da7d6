//! The inference engine against kiln's training forward pass on tiny generated models: f32
//! weights (Llama with GQA, tied and untied heads, Qwen2 biases, a Mistral sliding window) fed in
//! prompt-sized and single-token chunks, and GGUF files kiln exports, whose quantized weights
//! the engine keeps as they are.

mod common;
use candle_core::Device;
use common::*;
use kiln::model::engine::Engine;
use kiln::model::gguf_export::{write_gguf, Quant};
use kiln::model::{Llama, LlamaConfig};

fn full_logits(m: &Llama, ids: &[u32]) -> Vec<Vec<f32>> {
    m.forward_one(ids, &Device::Cpu)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Feeds `ids` to the engine in `chunks` and checks each chunk's last logits against the full
/// forward pass's logits at that position; returns each chunk's difference.
fn check_chunks(
    e: &Engine,
    want: &[Vec<f32>],
    ids: &[u32],
    chunks: &[usize],
    tol: f32,
) -> Vec<f32> {
    let mut cache = e.new_cache();
    let mut at = 0;
    let mut diffs = Vec::new();
    for &c in chunks {
        let got = e.forward(&ids[at..at + c], &mut cache).unwrap();
        at += c;
        let d = max_diff(&got, &want[at - 1]);
        assert!(
            d < tol,
            "after {at} tokens the engine's logits differ by {d}"
        );
        diffs.push(d);
    }
    assert_eq!(cache.len, at);
    diffs
}

fn ids(n: usize, vocab: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 11 + 2) % vocab).collect()
}

#[test]
fn engine_matches_the_training_forward_for_llama_with_gqa() {
    one_thread();
    let m = tiny_model(5);
    let ids = ids(24, 60);
    let want = full_logits(&m, &ids);
    let e = Engine::from_llama(&m).unwrap();
    assert_eq!(e.weight_formats(), "f32 100%");
    // A prompt long enough for the blocked gemm, single tokens, short chunks.
    check_chunks(&e, &want, &ids, &[9, 1, 1, 3, 10], 1e-4);
    check_chunks(&e, &want, &ids, &[1; 24], 1e-4);

    // An untied head.
    let mut cfg = tiny_config();
    cfg.tie_word_embeddings = false;
    let mut w = tiny_weights(&cfg, 8);
    w.insert(
        "lm_head.weight".into(),
        tiny_weights(&cfg, 9)["model.embed_tokens.weight"].clone(),
    );
    let m = Llama::from_weights(cfg, w, &Device::Cpu).unwrap();
    let want = full_logits(&m, &ids);
    check_chunks(
        &Engine::from_llama(&m).unwrap(),
        &want,
        &ids,
        &[12, 1, 11],
        1e-4,
    );
}

#[test]
fn engine_matches_the_training_forward_with_qkv_bias_and_a_sliding_window() {
    one_thread();
    let mut cfg = tiny_config();
    cfg.architecture = "qwen2".into();
    cfg.attention_bias = true;
    cfg.sliding_window = Some(5);
    let mut w = tiny_weights(&cfg, 21);
    let b = tiny_weights(&cfg, 22);
    let kv = cfg.num_key_value_heads * cfg.head_dim();
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}.self_attn");
        let emb = &b["model.embed_tokens.weight"];
        w.insert(format!("{p}.q_proj.bias"), emb.get(l).unwrap());
        w.insert(
            format!("{p}.k_proj.bias"),
            emb.get(l + 2).unwrap().narrow(0, 0, kv).unwrap(),
        );
        w.insert(
            format!("{p}.v_proj.bias"),
            emb.get(l + 4).unwrap().narrow(0, 0, kv).unwrap(),
        );
    }
    let m = Llama::from_weights(cfg, w, &Device::Cpu).unwrap();
    let ids = ids(20, 60);
    let want = full_logits(&m, &ids);
    let e = Engine::from_llama(&m).unwrap();
    check_chunks(&e, &want, &ids, &[9, 1, 1, 1, 8], 1e-4);
    // The window matters at these lengths: without it the logits differ.
    let mut plain = m.cfg.clone();
    plain.sliding_window = None;
    let mut cache = e.new_cache();
    let windowed = e.forward(&ids, &mut cache).unwrap();
    assert!(max_diff(&windowed, &want[19]) < 1e-4);
    let m2 = Llama::from_weights(plain, m.to_weights().unwrap(), &Device::Cpu).unwrap();
    assert!(max_diff(&windowed, &full_logits(&m2, &ids)[19]) > 1e-3);
}

#[test]
fn engine_keeps_gguf_weights_quantized_and_matches_the_dequantized_model() {
    one_thread();
    // Widths that are whole blocks for every format (q4_k_m's 256-wide super-blocks fall back
    // to q5_0 / q8_0 at these sizes, as they do for SmolLM2's 576).
    let vocab = tiny_tokenizer_json()["model"]["vocab"]
        .as_object()
        .unwrap()
        .len();
    let cfg = LlamaConfig {
        vocab_size: vocab,
        hidden_size: 64,
        intermediate_size: 128,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 256,
        ..tiny_config()
    };
    let w = tiny_weights(&cfg, 31);
    let m = Llama::from_weights(cfg, w, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_model_dir(dir.path(), Some(CHATML));
    let ids = ids(20, vocab as u32);
    for (q, format, tol) in [
        (Quant::F32, "f32", 1e-4f32),
        (Quant::Q8_0, "q8_0", 0.05),
        (Quant::Q4_0, "q4_0", 0.05),
        (Quant::Q4KM, "q5_0", 0.05),
    ] {
        let path = dir.path().join(format!("m-{}.gguf", q.as_str()));
        write_gguf(&m, dir.path(), None, None, q, &[], &path).unwrap();
        let e = Engine::from_gguf(&path).unwrap();
        let formats = e.weight_formats();
        assert!(formats.contains(format), "{}: {formats}", q.as_str());
        if q != Quant::F32 {
            assert!(
                e.weight_bytes() * 3 < Engine::from_llama(&m).unwrap().weight_bytes(),
                "{}: {} bytes in memory",
                q.as_str(),
                e.weight_bytes()
            );
        }
        // The reference: the same file dequantized into kiln's training model. What differs
        // is only the engine quantizing activations to 8 bits for the block dot products.
        let (c, w) = kiln::model::weights::load_gguf(&path, &Device::Cpu).unwrap();
        let reference = Llama::from_weights(c, w, &Device::Cpu).unwrap();
        let want = full_logits(&reference, &ids);
        let spread = want[19].iter().fold(0f32, |a, v| a.max(v.abs()));
        let diffs = check_chunks(&e, &want, &ids, &[9, 1, 1, 2, 7], tol * spread.max(1.0));
        eprintln!(
            "{}: {formats}; logit diffs {diffs:?} (logits up to {spread})",
            q.as_str()
        );
        // A prompt of 8+ tokens multiplies the widened weights in f32, the reference's numbers;
        // only the head (one token) quantizes its input. Layout mistakes (block order, Q/K rows)
        // would show here.
        assert!(
            diffs[0] < 0.01 * spread,
            "{}: prompt logits differ by {}",
            q.as_str(),
            diffs[0]
        );
    }
}

#[test]
fn engine_refuses_unmerged_adapters_and_bad_token_ids() {
    let mut m = tiny_model(3);
    let e = Engine::from_llama(&m).unwrap();
    let err = e
        .forward(&[1, 64], &mut e.new_cache())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("token id 64") && err.contains("64 tokens"),
        "{err}"
    );
    let spec = kiln::train::LoraSpec {
        r: 2,
        alpha: 4.0,
        target_modules: vec![],
        target_linear: true,
        rslora: false,
        dora: false,
    };
    kiln::train::attach_lora(&mut m, &spec, 1, &Device::Cpu).unwrap();
    let err = Engine::from_llama(&m).err().unwrap().to_string();
    assert!(err.contains("merged"), "{err}");
}

#[test]
fn engine_gives_the_same_bits_on_one_and_two_threads() {
    // Every output value is computed whole by one thread, or (a decoded token's attention) from
    // parts cut where the thread count has no say, so splitting work across threads changes
    // nothing. Two threads exercise the parallel paths (row blocks, a decoded token's
    // attention in parts from 32 positions on, prompt attention per head).
    let vocab = tiny_tokenizer_json()["model"]["vocab"]
        .as_object()
        .unwrap()
        .len();
    let cfg = LlamaConfig {
        vocab_size: vocab,
        hidden_size: 64,
        intermediate_size: 128,
        max_position_embeddings: 256,
        ..tiny_config()
    };
    let m = Llama::from_weights(cfg.clone(), tiny_weights(&cfg, 41), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_model_dir(dir.path(), Some(CHATML));
    let path = dir.path().join("m.gguf");
    write_gguf(&m, dir.path(), None, None, Quant::Q8_0, &[], &path).unwrap();
    let ids = ids(110, vocab as u32);
    for e in [
        Engine::from_llama(&m).unwrap(),
        Engine::from_gguf(&path).unwrap(),
    ] {
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut cache = e.new_cache();
                let mut out = vec![e.forward(&ids[..40], &mut cache).unwrap()];
                for &t in &ids[40..] {
                    out.push(e.forward(&[t], &mut cache).unwrap());
                }
                out
            })
        };
        assert_eq!(run(1), run(2), "{}", e.weight_formats());
    }
}
