//! Golden keys: the key of every stage kind, for fixed fixtures and fixed upstream digests, is
//! pinned. A change here is deliberate: the key's inputs or encoding changed, so bump that
//! stage's VERSION and update the pin (`KILN_PRINT_KEYS=1 cargo test --test golden_keys --
//! --nocapture` prints the new table). Upstream digests are fixed strings rather than built
//! outputs, so these pins test the key derivation alone, not the numerics of upstream stages.

mod common;
use common::*;
use kiln::plan::stage_key;
use kiln::stages::StageKind;
use std::collections::BTreeSet;

/// Every stage's (name, kind, key) with each upstream digest replaced by a fixed one.
fn keys(p: &Project) -> Vec<(String, StageKind, String)> {
    let ws = p.ws(&[]);
    let plan = &ws.plan;
    plan.stages
        .iter()
        .map(|s| {
            let up: Vec<(String, String)> = s
                .deps
                .iter()
                .map(|d| {
                    let name = plan.stages[d.stage].name.clone();
                    let digest = kiln::hash::hash_bytes(format!("upstream {name}").as_bytes());
                    (name, digest)
                })
                .collect();
            (s.name.clone(), s.kind(), stage_key(s, &up).unwrap())
        })
        .collect()
}

/// A LoRA pipeline with every stage kind: fetch, tokenize, pack, train, merge, evaluate (with a
/// prompts file) and export.
fn lora_project() -> Project {
    let p = Project::new(
        "adapter: lora\nlora_r: 4\nlora_alpha: 8\nmax_steps: 2\nmerge_lora: true\nevaluate:\n  prompts: data/prompts.txt\n  max_new_tokens: 4\nexport:\n  - {format: gguf, quant: q8_0}\n",
    );
    std::fs::write(p.path("data/prompts.txt"), "What is kiln?\n").unwrap();
    p
}

const PINNED_LORA: &[(&str, &str)] = &[
    (
        "fetch.model",
        "4ee343abc45bb3fd48eaec659feb0ce90dc3cc1c263a8fb61d018b67024c1da4",
    ),
    (
        "fetch.data[0]",
        "6530a7de10417fc37648230654d349e9b35f2d1d8feb8d9ed33b0342d58cae9c",
    ),
    (
        "tokenize[0]",
        "4f9ad761e8d99aa1a287a4db480092bd42b3da5c6709e3ba9353bb90d84ba586",
    ),
    (
        "fetch.data[1]",
        "b3f0d0cfe5d6235da4a3bf1ec55fea43f8bff5eb3055d13958f12c2c1aef2af6",
    ),
    (
        "tokenize[1]",
        "b330499050964eb651db444b9e6c520626bf72a1763890c001288245209a09a2",
    ),
    (
        "pack",
        "94899e03e28c4f6d7d77830f5b03de99e794571c92eaca82341ed7ae22fa25de",
    ),
    (
        "train",
        "c1c37c7f230d08f47495357dbaef2fd6e169754d3f12c93c1e065155d5d42ee8",
    ),
    (
        "merge",
        "9c433cbe93493801571810e83f9c195fa4080455b47f8aabbd9fc5b7275277b5",
    ),
    (
        "fetch.prompts",
        "8b47ca973ae6011fcad55541859925f0abf64d23b2cf31b46b4f58d3ac6862c9",
    ),
    (
        "evaluate",
        "e920bb1e7d1c440f0e567f05089f6d35642e2779902c2a7e0cb34e60393f1171",
    ),
    (
        "export.gguf.q8_0",
        "d18516e8713fbc9c17c459c1bb73f126e0c8b119c0f6016c76fdd38759f3af6c",
    ),
];
const PINNED_FULL: &[(&str, &str)] = &[
    (
        "fetch.model",
        "4ee343abc45bb3fd48eaec659feb0ce90dc3cc1c263a8fb61d018b67024c1da4",
    ),
    (
        "fetch.data[0]",
        "6530a7de10417fc37648230654d349e9b35f2d1d8feb8d9ed33b0342d58cae9c",
    ),
    (
        "tokenize[0]",
        "4f9ad761e8d99aa1a287a4db480092bd42b3da5c6709e3ba9353bb90d84ba586",
    ),
    (
        "fetch.data[1]",
        "b3f0d0cfe5d6235da4a3bf1ec55fea43f8bff5eb3055d13958f12c2c1aef2af6",
    ),
    (
        "tokenize[1]",
        "b330499050964eb651db444b9e6c520626bf72a1763890c001288245209a09a2",
    ),
    (
        "pack",
        "94899e03e28c4f6d7d77830f5b03de99e794571c92eaca82341ed7ae22fa25de",
    ),
    (
        "train",
        "dcce4c6b5fa2a8074cfd3b2fb73c6037acdea61d5ed27cc919373152e2a363b3",
    ),
];

const PINNED_QLORA: &[(&str, &str)] = &[
    (
        "fetch.model",
        "4ee343abc45bb3fd48eaec659feb0ce90dc3cc1c263a8fb61d018b67024c1da4",
    ),
    (
        "fetch.data[0]",
        "6530a7de10417fc37648230654d349e9b35f2d1d8feb8d9ed33b0342d58cae9c",
    ),
    (
        "tokenize[0]",
        "4f9ad761e8d99aa1a287a4db480092bd42b3da5c6709e3ba9353bb90d84ba586",
    ),
    (
        "fetch.data[1]",
        "b3f0d0cfe5d6235da4a3bf1ec55fea43f8bff5eb3055d13958f12c2c1aef2af6",
    ),
    (
        "tokenize[1]",
        "b330499050964eb651db444b9e6c520626bf72a1763890c001288245209a09a2",
    ),
    (
        "pack",
        "94899e03e28c4f6d7d77830f5b03de99e794571c92eaca82341ed7ae22fa25de",
    ),
    (
        "quantize",
        "92d99aa8999b1b2b97185414883ca68252fb510b8f01eeb941d01d34cc0bcfc0",
    ),
    (
        "train",
        "c9d124af369e9aac18fac39d0f95b2e85150727b36b49685f6efd43942f419c4",
    ),
    (
        "merge",
        "6c4678b8d94a0ec12b2077e8df51445a94194604678ba9f270a751be80d7198e",
    ),
];

/// A DPO pipeline on preference pairs: the refscore stage and the loss in train's key.
fn dpo_project() -> Project {
    let p = Project::new("");
    std::fs::write(
        p.path("data/pairs.jsonl"),
        (0..6)
            .map(|i| {
                serde_json::json!({"prompt": format!("Q{i}"), "chosen": format!("yes {i}"), "rejected": "no"})
                    .to_string()
                    + "\n"
            })
            .collect::<String>(),
    )
    .unwrap();
    std::fs::write(
        &p.config,
        "base_model: ./model\ndatasets:\n  - path: data/pairs.jsonl\nrl: dpo\nrl_beta: 0.2\nadapter: lora\nlora_r: 4\nmax_steps: 2\nsequence_len: 128\ncache_dir: cache\n",
    )
    .unwrap();
    p
}

const PINNED_DPO: &[(&str, &str)] = &[
    (
        "fetch.model",
        "4ee343abc45bb3fd48eaec659feb0ce90dc3cc1c263a8fb61d018b67024c1da4",
    ),
    (
        "fetch.data[0]",
        "45b23f66eac2010f25696d9f07ac1aa26f8658c25da1e66909395617b23bcc69",
    ),
    (
        "tokenize[0]",
        "5218a42bcd068a5f7fe247fb6d7d77627dfea273becf384886a6afd9ed41c81d",
    ),
    (
        "pack",
        "1e29f2c754524efcdd425ce76ae73c6b26c8dcb847362a0e27d3e27ba7918c6f",
    ),
    (
        "refscore",
        "fbf850f35440a3a22348a87c73e0680e4b5942ae250df1f448214d8429938076",
    ),
    (
        "train",
        "ae5f4d6cc1cd5da3aacade7d2ee8248e923c332f6a19bb72e9f7596f2f69b88c",
    ),
];

fn check(got: &[(String, StageKind, String)], pinned: &[(&str, &str)], table: &str) {
    if std::env::var("KILN_PRINT_KEYS").is_ok() {
        println!("const {table}: &[(&str, &str)] = &[");
        for (name, _, key) in got {
            println!("    (\"{name}\", \"{key}\"),");
        }
        println!("];");
        return;
    }
    let names: Vec<&str> = got.iter().map(|(n, _, _)| n.as_str()).collect();
    let pinned_names: Vec<&str> = pinned.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names, pinned_names,
        "{table}: the plan's stages and the pinned ones differ; pin every stage"
    );
    for ((name, _, key), (_, pkey)) in got.iter().zip(pinned) {
        assert_eq!(
            key, pkey,
            "key of {name} changed: bump its stage VERSION and update {table}"
        );
    }
}

#[test]
fn stage_keys_are_pinned() {
    one_thread();
    let lora = keys(&lora_project());
    check(&lora, PINNED_LORA, "PINNED_LORA");
    let full = keys(&Project::new("max_steps: 2\n"));
    check(&full, PINNED_FULL, "PINNED_FULL");
    // QLoRA with 8-bit moments: the quantize stage, and the precision settings in train's key.
    let qlora = keys(&Project::new(
        "adapter: qlora\nload_in_4bit: true\noptimizer: adamw_bnb_8bit\nlora_r: 4\nmax_steps: 2\nmerge_lora: true\n",
    ));
    check(&qlora, PINNED_QLORA, "PINNED_QLORA");
    let dpo = keys(&dpo_project());
    check(&dpo, PINNED_DPO, "PINNED_DPO");
    // Every stage kind has a pinned key: a new kind fails here until a fixture plans it.
    let covered: BTreeSet<StageKind> = lora
        .iter()
        .chain(&full)
        .chain(&qlora)
        .chain(&dpo)
        .map(|(_, k, _)| *k)
        .collect();
    for kind in StageKind::ALL {
        assert!(
            covered.contains(kind),
            "no golden key for stage kind `{}`: add it to a fixture above and pin it",
            kind.as_str()
        );
    }
}

/// A setting the train stage reads changes its key and nothing upstream of it; a setting that
/// does not affect output (`logging_steps`) changes no key.
#[test]
fn keys_follow_exactly_what_each_stage_reads() {
    one_thread();
    let base = keys(&Project::new("adapter: lora\nmax_steps: 2\n"));
    let changed = |yaml: &str| -> Vec<String> {
        let other = keys(&Project::new(&format!(
            "adapter: lora\nmax_steps: 2\n{yaml}"
        )));
        assert_eq!(other.len(), base.len());
        base.iter()
            .zip(&other)
            .filter(|(a, b)| a.2 != b.2)
            .map(|(a, _)| a.0.clone())
            .collect()
    };
    assert_eq!(changed("learning_rate: 1e-4\n"), ["train"]);
    assert_eq!(changed("lora_dropout: 0.1\n"), ["train"]);
    assert_eq!(changed("save_total_limit: 2\n"), ["train"]);
    assert_eq!(changed("logging_steps: 5\n"), Vec::<String>::new());
    assert_eq!(changed("seed: 7\n"), ["pack", "train"]);
    assert_eq!(
        changed("sequence_len: 256\n"),
        ["tokenize[0]", "tokenize[1]", "pack"]
    );
    // Only the chat dataset renders a template.
    assert_eq!(
        changed("default_system_message: Be brief.\n"),
        ["tokenize[1]"]
    );
}

#[test]
fn keys_do_not_depend_on_where_the_project_lives() {
    one_thread();
    let a = Project::new("");
    let b = Project::new("");
    // Rename a dataset file in b: content-addressed keys do not care.
    std::fs::rename(
        b.path("data/chat.jsonl"),
        b.path("data/conversations.jsonl"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(&b.config)
        .unwrap()
        .replace("data/chat.jsonl", "data/conversations.jsonl");
    std::fs::write(&b.config, cfg).unwrap();
    assert_ne!(a.dir.path(), b.dir.path());
    assert_eq!(keys(&a), keys(&b));
}
