//! kiln's compact base weights against bitsandbytes: the expected values in
//! tests/fixtures/bnb/reference.json were computed by bitsandbytes 0.50.2 itself
//! (scripts/bnb-reference.py) on the same integer-formula inputs.

use kiln::model::packed::{
    nearest, quantize_4bit, quantize_blockwise, Absmax, FourBit, PackFormat, Packed, Store,
    DYNAMIC_SIGNED, DYNAMIC_SIGNED_4BIT, DYNAMIC_UNSIGNED, NF4, SIGNED_4BIT_BOOK, SIGNED_BOOK,
    UNSIGNED_BOOK,
};
use serde_json::Value;

fn reference() -> Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/bnb/reference.json"
    );
    serde_json::from_slice(&std::fs::read(p).expect("fixture")).expect("json")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

/// Fails naming how many values differ and the first one (not printing thousands of values).
fn same<T: PartialEq + std::fmt::Debug>(got: &[T], want: &[T], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let differ: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
    if let Some(&i) = differ.first() {
        panic!(
            "{what}: {} of {} values differ; first at {i}: kiln {:?}, bitsandbytes {:?}",
            differ.len(),
            got.len(),
            got[i],
            want[i]
        );
    }
}

fn hex(v: &Value) -> Vec<u8> {
    let s = v.as_str().expect("hex");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

/// The script's inputs: ((i·7919 + 13) mod 2001 − 1000) / 1000 · (1 + ⌊i/64⌋ mod 5), block 3 zero.
fn weights(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            if (192..256).contains(&i) {
                return 0.0;
            }
            let v = (((i * 7919 + 13) % 2001) as f32 - 1000.0) / 1000.0;
            v * (1 + (i / 64) % 5) as f32
        })
        .collect()
}

#[test]
fn dynamic_maps_match_bitsandbytes() {
    let r = reference();
    same(&DYNAMIC_SIGNED, &floats(&r["dynamic_signed"]), "signed map");
    same(
        &DYNAMIC_UNSIGNED,
        &floats(&r["dynamic_unsigned"]),
        "unsigned map",
    );
    same(
        &DYNAMIC_SIGNED_4BIT,
        &floats(&r["dynamic_signed_4bit"]),
        "signed 4-bit map",
    );
}

#[test]
fn nf4_table_is_the_published_code() {
    // QLoRA's NF4: 16 values, -1 … 1, exactly one zero (index 7).
    assert_eq!(NF4[0], -1.0);
    assert_eq!(NF4[7], 0.0);
    assert_eq!(NF4[15], 1.0);
    assert!(NF4.windows(2).all(|w| w[0] < w[1]));
    // Each value gets the nearest code: 1.0 → 1 (15), 0.5 → 0.4407 (12, the midpoint with
    // 0.5626 is 0.5017), -1 → 0, 0.05 → 0.0796 (8, past the midpoint 0.0398), 0 → 7.
    let mut x = vec![0f32; 64];
    x[0] = 2.0;
    x[1] = 1.0;
    x[2] = -2.0;
    x[3] = 0.1;
    let (codes, absmax) = quantize_4bit(&x, FourBit::Nf4);
    assert_eq!(absmax, vec![2.0]);
    assert_eq!(codes[0], (15 << 4) | 12);
    assert_eq!(codes[1], 8);
    assert_eq!(codes[2], 7 << 4 | 7);
}

#[test]
fn four_bit_quantisation_matches_bitsandbytes() {
    let r = reference();
    let x = weights(64 * 260);
    for (kind, name) in [(FourBit::Nf4, "nf4"), (FourBit::Fp4, "fp4")] {
        let (codes, absmax) = quantize_4bit(&x, kind);
        let plain = &r[name];
        same(&codes, &hex(&plain["codes"]), &format!("{name} codes"));
        same(
            &absmax,
            &floats(&plain["absmax"]),
            &format!("{name} absmax"),
        );
        for (dq, key) in [(false, name.to_string()), (true, format!("{name}_dq"))] {
            let rec = &r[&key];
            let p = Packed::pack(
                &x,
                130,
                128,
                PackFormat::FourBit {
                    kind,
                    double_quant: dq,
                },
            )
            .unwrap();
            if let Store::FourBit {
                absmax: Absmax::Double { q, absmax2, offset },
                ..
            } = &p.store
            {
                same(
                    q,
                    &hex(&rec["absmax_q"]),
                    &format!("{key} quantised scales"),
                );
                same(
                    absmax2,
                    &floats(&rec["absmax2"]),
                    &format!("{key} second scales"),
                );
                assert_eq!(
                    *offset,
                    rec["offset"].as_f64().unwrap() as f32,
                    "{key} offset"
                );
            }
            let mut head = vec![0f32; 1024];
            p.widen_rows(0, 8, &mut head).unwrap();
            same(
                &head,
                &floats(&rec["dequant_head"]),
                &format!("{key} dequantised"),
            );
        }
    }
}

#[test]
fn int8_rows_match_bitsandbytes() {
    let r = reference();
    let x = weights(64 * 260);
    let p = Packed::pack(&x, 130, 128, PackFormat::Int8).unwrap();
    let Store::Int8 { q, row_absmax } = &p.store else {
        panic!("int8 store");
    };
    let qb: Vec<u8> = q.iter().map(|v| *v as u8).collect();
    same(&qb, &hex(&r["int8"]["q"]), "int8 codes");
    same(
        row_absmax,
        &floats(&r["int8"]["row_absmax"]),
        "int8 row scales",
    );
}

#[test]
fn blockwise_8bit_matches_bitsandbytes() {
    let r = reference();
    let x = weights(64 * 260);
    for (signed, key) in [(true, "blockwise_signed"), (false, "blockwise_unsigned")] {
        let v: Vec<f32> = if signed {
            x.clone()
        } else {
            x.iter().map(|a| a.abs()).collect()
        };
        let (code, book) = if signed {
            (DYNAMIC_SIGNED, &SIGNED_BOOK)
        } else {
            (DYNAMIC_UNSIGNED, &UNSIGNED_BOOK)
        };
        let mut q = vec![0u8; v.len()];
        let mut absmax = vec![0f32; v.len().div_ceil(256)];
        quantize_blockwise(book, &v, 256, &mut q, &mut absmax);
        same(
            &absmax,
            &floats(&r[key]["absmax"]),
            &format!("{key} absmax"),
        );
        // kiln takes the nearest code; bitsandbytes' CPU search (a direct-lookup binary search)
        // sometimes returns a farther neighbour. Where they differ, kiln's must be the closer,
        // and they must agree almost everywhere.
        let want = hex(&r[key]["q"]);
        let mut differ = 0;
        for (i, (a, b)) in q.iter().zip(&want).enumerate() {
            if a == b || absmax[i / 256] == 0.0 {
                continue;
            }
            differ += 1;
            let x = v[i] / absmax[i / 256];
            let (da, db) = ((x - code[*a as usize]).abs(), (x - code[*b as usize]).abs());
            assert!(
                da <= db,
                "{key} value {i}: kiln's code {a} is farther than bitsandbytes' {b}"
            );
        }
        assert!(
            differ * 100 < q.len(),
            "{key}: {differ} of {} codes differ",
            q.len()
        );
    }
}

/// Deterministic values in [-1, 1) from an index (no RNG crate needed).
fn wave(n: usize, salt: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((((i + salt) * 2_654_435_761usize) % 10_007) as f32 / 10_007.0) * 2.0 - 1.0)
        .collect()
}

#[test]
fn packed_linear_matches_the_f32_op_on_its_widened_weights() {
    use candle_core::{quantized::GgmlDType, quantized::QTensor, Device, Tensor, Var};
    use kiln::model::frozen::FrozenLinear;
    use kiln::model::lora_op::LoraLinear;
    use kiln::model::packed::BaseWeight;
    use std::sync::Arc;
    // Shapes that take several forward panels (n·k > 2^20) and several backward depth blocks.
    let (n, k) = (2100, 512);
    let w = wave(n * k, 1);
    let dev = Device::Cpu;
    let mut packed: Vec<Packed> = [
        PackFormat::Bf16,
        PackFormat::F16,
        PackFormat::Int8,
        PackFormat::FourBit {
            kind: FourBit::Nf4,
            double_quant: true,
        },
        PackFormat::FourBit {
            kind: FourBit::Fp4,
            double_quant: false,
        },
    ]
    .into_iter()
    .map(|f| Packed::pack(&w, n, k, f).unwrap())
    .collect();
    let wt = Tensor::from_vec(w.clone(), (n, k), &dev).unwrap();
    for g in [GgmlDType::Q4K, GgmlDType::Q8_0] {
        packed.push(Packed::from_ggml(&QTensor::quantize(&wt, g).unwrap()).unwrap());
    }
    let bits = |t: &Tensor| -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    for p in packed {
        let fmt = p.format();
        let dense = BaseWeight::Dense(p.to_tensor().unwrap());
        let p = BaseWeight::Packed(Arc::new(p));
        for m in [3, 40] {
            let x =
                Var::from_tensor(&Tensor::from_vec(wave(m * k, 7), (m, k), &dev).unwrap()).unwrap();
            let c = Tensor::from_vec(wave(m * n, 9), (m, n), &dev).unwrap();
            let run = |wb: &BaseWeight| {
                let y = x
                    .as_tensor()
                    .apply_op1(FrozenLinear { weight: wb.clone() })
                    .unwrap();
                let g = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
                (bits(&y), bits(g.get(x.as_tensor()).unwrap()))
            };
            let (yp, gp) = run(&p);
            let (yd, gd) = run(&dense);
            assert!(
                yp == yd,
                "{fmt}, {m} rows: forward differs from the widened f32 op"
            );
            assert!(
                gp == gd,
                "{fmt}, {m} rows: input gradient differs from the widened f32 op"
            );
            // The LoRA layer on a packed base: output and all three gradients.
            let a =
                Var::from_tensor(&Tensor::from_vec(wave(4 * k, 3), (4, k), &dev).unwrap()).unwrap();
            let b =
                Var::from_tensor(&Tensor::from_vec(wave(n * 4, 5), (n, 4), &dev).unwrap()).unwrap();
            let lora = |wb: &BaseWeight| {
                let y = x
                    .as_tensor()
                    .apply_op3(
                        a.as_tensor(),
                        b.as_tensor(),
                        LoraLinear {
                            weight: wb.clone(),
                            scale: 2.0,
                            mask: None,
                        },
                    )
                    .unwrap();
                let g = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
                [
                    bits(&y),
                    bits(g.get(x.as_tensor()).unwrap()),
                    bits(g.get(a.as_tensor()).unwrap()),
                    bits(g.get(b.as_tensor()).unwrap()),
                ]
            };
            assert!(
                lora(&p) == lora(&dense),
                "{fmt}, {m} rows: LoRA layer differs"
            );
        }
    }
}

#[test]
fn adamw_8bit_matches_bitsandbytes() {
    use candle_core::{Device, Tensor, Var};
    use kiln::config::precision::OptimStates;
    use kiln::train::AdamW;
    let r = reference();
    let rec = &r["adamw8bit"];
    let n = 8192;
    let p0: Vec<f32> = weights(n).iter().map(|v| v * 0.1).collect();
    let var = Var::from_tensor(&Tensor::from_vec(p0, n, &Device::Cpu).unwrap()).unwrap();
    let mut opt = AdamW::new(vec![var.clone()], 0.01)
        .unwrap()
        .with_states(OptimStates::Bnb8bit)
        .unwrap();
    assert!(opt.quantised[0].is_some(), "8192 values get 8-bit moments");
    for step in 1..=5usize {
        let g: Vec<f32> = (0..n)
            .map(|i| (((i * 104_729 + 7 * step) % 1999) as f32 - 999.0) / 10_000.0)
            .collect();
        let g = Tensor::from_vec(g, n, &Device::Cpu).unwrap();
        opt.update(&[g], 1e-2, 0.0).unwrap();
    }
    let got = var.as_tensor().to_vec1::<f32>().unwrap();
    let want = floats(&rec["param"]);
    // bitsandbytes' CPU search picks a farther code for a few values per thousand, so the
    // moments (and through them the weights) differ there by one code step; elsewhere the
    // update is the same arithmetic.
    let p0: Vec<f32> = weights(n).iter().map(|v| v * 0.1).collect();
    let moved: f64 = want
        .iter()
        .zip(&p0)
        .map(|(w, p)| ((w - p) as f64).powi(2))
        .sum();
    let apart: f64 = got
        .iter()
        .zip(&want)
        .map(|(g, w)| ((g - w) as f64).powi(2))
        .sum();
    let rel = (apart / moved).sqrt();
    eprintln!("relative difference of the updates: {rel:.5}");
    assert!(
        rel < 0.006,
        "kiln's 8-bit AdamW moved the weights {rel:.4} (relative) away from bitsandbytes'"
    );
    let q = opt.quantised[0].as_ref().unwrap();
    let close = q
        .m_absmax
        .iter()
        .zip(floats(&rec["absmax1"]))
        .all(|(a, b)| (a - b).abs() <= 1e-6 * b.abs());
    assert!(close, "first-moment block scales differ from bitsandbytes'");
    let agree =
        q.m.iter()
            .zip(hex(&rec["state1"]))
            .filter(|(a, b)| **a == *b)
            .count();
    assert!(
        agree * 100 >= n * 98,
        "{agree} of {n} first-moment codes agree"
    );
    let agree =
        q.v.iter()
            .zip(hex(&rec["state2"]))
            .filter(|(a, b)| **a == *b)
            .count();
    assert!(
        agree * 100 >= n * 98,
        "{agree} of {n} second-moment codes agree"
    );
    // 8-bit moments: 2 bytes a value plus two f32 scales per 256 (f32 AdamW: 8).
    assert_eq!(opt.state_bytes(), 2 * n + 8 * n.div_ceil(256));
}

#[test]
fn code_book_lookup_is_the_nearest_value() {
    // The table-driven search answers as the plain nearest-value search everywhere on [-1, 1]:
    // a dense sweep, every code value and midpoint (and their neighbours), every bucket edge.
    for (book, code) in [
        (&SIGNED_BOOK, &DYNAMIC_SIGNED[..]),
        (&UNSIGNED_BOOK, &DYNAMIC_UNSIGNED[..]),
        (&SIGNED_4BIT_BOOK, &DYNAMIC_SIGNED_4BIT[..]),
    ] {
        let mut xs: Vec<f32> = (0..200_001).map(|i| i as f32 / 100_000.0 - 1.0).collect();
        for w in code.windows(2) {
            let mid = (w[0] + w[1]) / 2.0;
            let (up, down) = (mid.next_up(), mid.next_down());
            xs.extend([w[0], w[1], mid, up, down]);
        }
        for b in (0..1u32 << 16).step_by(7) {
            xs.push(f32::from_bits(b << 16));
            xs.push(f32::from_bits((b << 16) | 0xFFFF));
        }
        for x in xs.into_iter().filter(|x| x.is_finite() && x.abs() <= 1.0) {
            assert_eq!(book.nearest(x), nearest(code, x), "x = {x:e}");
        }
    }
}
