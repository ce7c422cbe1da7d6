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
