//! Preference training on tiny random models: the step's gradients against finite differences
//! of its loss through the real model op chain (every loss kind, gradient accumulation over two
//! micro-batches, a packed row of two pairs), packed pairs scoring as they do alone, and DPO
//! raising the chosen-minus-rejected margin over a run.

mod common;
use candle_core::{Device, Tensor, Var};
use common::{one_thread, tiny_model};
use kiln::train::pref::{pair_logps, pref_grads, pref_step, PrefLoss, PrefMicro};
use kiln::train::{attach_lora, AdamW, Batch, LoraSpec};

type Row = (Vec<u32>, Vec<u8>, Vec<u32>);

/// One pair as two sequences: prompt + chosen, prompt + rejected; only the completions trained.
fn pair(prompt: &[u32], chosen: &[u32], rejected: &[u32]) -> Vec<Row> {
    [chosen, rejected]
        .iter()
        .map(|c| {
            let ids: Vec<u32> = prompt.iter().chain(c.iter()).copied().collect();
            let trained = (0..ids.len()).map(|i| (i >= prompt.len()) as u8).collect();
            let pos = (0..ids.len() as u32).collect();
            (ids, trained, pos)
        })
        .collect()
}

/// Rows concatenated into one packed row.
fn packed(rows: &[Row]) -> Row {
    let mut out: Row = Default::default();
    for r in rows {
        out.0.extend(&r.0);
        out.1.extend(&r.1);
        out.2.extend(&r.2);
    }
    out
}

fn spec() -> LoraSpec {
    LoraSpec {
        r: 4,
        alpha: 8.0,
        target_modules: vec![],
        target_linear: true,
        rslora: false,
        dora: false,
    }
}

/// Three pairs: micro-batch 1 = one row holding two pairs packed; micro-batch 2 = one pair.
fn micro_rows() -> Vec<Vec<Row>> {
    let p1 = pair(&[3, 4, 5], &[6, 7, 8, 9], &[10, 11]);
    let p2 = pair(&[20, 21], &[22, 23, 24], &[25, 26, 27, 28, 29]);
    let p3 = pair(&[30, 31, 32, 33], &[34, 35], &[36, 37, 38]);
    vec![vec![packed(&[p1, p2].concat())], vec![packed(&p3)]]
}

fn micro(reference: &kiln::model::Llama, dev: &Device) -> Vec<PrefMicro> {
    micro_rows()
        .iter()
        .map(|rows| {
            let batch = Batch::new(rows, dev).unwrap();
            let reference = pair_logps(reference, &batch).unwrap();
            // KTO reads one label per unit (the pair losses ignore them).
            let labels = [true, false][..reference.len()].to_vec();
            PrefMicro {
                batch,
                reference,
                labels,
            }
        })
        .collect()
}

#[test]
fn preference_gradients_match_finite_differences() {
    one_thread();
    let dev = Device::Cpu;
    let mut model = tiny_model(7);
    let vars = attach_lora(&mut model, &spec(), 1, &dev).unwrap();
    // B away from zero so every LoRA matrix has a gradient.
    for (i, (name, v)) in vars.iter().enumerate() {
        if name.contains("lora_B") {
            let n = v.as_tensor().elem_count();
            let vals: Vec<f32> = (0..n)
                .map(|k| (((k * 7919 + i * 104_729) % 1000) as f32 / 1000.0 - 0.5) * 0.2)
                .collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &dev).unwrap())
                .unwrap();
        }
    }
    // The reference: another random model, so margins are far from zero.
    let reference = tiny_model(8);
    let m = micro(&reference, &dev);
    let plain: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    // KTO, with the reference's KL scores above the policy's so the (detached) KL estimate is
    // clamped at 0 and the loss is a function of the weights alone.
    let mut kto_m = micro(&reference, &dev);
    for m in &mut kto_m {
        for r in &mut m.reference {
            r.1 += 1e3;
        }
    }
    let losses = [
        PrefLoss::Sigmoid {
            beta: 0.5,
            label_smoothing: 0.1,
        },
        PrefLoss::Ipo { beta: 0.5 },
        PrefLoss::Orpo { beta: 0.3 },
        PrefLoss::Simpo {
            beta: 2.0,
            gamma: 0.5,
            label_smoothing: 0.0,
            cpo_alpha: 0.7,
        },
    ];
    let kto = PrefLoss::Kto {
        beta: 0.5,
        desirable_weight: 1.2,
        undesirable_weight: 0.8,
    };
    for loss in losses.into_iter().chain([kto]) {
        let m = if loss == kto { &kto_m } else { &m };
        let g = pref_grads(&model, &plain, m, &loss).unwrap();
        // A LoRA A and B of the first and last layer: the largest few gradient entries of each.
        let mut checked = 0;
        for vi in [0usize, 1, plain.len() - 2, plain.len() - 1] {
            let grad = g.grads[vi].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut idx: Vec<usize> = (0..grad.len()).collect();
            idx.sort_by(|&a, &b| grad[b].abs().total_cmp(&grad[a].abs()));
            for &k in idx.iter().take(2) {
                let base = plain[vi]
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let eps = 2e-3f32;
                let at = |d: f32| {
                    let mut v = base.clone();
                    v[k] += d;
                    plain[vi]
                        .set(&Tensor::from_vec(v, plain[vi].shape(), &dev).unwrap())
                        .unwrap();
                    let l = pref_grads(&model, &plain, m, &loss).unwrap().loss;
                    plain[vi]
                        .set(&Tensor::from_vec(base.clone(), plain[vi].shape(), &dev).unwrap())
                        .unwrap();
                    l
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
                let an = grad[k] as f64;
                assert!(
                    (fd - an).abs() <= 0.03 * an.abs().max(1e-3),
                    "{loss:?}: var {} entry {k}: analytic {an} vs finite difference {fd}",
                    vars[vi].0
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 8);
        assert!(
            g.loss.is_finite() && g.loss > 0.0,
            "{loss:?}: loss {}",
            g.loss
        );
    }
}

#[test]
fn packed_pairs_score_as_they_do_alone() {
    one_thread();
    let dev = Device::Cpu;
    let model = tiny_model(7);
    let p1 = pair(&[3, 4, 5], &[6, 7, 8, 9], &[10, 11]);
    let p2 = pair(&[20, 21], &[22, 23, 24], &[25, 26, 27, 28, 29]);
    let both = pair_logps(
        &model,
        &Batch::new(&[packed(&[p1.clone(), p2.clone()].concat())], &dev).unwrap(),
    )
    .unwrap();
    let a = pair_logps(&model, &Batch::new(&[packed(&p1)], &dev).unwrap()).unwrap();
    // Unpacked: chosen and rejected as two padded rows of one batch.
    let b = pair_logps(&model, &Batch::new(&p2, &dev).unwrap()).unwrap();
    assert_eq!(both.len(), 2);
    for (x, y) in both.iter().zip(a.iter().chain(&b)) {
        assert!(
            (x.0 - y.0).abs() < 1e-4 && (x.1 - y.1).abs() < 1e-4,
            "{x:?} vs {y:?}"
        );
        assert!(x.0 < 0.0 && x.1 < 0.0);
    }
    // An odd number of sequences is not a batch of pairs.
    let odd = Batch::new(&[packed(&[p1[0].clone()])], &dev).unwrap();
    let err = pair_logps(&model, &odd).unwrap_err().to_string();
    assert!(err.contains("whole pairs"), "{err}");
}

#[test]
fn dpo_raises_the_margin_and_reward_accuracy() {
    one_thread();
    let dev = Device::Cpu;
    let mut model = tiny_model(11);
    // Synthetic preferences: chosen continues the prompt's count upward, rejected repeats.
    let mut rows = Vec::new();
    for s in 0..4u32 {
        let p: Vec<u32> = (s * 5 + 2..s * 5 + 5).collect();
        let chosen: Vec<u32> = (s * 5 + 5..s * 5 + 9).collect();
        let rejected = vec![s * 5 + 2; 4];
        rows.push(pair(&p, &chosen, &rejected));
    }
    let batches: Vec<Batch> = rows
        .iter()
        .map(|r| Batch::new(&[packed(r)], &dev).unwrap())
        .collect();
    // The reference is the model before training (LoRA's B starts at zero: the same function).
    let refs: Vec<Vec<(f64, f64)>> = batches
        .iter()
        .map(|b| pair_logps(&model, b).unwrap())
        .collect();
    let vars = attach_lora(&mut model, &spec(), 3, &dev).unwrap();
    let mut opt = AdamW::new(vars.iter().map(|(_, v)| v.clone()).collect(), 0.0).unwrap();
    let loss = PrefLoss::Sigmoid {
        beta: 0.1,
        label_smoothing: 0.0,
    };
    let mut log = Vec::new();
    for step in 0..25 {
        let micro: Vec<PrefMicro> = rows
            .iter()
            .zip(&refs)
            .map(|(r, reference)| PrefMicro {
                batch: Batch::new(&[packed(r)], &dev).unwrap(),
                reference: reference.clone(),
                labels: vec![],
            })
            .collect();
        let (g, norm) = pref_step(&model, &mut opt, &micro, &loss, 5e-3, 1.0).unwrap();
        assert!(norm.is_finite());
        if step == 0 {
            // Policy = reference: every margin is 0, the loss ln 2, no pair ranked right.
            assert!(
                (g.loss - std::f64::consts::LN_2).abs() < 1e-6,
                "first loss {}",
                g.loss
            );
            assert!(g.metrics.rewards_margins.abs() < 1e-6);
            assert_eq!(g.metrics.rewards_accuracies, 0.0);
        }
        log.push((
            g.loss,
            g.metrics.rewards_margins,
            g.metrics.rewards_accuracies,
        ));
    }
    let (first, last) = (log[1], log[log.len() - 1]);
    assert!(last.0 < first.0 - 0.05, "loss {first:?} -> {last:?}");
    assert!(last.1 > first.1 + 0.5, "margin {first:?} -> {last:?}");
    assert_eq!(last.2, 1.0, "accuracy at the end: {log:?}");
}

// ---- Data: Axolotl's preference types, TRL's tokenization, and the pipeline ----

use kiln::config::pref::{PairFields, PairMarkup};
use kiln::config::PairStyle;
use kiln::data::format::pair_texts;
use serde_json::json;

fn chat_style(argilla_chat: bool) -> PairStyle {
    PairStyle::ChatTemplate {
        field_messages: "messages".into(),
        field_chosen: "chosen".into(),
        field_rejected: "rejected".into(),
        role_field: "role".into(),
        content_field: "content".into(),
        roles: vec![
            ("user".into(), "user".into()),
            ("assistant".into(), "assistant".into()),
            ("system".into(), "system".into()),
        ],
        argilla_chat,
        template: None,
    }
}

#[test]
fn axolotl_preference_types_give_axolotls_prompt_and_completions() {
    let fixed = |markup, fields| PairStyle::Fixed { markup, fields };
    // chatml.intel with and without a system message (Axolotl's dpo/chatml.py strings).
    let rec = json!({"system": "Be brief.", "question": "Q?", "chosen": "A.", "rejected": "B."});
    assert_eq!(
        pair_texts(&fixed(PairMarkup::Chatml, PairFields::Intel), &rec, None).unwrap(),
        (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n".into(),
            "A.<|im_end|>".into(),
            "B.<|im_end|>".into()
        )
    );
    let rec = json!({"system": "", "question": "Q?", "chosen": "A.", "rejected": "B."});
    assert_eq!(
        pair_texts(&fixed(PairMarkup::Chatml, PairFields::Intel), &rec, None)
            .unwrap()
            .0,
        "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    );
    // llama3.prompt_pairs with a system message (dpo/llama3.py).
    let rec = json!({"system": "S", "prompt": "P", "chosen": "C", "rejected": "R"});
    assert_eq!(
        pair_texts(&fixed(PairMarkup::Llama3, PairFields::PromptPairs), &rec, None).unwrap(),
        (
            "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nP<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n".into(),
            "C<|eot_id|>".into(),
            "R<|eot_id|>".into()
        )
    );
    // argilla: the first of prompt/input/question/instruction, chosen_response/rejected_response.
    let rec = json!({"instruction": "I", "chosen_response": "C", "rejected_response": "R"});
    assert_eq!(
        pair_texts(&fixed(PairMarkup::Chatml, PairFields::Argilla), &rec, None).unwrap(),
        (
            "<|im_start|>user\nI<|im_end|>\n<|im_start|>assistant\n".into(),
            "C<|im_end|>".into(),
            "R<|im_end|>".into()
        )
    );
    // argilla_chat and ultra read conversations.
    let conv =
        |a: &str| json!([{"role": "user", "content": "U"}, {"role": "assistant", "content": a}]);
    let rec = json!({"chosen": conv("C"), "rejected": conv("R")});
    assert_eq!(
        pair_texts(
            &fixed(PairMarkup::Chatml, PairFields::ArgillaChat),
            &rec,
            None
        )
        .unwrap(),
        (
            "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n".into(),
            "C<|im_end|>".into(),
            "R<|im_end|>".into()
        )
    );
    let rec = json!({"prompt": "P", "chosen": conv("C"), "rejected": conv("R")});
    assert_eq!(
        pair_texts(&fixed(PairMarkup::Llama3, PairFields::Ultra), &rec, None)
            .unwrap()
            .1,
        "C<|eot_id|>"
    );
    // icr reads `input`; a missing field is named.
    let err = pair_texts(
        &fixed(PairMarkup::Chatml, PairFields::Icr),
        &json!({"question": "Q", "chosen": "C", "rejected": "R"}),
        None,
    )
    .unwrap_err();
    assert!(err.contains("missing field `input`"), "{err}");
    // No type: the strings as they are.
    let rec = json!({"prompt": "P", "chosen": "C", "rejected": "R"});
    assert_eq!(
        pair_texts(&PairStyle::Raw, &rec, None).unwrap(),
        ("P".into(), "C".into(), "R".into())
    );
}

#[test]
fn chat_template_default_renders_the_prompt_and_each_completion_as_an_assistant_turn() {
    let tpl =
        kiln::text::template::ChatTemplate::new(common::CHATML, None, Some("<|im_end|>")).unwrap();
    let want_prompt =
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
    // Completions as a message, a string, or a conversation whose last message counts.
    for (chosen, rejected) in [
        (
            json!({"role": "assistant", "content": "Yes."}),
            json!({"role": "assistant", "content": "No."}),
        ),
        (json!("Yes."), json!("No.")),
        (
            json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]),
            json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "No."}]),
        ),
    ] {
        let rec = json!({
            "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}],
            "chosen": chosen, "rejected": rejected,
        });
        let (p, c, r) = pair_texts(&chat_style(false), &rec, Some(&tpl)).unwrap();
        assert_eq!(p, want_prompt);
        // From the completion's text to the end of its turn, trailing whitespace stripped.
        assert_eq!(c, "Yes.<|im_end|>");
        assert_eq!(r, "No.<|im_end|>");
    }
    // A string prompt is the user's message.
    let rec = json!({"messages": "Hi", "chosen": "Yes.", "rejected": "No."});
    let (p, _, _) = pair_texts(&chat_style(false), &rec, Some(&tpl)).unwrap();
    assert_eq!(p, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    // argilla_chat: the prompt is the chosen conversation's earlier messages.
    let conv =
        |a: &str| json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": a}]);
    let rec = json!({"chosen": conv("Yes."), "rejected": conv("No.")});
    let (p, c, _) = pair_texts(&chat_style(true), &rec, Some(&tpl)).unwrap();
    assert_eq!(p, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    assert_eq!(c, "Yes.<|im_end|>");
    // An unknown role is named.
    let rec =
        json!({"messages": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"});
    let err = pair_texts(&chat_style(false), &rec, Some(&tpl)).unwrap_err();
    assert!(err.contains("unknown role `bot`"), "{err}");
}

/// Edits the project's config: `from` becomes `to`.
fn retype(p: &common::Project, from: &str, to: &str) {
    let cfg = std::fs::read_to_string(&p.config).unwrap();
    std::fs::write(&p.config, cfg.replace(from, to)).unwrap();
}

/// A project training on preference pairs: the tiny model, a chat_template.default dataset and
/// a chatml.intel one.
fn pref_project(extra: &str) -> common::Project {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_model_dir(&dir.path().join("model"), 5);
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    let chat: String = (0..12)
        .map(|i| {
            json!({
                "messages": [{"role": "user", "content": format!("What is {i} plus one?")}],
                "chosen": {"role": "assistant", "content": format!("It is {}.", i + 1)},
                "rejected": {"role": "assistant", "content": format!("Maybe {}?", i * 7 + 3)},
            })
            .to_string()
                + "\n"
        })
        .collect();
    let intel: String = (0..8)
        .map(|i| {
            json!({"system": if i % 2 == 0 { "" } else { "Be exact." }, "question": format!("Count to {i}."),
                   "chosen": (0..=i).map(|k| k.to_string()).collect::<Vec<_>>().join(" "),
                   "rejected": "I cannot count."})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(dir.path().join("data/chat.jsonl"), chat).unwrap();
    std::fs::write(dir.path().join("data/intel.jsonl"), intel).unwrap();
    let config = dir.path().join("kiln.yml");
    std::fs::write(
        &config,
        format!(
            "base_model: ./model\ndatasets:\n  - path: data/chat.jsonl\n    type: chat_template.default\n  - path: data/intel.jsonl\n    type: chatml.intel\nsequence_len: 96\nsample_packing: true\nval_set_size: 0.2\neval_steps: 3\nmicro_batch_size: 2\ncache_dir: cache\nseed: 3\n{extra}"
        ),
    )
    .unwrap();
    common::Project { dir, config }
}

const DPO: &str = "rl: dpo\nrl_beta: 0.1\nadapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_linear: true\nlearning_rate: 2e-2\nmax_steps: 6\n";

#[test]
fn a_dpo_config_trains_with_cached_reference_scores_shared_by_a_beta_sweep() {
    one_thread();
    let p = pref_project(DPO);
    let ws = p.ws(&[]);
    let names: Vec<String> = ws.plan.stages.iter().map(|s| s.name.clone()).collect();
    assert!(names.contains(&"refscore".to_string()), "{names:?}");
    let (s, events) = p.run(&[]);
    assert!(s.built.contains(&"refscore".to_string()), "{:?}", s.built);
    assert!(s.built.contains(&"train".to_string()));
    // TRL's metric names per step, into the metrics stream.
    let acc = common::metric_values(&events, "rewards/accuracies");
    let margins = common::metric_values(&events, "rewards/margins");
    assert_eq!(acc.len(), 6, "{acc:?}");
    // Step 1: the adapter's B is zero, so the policy is the reference: margin 0 (to the rounding
    // of a differently batched forward pass).
    assert!(margins[0].abs() < 1e-3, "{margins:?}");
    assert!(margins[5] > margins[0], "the margin rose: {margins:?}");
    let eval = common::metric_values(&events, "eval_rewards/accuracies");
    assert!(!eval.is_empty());
    // trainer_state.json keeps them per step.
    let entry = ws_entry(&p, "train");
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(entry.join("trainer_state.json")).unwrap()).unwrap();
    let hist = st["log_history"].as_array().unwrap();
    assert!(hist
        .iter()
        .any(|h| h["rewards/chosen"].is_number() && h["logps/rejected"].is_number()));
    // The pack statistics show the pairs' lengths.
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ws_entry(&p, "pack").join("stats.json")).unwrap())
            .unwrap();
    assert!(
        stats["datasets"][0][1]["pairs"]["chosen"]["max"]
            .as_u64()
            .unwrap()
            > 0,
        "{stats}"
    );
    assert_eq!(stats["train"]["paired"], true);

    // Another beta: the reference scores are reused, only training reruns.
    let (s, _) = p.run(&["rl_beta=0.3"]);
    assert!(!s.built.contains(&"refscore".to_string()), "{:?}", s.built);
    assert_eq!(s.built, vec!["train".to_string()], "{:?}", s.built);

    // A four-variant beta sweep plans one refscore stage for all four trainings.
    let sweep = pref_project(&format!("{DPO}sweep:\n  rl_beta: [0.05, 0.1, 0.2, 0.4]\n"));
    let ws = sweep.ws(&[]);
    let names: Vec<String> = ws.plan.stages.iter().map(|s| s.name.clone()).collect();
    let count = |prefix: &str| {
        names
            .iter()
            .filter(|n| *n == prefix || n.starts_with(&format!("{prefix}@")))
            .count()
    };
    assert_eq!(count("refscore"), 1, "{names:?}");
    assert_eq!(count("train"), 4, "{names:?}");
    // The same in `kiln plan --json`: one refscore entry, each train stage reading it.
    let (code, out, err) = sweep.kiln(&["plan", "kiln.yml", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    let stages = plan["stages"].as_array().unwrap();
    let of = |kind: &str| {
        stages
            .iter()
            .filter(|s| s["kind"] == kind)
            .collect::<Vec<_>>()
    };
    assert_eq!(of("refscore").len(), 1, "{out}");
    assert_eq!(of("train").len(), 4, "{out}");
    let shared = of("refscore")[0]["name"].clone();
    for t in of("train") {
        assert!(t["deps"].as_array().unwrap().contains(&shared), "{t}");
    }
}

#[test]
fn dpo_orpo_and_kto_adapters_merge_and_export_like_any_adapter() {
    one_thread();
    let tail = "merge_lora: true\nexport:\n  - {format: gguf, quant: q8_0}\n";
    let lora = "adapter: lora\nlora_r: 4\nlora_alpha: 8\nlearning_rate: 1e-2\nmax_steps: 2\n";
    for p in [
        pref_project(&format!("{DPO}{tail}")),
        pref_project(&format!("rl: orpo\n{lora}{tail}")),
        kto_project(&format!("rl: kto\n{lora}{tail}")),
    ] {
        check_merged_and_exported(&p);
    }
}

fn check_merged_and_exported(p: &common::Project) {
    let (s, _) = p.run(&[]);
    for stage in ["train", "merge", "export.gguf.q8_0"] {
        assert!(
            s.built.contains(&stage.to_string()),
            "{stage}: {:?}",
            s.built
        );
    }
    let train = ws_entry(p, "train");
    assert!(train.join("adapter_model.safetensors").is_file());
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(train.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    let export = ws_entry(p, "export.gguf.q8_0");
    let gguf = std::fs::read_dir(&export)
        .unwrap()
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "gguf"))
        .expect("a .gguf in the export entry");
    assert!(gguf.metadata().unwrap().len() > 1000);
}

fn ws_entry(p: &common::Project, stage: &str) -> std::path::PathBuf {
    p.ws(&[]).entry_of(stage).unwrap()
}

#[test]
fn orpo_and_simpo_train_without_a_reference_stage() {
    one_thread();
    for rl in [
        "rl: orpo\norpo_alpha: 0.2\n",
        "rl: simpo\nrl_beta: 2.0\nsimpo_gamma: 0.5\n",
    ] {
        let p = pref_project(&format!(
            "{rl}adapter: lora\nlora_r: 4\nlora_alpha: 8\nlearning_rate: 1e-2\nmax_steps: 3\n"
        ));
        let names: Vec<String> = p
            .ws(&[])
            .plan
            .stages
            .iter()
            .map(|s| s.name.clone())
            .collect();
        assert!(!names.contains(&"refscore".to_string()), "{rl}: {names:?}");
        let (s, events) = p.run(&[]);
        assert!(s.built.contains(&"train".to_string()), "{rl}");
        let nll = common::metric_values(&events, "nll_loss");
        assert_eq!(
            nll.len(),
            3,
            "{rl}: the chosen completions' token loss is logged"
        );
        let loss = common::metric_values(&events, "loss");
        assert!(loss.iter().all(|l| l.is_finite()), "{rl}: {loss:?}");
    }
}

#[test]
fn preference_configs_are_checked_at_validate() {
    let p = pref_project("rl: grpo\n");
    let (code, _, err) = p.kiln(&["validate", "kiln.yml"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("`rl`: not supported yet: rl: grpo"), "{err}");
    // Supervised types under rl:, and preference types without it, say which is which.
    let p = pref_project("rl: dpo\n");
    retype(&p, "type: chatml.intel", "type: alpaca");
    let (_, _, err) = p.kiln(&["validate", "kiln.yml"]);
    assert!(
        err.contains("`datasets[1].type`: dataset type `alpaca` is supervised data"),
        "{err}"
    );
    let p = pref_project("");
    let (_, _, err) = p.kiln(&["validate", "kiln.yml"]);
    assert!(
        err.contains("holds preference pairs, and this config does supervised training"),
        "{err}"
    );
    // An unsupported DPO loss type is named.
    let p = pref_project("rl: dpo\ndpo_loss_type: [robust]\n");
    let (_, _, err) = p.kiln(&["validate", "kiln.yml"]);
    assert!(
        err.contains("not supported yet: DPO loss type `robust`"),
        "{err}"
    );
}

#[test]
fn the_reference_is_the_quantized_base_for_qlora_and_the_starting_weights_for_full_tuning() {
    one_thread();
    for method in [
        "adapter: qlora\nload_in_4bit: true\nlora_r: 4\nlora_alpha: 8\n",
        "",
    ] {
        let p = pref_project(&format!(
            "rl: dpo\nrl_beta: 1.0\n{method}learning_rate: 1e-3\nmax_steps: 2\n"
        ));
        let ws = p.ws(&[]);
        let plan = &ws.plan;
        let i = plan.index_of("refscore").unwrap();
        let up: Vec<&str> = plan.stages[i]
            .deps
            .iter()
            .map(|d| plan.stages[d.stage].name.as_str())
            .collect();
        let want = if method.is_empty() {
            "fetch.model"
        } else {
            "quantize"
        };
        assert_eq!(up, vec![want, "pack"], "{method}");
        let (_, events) = p.run(&[]);
        // Step 1's policy is the reference itself (a zero adapter on the same stored base, or
        // the untouched weights): every reward is 0 up to the rounding of batching.
        let chosen = common::metric_values(&events, "rewards/chosen");
        let rejected = common::metric_values(&events, "rewards/rejected");
        assert!(
            chosen[0].abs() < 1e-3 && rejected[0].abs() < 1e-3,
            "{method}: {chosen:?} {rejected:?}"
        );
        assert!(
            chosen[1] != 0.0,
            "{method}: the second step moved the policy"
        );
    }
}

#[test]
fn preprocess_debug_shows_each_pairs_chosen_and_rejected_sequence() {
    let p = pref_project("rl: dpo\n");
    let (code, out, err) = p.kiln(&["preprocess", "kiln.yml", "--debug"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("preference pairs · prompt mean"), "{out}");
    assert!(out.contains("record 0, chosen ("), "{out}");
    assert!(out.contains("record 0, rejected ("), "{out}");
}

#[test]
fn orpos_argilla_chat_strategy_renders_system_user_and_assistant_turns() {
    let tpl =
        kiln::text::template::ChatTemplate::new(common::CHATML, None, Some("<|im_end|>")).unwrap();
    let conv =
        |a: &str| json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": a}]);
    let rec = json!({"prompt": "Hi", "chosen": conv("Yes."), "rejected": conv("No.")});
    let style = PairStyle::OrpoChat {
        template: kiln::config::TemplateChoice::Builtin("chatml".into()),
    };
    let (p, c, r) = pair_texts(&style, &rec, Some(&tpl)).unwrap();
    // An empty system turn when the record has none, as Axolotl's ORPO strategy writes it.
    assert_eq!(
        p,
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(c, "Yes.<|im_end|>\n");
    assert_eq!(r, "No.<|im_end|>\n");
    // In a config: accepted under rl: orpo; an unsupported rl: is said once, not per dataset.
    let p = pref_project("rl: orpo\n");
    retype(
        &p,
        "type: chat_template.default",
        "type: chat_template.argilla",
    );
    let (code, _, err) = p.kiln(&["validate", "kiln.yml"]);
    assert_eq!(code, Some(0), "{err}");
    let p = pref_project("rl: grpo\n");
    let (_, _, err) = p.kiln(&["validate", "kiln.yml"]);
    assert_eq!(
        err.matches("error:").count(),
        2,
        "one problem, under the header: {err}"
    );
}

/// A KTO project: labelled completions, unpaired.
fn kto_project(extra: &str) -> common::Project {
    let p = pref_project("");
    let rows: String = (0..16)
        .map(|i| {
            let good = i % 3 != 0;
            json!({
                "prompt": format!("What is {i} plus one?"),
                "completion": if good { format!("It is {}.", i + 1) } else { format!("Maybe {}?", i * 7 + 3) },
                "label": good,
            })
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(p.path("data/kto.jsonl"), rows).unwrap();
    std::fs::write(
        &p.config,
        format!("base_model: ./model\ndatasets:\n  - path: data/kto.jsonl\n    type: chatml.prompt_pairs\nsequence_len: 96\nsample_packing: true\nval_set_size: 0.2\neval_steps: 3\nmicro_batch_size: 2\ncache_dir: cache\nseed: 3\n{extra}"),
    )
    .unwrap();
    p
}

#[test]
fn a_kto_config_trains_on_labelled_completions_with_cached_reference_and_kl_scores() {
    one_thread();
    let p = kto_project("rl: kto\nrl_beta: 0.1\nkto_desirable_weight: 1.0\nkto_undesirable_weight: 1.5\nadapter: lora\nlora_r: 4\nlora_alpha: 8\nlearning_rate: 2e-2\nmax_steps: 6\n");
    let names: Vec<String> = p
        .ws(&[])
        .plan
        .stages
        .iter()
        .map(|s| s.name.clone())
        .collect();
    assert!(names.contains(&"refscore".to_string()), "{names:?}");
    let (s, events) = p.run(&[]);
    assert!(s.built.contains(&"train".to_string()), "{:?}", s.built);
    let kl = common::metric_values(&events, "kl");
    assert_eq!(kl.len(), 6, "{kl:?}");
    assert!(kl.iter().all(|k| *k >= 0.0 && k.is_finite()), "{kl:?}");
    let margins = common::metric_values(&events, "rewards/margins");
    // Step 1: policy = reference, so every reward and the KL estimate are 0.
    assert!(
        margins[0].abs() < 1e-3 && kl[0].abs() < 1e-3,
        "{margins:?} {kl:?}"
    );
    assert!(
        margins[5] > margins[0],
        "desirable completions gained on undesirable: {margins:?}"
    );
    assert!(common::metric_values(&events, "rewards/accuracies").is_empty());
    // The token sets hold the labels and each unit's KL sequence.
    let stats: serde_json::Value = serde_json::from_slice(
        &std::fs::read(ws_entry(&p, "tokenize[0]").join("stats.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(stats["pairs"]["pairs"], 16, "{stats}");
    assert_eq!(stats["pairs"]["desirable"], 10, "{stats}");
    let (code, out, err) = p.kiln(&["preprocess", "kiln.yml", "--debug"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("16 KTO completions (10 desirable)"), "{out}");
    assert!(
        out.contains("record 0, undesirable (") && out.contains("record 0, KL sequence"),
        "{out}"
    );
    // Axolotl's KTO types; a missing label is named.
    let style = PairStyle::Fixed {
        markup: PairMarkup::Chatml,
        fields: PairFields::Ultra,
    };
    let (prompt, completion, label) = kiln::data::format::unpaired_texts(
        &style,
        &json!({"prompt": "P", "completion": "C", "label": false}),
    )
    .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>user\nP<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!((completion.as_str(), label), ("C<|im_end|>", false));
    let err =
        kiln::data::format::unpaired_texts(&style, &json!({"prompt": "P", "completion": "C"}))
            .unwrap_err();
    assert!(err.contains("missing field `label`"), "{err}");
}
