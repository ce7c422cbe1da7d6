//! Lineage and `kiln why`: an exported GGUF traces back to its data files and parameters, a
//! tokenized dataset lists everything built from it, and a stale stage's reason is traced to
//! the changed input.

mod common;
use common::*;

fn kiln(p: &Project, args: &[&str]) -> (Option<i32>, String, String) {
    p.kiln(args)
}

fn names(n: &serde_json::Value, out: &mut Vec<String>) {
    out.push(n["name"].as_str().unwrap().to_string());
    for u in n["upstream"].as_array().unwrap() {
        names(u, out);
    }
}

#[test]
fn an_export_traces_back_to_its_data_and_a_dataset_lists_its_users() {
    let p = Project::new(
        "adapter: lora\nlora_r: 2\nlora_alpha: 4\nmax_steps: 1\nmerge_lora: true\nexport:\n  - {format: gguf, quant: q8_0}\n",
    );
    write_tiny_model_dir(&p.path("model"), 17);
    let (code, _, stderr) = kiln(&p, &["run", "kiln.yml"]);
    assert_eq!(code, Some(0), "{stderr}");
    let gguf = "outputs/export/gguf.q8_0/model-q8_0.gguf";
    let (code, text, stderr) = kiln(&p, &["lineage", gguf, "--dir", "cache"]);
    assert_eq!(code, Some(0), "{stderr}");
    for want in [
        "export.gguf.q8_0",
        "merge",
        "train",
        "pack",
        "tokenize[0]",
        "fetch.data[0]",
        "alpaca.jsonl",
        "learning_rate=0.0002",
    ] {
        assert!(text.contains(want), "missing {want}:\n{text}");
    }
    let (_, json, _) = kiln(&p, &["lineage", gguf, "--dir", "cache", "--json"]);
    let tree: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mut all = Vec::new();
    names(&tree, &mut all);
    assert_eq!(all[0], "export.gguf.q8_0");
    assert!(all.contains(&"fetch.model".to_string()) && all.contains(&"fetch.data[1]".to_string()));

    // The artifact carries its key: in lineage.json and in the GGUF metadata.
    let key = tree["key"].as_str().unwrap();
    let lj: serde_json::Value = serde_json::from_slice(
        &std::fs::read(p.path("outputs/export/gguf.q8_0/lineage.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(lj["key"], key);
    let mut f = std::fs::File::open(p.path(gguf)).unwrap();
    let c = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    assert_eq!(c.metadata["kiln.key"].to_string().unwrap(), key);
    // …and the key alone resolves too.
    let (code, by_key, _) = kiln(&p, &["lineage", &key[..10], "--dir", "cache"]);
    assert_eq!(code, Some(0));
    assert_eq!(by_key, text);

    // Reverse: everything built from the first tokenized dataset, with the config using it.
    let ws = p.ws(&[]);
    let tok = ws.entry_of("tokenize[0]").unwrap();
    let tok_key = tok.file_name().unwrap().to_str().unwrap().to_string();
    let (code, uses, _) = kiln(&p, &["lineage", &tok_key, "--used-by", "--dir", "cache"]);
    assert_eq!(code, Some(0));
    for want in ["pack", "train", "merge", "export.gguf.q8_0", "kiln.yml"] {
        assert!(uses.contains(want), "missing {want}:\n{uses}");
    }
    assert!(!uses.contains("tokenize[1]"), "{uses}");

    let (code, _, stderr) = kiln(&p, &["lineage", "kiln.yml", "--dir", "cache"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("no cache entry holds"), "{stderr}");
}

#[test]
fn why_traces_a_stale_stage_to_the_changed_file() {
    let p = Project::new("adapter: lora\nlora_r: 2\nlora_alpha: 4\nmax_steps: 1\n");
    write_tiny_model_dir(&p.path("model"), 17);
    let (code, _, stderr) = kiln(&p, &["run", "kiln.yml"]);
    assert_eq!(code, Some(0), "{stderr}");
    let (_, fresh, _) = kiln(&p, &["why", "train", "kiln.yml"]);
    assert!(fresh.contains("train is fresh"), "{fresh}");
    let data = p.path("data/chat.jsonl");
    let mut bytes = std::fs::read(&data).unwrap();
    bytes.extend_from_slice(b"\n");
    std::fs::write(&data, bytes).unwrap();
    let (code, out, stderr) = kiln(&p, &["why", "train", "kiln.yml"]);
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "train: waiting on pack", "{out}");
    assert!(
        lines.last().unwrap().contains("fetch.data[1]: input file"),
        "{out}"
    );
    assert!(
        lines.last().unwrap().contains("chat.jsonl changed"),
        "{out}"
    );
}
