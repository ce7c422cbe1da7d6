//! The Llama forward pass on tiny random models: packing is exact (block-diagonal mask and
//! per-sample positions give the same logits as running samples one by one).

use candle_core::{Device, Tensor};
use kiln::data::pack::SplitMix64;
use kiln::model::llama::packed_causal_mask;
use kiln::model::{Llama, LlamaConfig};
use std::collections::HashMap;

pub fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        architecture: "llama".into(),
        vocab_size: 64,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        max_position_embeddings: 128,
        tie_word_embeddings: true,
        attention_bias: false,
        sliding_window: None,
    }
}

/// Random weights from kiln's own PRNG (candle's CPU seeding is not usable).
pub fn tiny_model(seed: u64) -> Llama {
    let cfg = tiny_config();
    let dev = Device::Cpu;
    let mut rng = SplitMix64::new(seed);
    let mut rand = |shape: &[usize], scale: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale)
            .collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    let (h, i, kv) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_key_value_heads * cfg.head_dim(),
    );
    let mut w = HashMap::new();
    w.insert(
        "model.embed_tokens.weight".to_string(),
        rand(&[cfg.vocab_size, h], 0.5),
    );
    w.insert(
        "model.norm.weight".to_string(),
        Tensor::ones(h, candle_core::DType::F32, &dev).unwrap(),
    );
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (n, shape) in [
            ("self_attn.q_proj", [h, h]),
            ("self_attn.k_proj", [kv, h]),
            ("self_attn.v_proj", [kv, h]),
            ("self_attn.o_proj", [h, h]),
            ("mlp.gate_proj", [i, h]),
            ("mlp.up_proj", [i, h]),
            ("mlp.down_proj", [h, i]),
        ] {
            w.insert(format!("{p}.{n}.weight"), rand(&shape, 0.3));
        }
        w.insert(
            format!("{p}.input_layernorm.weight"),
            rand(&[h], 0.2).affine(1.0, 1.0).unwrap(),
        );
        w.insert(
            format!("{p}.post_attention_layernorm.weight"),
            rand(&[h], 0.2).affine(1.0, 1.0).unwrap(),
        );
    }
    Llama::from_weights(cfg, w, &dev).unwrap()
}

#[test]
fn packed_rows_give_the_same_logits_as_separate_samples() {
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global();
    let dev = Device::Cpu;
    let m = tiny_model(3);
    let a: Vec<u32> = vec![1, 5, 9, 13, 2];
    let b: Vec<u32> = vec![7, 7, 30, 41, 63, 0, 12];
    let la = m.forward_one(&a, &dev).unwrap();
    let lb = m.forward_one(&b, &dev).unwrap();
    let ids: Vec<u32> = a.iter().chain(&b).copied().collect();
    let pos: Vec<u32> = (0..a.len() as u32).chain(0..b.len() as u32).collect();
    let mask = packed_causal_mask(std::slice::from_ref(&pos), &dev).unwrap();
    let t = ids.len();
    let packed = m
        .forward(
            &Tensor::from_vec(ids, (1, t), &dev).unwrap(),
            &Tensor::from_vec(pos, (1, t), &dev).unwrap(),
            &mask,
        )
        .unwrap()
        .squeeze(0)
        .unwrap();
    // Oracle: the unpacked forward of each sample; tolerance 1e-5 covers f32 summation order.
    let pa = packed.narrow(0, 0, a.len()).unwrap();
    let pb = packed.narrow(0, a.len(), b.len()).unwrap();
    let da = (pa - la)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let db = (pb - lb)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(da < 1e-5 && db < 1e-5, "max abs diff {da} {db}");
    // Without the block mask, sample b would see sample a: the logits differ.
    let causal = packed_causal_mask(&[(0..t as u32).collect()], &dev).unwrap();
    let ids: Vec<u32> = a.iter().chain(&b).copied().collect();
    let leaky = m
        .forward(
            &Tensor::from_vec(ids, (1, t), &dev).unwrap(),
            &Tensor::from_vec((0..t as u32).collect::<Vec<_>>(), (1, t), &dev).unwrap(),
            &causal,
        )
        .unwrap()
        .squeeze(0)
        .unwrap();
    let lb2 = m.forward_one(&b, &dev).unwrap();
    let d = (leaky.narrow(0, a.len(), b.len()).unwrap() - lb2)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d > 1e-3, "the test must be able to fail: {d}");
}
