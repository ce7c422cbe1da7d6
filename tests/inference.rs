//! Inference on tiny generated models: the KV-cached forward equals the full forward, sampling
//! is seeded and honours its limits, streaming never splits a character, and `kiln inference`
//! answers a prompt and holds a multi-turn conversation.

mod common;
use candle_core::Device;
use common::*;
use kiln::model::engine::Engine;
use kiln::model::generate::{generate, Sampler, SamplingOptions, TextStream};

#[test]
fn engine_generation_equals_uncached_greedy_decoding() {
    one_thread();
    let dev = Device::Cpu;
    let m = tiny_model(5);
    let ids: Vec<u32> = (0..20).map(|i| (i * 11 + 2) % 60).collect();
    let uncached = m.greedy(&ids[..6], 10, None, &dev).unwrap();
    let e = Engine::from_llama(&m).unwrap();
    let mut cache = e.new_cache();
    let mut got = Vec::new();
    let st = generate(
        &e,
        &mut cache,
        &ids[..6],
        10,
        &[],
        &mut Sampler::new(SamplingOptions::default()),
        &mut |t| {
            got.push(t);
            true
        },
    )
    .unwrap();
    assert_eq!(got, uncached);
    assert_eq!(st.finish_reason, "length");
    assert_eq!(st.generated_tokens, 10);
    // The last sampled token is not fed: the cache holds the prompt and 9 generated tokens.
    assert_eq!(cache.len, 15);
}

#[test]
fn sampling_is_seeded_and_respects_top_k_and_top_p() {
    let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
    let best = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0 as u32;
    let draw = |o: SamplingOptions| {
        let mut s = Sampler::new(o);
        (0..200)
            .map(|_| s.sample_slice(&logits))
            .collect::<Vec<u32>>()
    };
    let hot = SamplingOptions {
        temperature: 1.5,
        ..Default::default()
    };
    assert!(draw(SamplingOptions::default()).iter().all(|&t| t == best));
    assert_eq!(
        draw(hot.clone()),
        draw(hot.clone()),
        "same seed, same draws"
    );
    assert_ne!(
        draw(hot.clone()),
        draw(SamplingOptions {
            seed: 7,
            ..hot.clone()
        })
    );
    let varied: std::collections::HashSet<u32> = draw(hot.clone()).into_iter().collect();
    assert!(varied.len() > 5, "{varied:?}");
    let k3: std::collections::HashSet<u32> = draw(SamplingOptions {
        top_k: 3,
        ..hot.clone()
    })
    .into_iter()
    .collect();
    let mut order: Vec<u32> = (0..50).collect();
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    assert!(
        k3.len() <= 3 && k3.iter().all(|t| order[..3].contains(t)),
        "{k3:?}"
    );
    let p_small: std::collections::HashSet<u32> = draw(SamplingOptions { top_p: 1e-6, ..hot })
        .into_iter()
        .collect();
    assert_eq!(p_small, [best].into_iter().collect());
}

#[test]
fn streaming_never_emits_half_a_character() {
    let tok = tokenizers::Tokenizer::from_bytes(tiny_tokenizer_json().to_string()).unwrap();
    let text = "héllo wörld — ok";
    let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
    assert!(ids.len() > text.chars().count() - 3);
    let mut s = TextStream::new(&tok);
    let mut pieces = Vec::new();
    for id in ids {
        if let Some(p) = s.push(id) {
            assert!(!p.contains('\u{FFFD}'), "{p:?}");
            pieces.push(p);
        }
    }
    assert_eq!(pieces.concat(), text);
}

fn kiln(p: &Project, args: &[&str], stdin: &str) -> (Option<i32>, String, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(p.dir.path())
        .env("KILN_NUM_THREADS", "1")
        .env_remove("KILN_CACHE")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn kiln_inference_answers_a_prompt_and_keeps_a_conversation() {
    let p = Project::new(
        "adapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_linear: true\nmax_steps: 2\n",
    );
    write_tiny_model_dir(&p.path("model"), 17);
    // Before training there is no adapter to chat with: a clear error, nothing trained.
    let (code, _, stderr) = kiln(&p, &["inference", "kiln.yml", "--prompt", "hi"], "");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("kiln train"), "{stderr}");

    let (code, _, stderr) = kiln(&p, &["train", "kiln.yml"], "");
    assert_eq!(code, Some(0), "{stderr}");
    let args = [
        "inference",
        "kiln.yml",
        "--prompt",
        "the answer",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0.8",
        "--seed",
        "5",
    ];
    let (code, out1, stderr) = kiln(&p, &args, "");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("LoRA adapter"), "{stderr}");
    assert!(stderr.contains("tokens/s"), "{stderr}");
    assert!(!out1.trim().is_empty(), "no text generated");
    let (_, out2, _) = kiln(&p, &args, "");
    assert_eq!(out1, out2, "same seed, same answer");

    // Interactive over stdin: two turns, a reset, a third turn, exit.
    let (code, out, stderr) = kiln(
        &p,
        &["inference", "kiln.yml", "--max-new-tokens", "4"],
        "first question\nsecond one\n/reset\nthird\n/exit\nnever read\n",
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(out.lines().count(), 3, "{out:?}");
    assert!(stderr.contains("conversation cleared"), "{stderr}");

    // Axolotl's `lora_model_dir` names the adapter to chat with.
    let (code, _, stderr) = kiln(
        &p,
        &[
            "inference",
            "kiln.yml",
            "--set",
            "lora_model_dir=outputs",
            "--prompt",
            "x",
            "--max-new-tokens",
            "2",
        ],
        "",
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("LoRA adapter") && stderr.contains("outputs"),
        "{stderr}"
    );
    let (code, _, stderr) = kiln(
        &p,
        &[
            "inference",
            "kiln.yml",
            "--set",
            "lora_model_dir=data",
            "--prompt",
            "x",
        ],
        "",
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("lora_model_dir") && stderr.contains("no adapter_config.json"),
        "{stderr}"
    );
}

#[test]
fn a_second_turn_reusing_the_cache_answers_like_a_fresh_session() {
    one_thread();
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model_dir(dir.path(), 9);
    let dev = Device::Cpu;
    let settings = kiln::infer::GenSettings {
        sampling: SamplingOptions::default(),
        max_new_tokens: 5,
    };
    let session = || {
        let m = kiln::stages::train::load_model(dir.path(), &dev).unwrap();
        let tok = kiln::text::TextTokenizer::load_dir(dir.path()).unwrap();
        kiln::infer::ChatSession::new(
            Engine::from_llama(&m).unwrap(),
            tok,
            None,
            false,
            settings.clone(),
        )
        .unwrap()
    };
    let mut a = session();
    let r1 = a.say("the first", &mut |_| true).unwrap();
    let r2 = a.say("and then", &mut |_| true).unwrap();
    let mut b = session();
    b.history = a.history[..2].to_vec();
    let fresh = b.say("and then", &mut |_| true).unwrap();
    assert_eq!(r2.text, fresh.text);
    assert_eq!(a.history.len(), 4);
    assert_eq!(a.history[1].content, r1.text);
}
