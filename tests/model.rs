//! The Llama forward pass on tiny random models: packing is exact (block-diagonal mask and
//! per-sample positions give the same logits as running samples one by one).

mod common;
use candle_core::{Device, Tensor};
use common::tiny_model;
use kiln::model::llama::packed_causal_mask;

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

#[test]
fn frozen_linear_matches_matmul_forward_and_input_gradient() {
    use candle_core::Var;
    let dev = Device::Cpu;
    let mut rng = kiln::rng::SplitMix64::new(5);
    let mut rand = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .collect()
    };
    let w = Tensor::from_vec(rand(24 * 40), (24, 40), &dev).unwrap();
    let x =
        Var::from_tensor(&Tensor::from_vec(rand(2 * 7 * 40), (2, 7, 40), &dev).unwrap()).unwrap();
    let probe = Tensor::from_vec(rand(2 * 7 * 24), (2, 7, 24), &dev).unwrap();
    // Oracle: candle's broadcast_matmul with Wᵀ; tolerance 1e-5 for f32 summation order.
    let plain = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
    let ours = x
        .as_tensor()
        .apply_op1(kiln::model::frozen::FrozenLinear {
            weight: w.clone().into(),
        })
        .unwrap();
    let d = (&plain - &ours)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-5, "forward differs by {d}");
    let g_plain = (plain * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g_ours = (ours * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let (a, b) = (
        g_plain.get(x.as_tensor()).unwrap(),
        g_ours.get(x.as_tensor()).unwrap(),
    );
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-5, "input gradient differs by {d}");
}

/// A one-layer Mistral-style tiny model with a sliding window of `w` tokens (None = plain).
fn windowed(w: Option<usize>) -> kiln::model::Llama {
    let mut cfg = common::tiny_config();
    cfg.num_hidden_layers = 1;
    cfg.architecture = "mistral".into();
    cfg.sliding_window = w;
    let weights = common::tiny_weights(&cfg, 5);
    kiln::model::Llama::from_weights(cfg, weights, &Device::Cpu).unwrap()
}

fn all_logits(m: &kiln::model::Llama, ids: &[u32]) -> Vec<Vec<f32>> {
    let dev = Device::Cpu;
    let t = ids.len();
    let pos: Vec<u32> = (0..t as u32).collect();
    let mask = packed_causal_mask(std::slice::from_ref(&pos), &dev).unwrap();
    let x = m
        .forward(
            &Tensor::from_vec(ids.to_vec(), (1, t), &dev).unwrap(),
            &Tensor::from_vec(pos, (1, t), &dev).unwrap(),
            &mask,
        )
        .unwrap();
    x.squeeze(0).unwrap().to_vec2::<f32>().unwrap()
}

#[test]
fn mistral_sliding_window_limits_attention_in_training_and_cached_decoding() {
    let ids: Vec<u32> = vec![5, 9, 13, 2, 7, 30, 11, 4, 8, 21];
    let mut other = ids.clone();
    other[0] = 40;
    // One layer, window 3: position i sees tokens i-2..=i only, so token 0 cannot reach 3+.
    let m = windowed(Some(3));
    let (a, b) = (all_logits(&m, &ids), all_logits(&m, &other));
    for i in 3..ids.len() {
        assert_eq!(a[i], b[i], "position {i} is outside token 0's window");
    }
    assert_ne!(a[2], b[2], "position 2 still sees token 0");
    // Without the window token 0 reaches every position.
    let plain = windowed(None);
    let (pa, pb) = (all_logits(&plain, &ids), all_logits(&plain, &other));
    assert_ne!(pa[9], pb[9]);
    // Within the window the two models agree.
    assert_eq!(all_logits(&m, &ids[..3]), all_logits(&plain, &ids[..3]));

    // KV-cached decoding in the inference engine (a prompt, then one token at a time) gives the
    // full forward's logits.
    let e = kiln::model::engine::Engine::from_llama(&m).unwrap();
    let mut cache = e.new_cache();
    let mut got = vec![e.forward(&ids[..4], &mut cache).unwrap()];
    for &t in &ids[4..] {
        got.push(e.forward(&[t], &mut cache).unwrap());
    }
    for (k, g) in got.iter().enumerate() {
        let want = &a[3 + k];
        let diff = g
            .iter()
            .zip(want)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "position {}: max diff {diff}", 3 + k);
    }
}
