//! kiln.lock and `kiln run --locked`: the lock records every built stage; the check builds
//! nothing and fails, naming the stage and the changed input, when anything would rebuild.

mod common;
use common::*;

fn kiln(p: &Project, args: &[&str]) -> (Option<i32>, String, String) {
    p.kiln(args)
}

#[test]
fn locked_runs_pass_when_nothing_changed_and_name_what_did() {
    let p = Project::new("adapter: lora\nlora_r: 2\nlora_alpha: 4\nmax_steps: 1\n");
    write_tiny_model_dir(&p.path("model"), 17);
    // No lock yet: a clear error.
    let (code, _, stderr) = kiln(&p, &["run", "kiln.yml", "--locked"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("kiln.lock does not exist"), "{stderr}");

    let (code, stdout, stderr) = kiln(&p, &["run", "kiln.yml"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("updated"), "{stdout}");
    let lock_path = p.path("kiln.lock");
    let lock: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&lock_path).unwrap()).unwrap();
    let stages = lock["configs"]["kiln.yml"]["stages"].as_array().unwrap();
    let names: Vec<&str> = stages.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "fetch.model",
            "fetch.data[0]",
            "tokenize[0]",
            "fetch.data[1]",
            "tokenize[1]",
            "pack",
            "train"
        ]
    );
    let ws = p.ws(&[]);
    let train = stages.iter().find(|s| s["name"] == "train").unwrap();
    let key = train["key"].as_str().unwrap();
    assert_eq!(
        train["output"].as_str().unwrap(),
        ws.cache.manifest(key).unwrap().unwrap().digest
    );
    assert!(stages[1]["inputs"].to_string().contains("alpaca.jsonl"));
    let before = std::fs::read(&lock_path).unwrap();

    // Nothing changed: the lock is not rewritten, and --locked passes without building.
    let (code, stdout, _) = kiln(&p, &["run", "kiln.yml"]);
    assert_eq!(code, Some(0));
    assert!(!stdout.contains("updated"), "{stdout}");
    assert_eq!(std::fs::read(&lock_path).unwrap(), before);
    let (code, stdout, stderr) = kiln(&p, &["run", "kiln.yml", "--locked"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("locked: all 7 stages fresh"), "{stdout}");

    // One changed dataset byte: fails, naming the file; builds nothing.
    let data = p.path("data/alpaca.jsonl");
    let original = std::fs::read(&data).unwrap();
    let mut bytes = original.clone();
    bytes[20] = if bytes[20] == b'a' { b'b' } else { b'a' };
    std::fs::write(&data, bytes).unwrap();
    let entries = ws.cache.keys().unwrap().len();
    let (code, _, stderr) = kiln(&p, &["run", "kiln.yml", "--frozen"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("fetch.data[0]") && stderr.contains("alpaca.jsonl changed"),
        "{stderr}"
    );
    assert!(
        stderr.contains("tokenize[0]") && stderr.contains("train"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("fetch.model "),
        "unchanged stages are not listed: {stderr}"
    );
    assert_eq!(
        ws.cache.keys().unwrap().len(),
        entries,
        "--locked built something"
    );

    // A changed training key names the key.
    std::fs::write(&data, original).unwrap();
    let (code, _, stderr) = kiln(
        &p,
        &["run", "kiln.yml", "--locked", "--set", "learning_rate=1e-3"],
    );
    assert_eq!(code, Some(1));
    assert!(stderr.contains("learning_rate changed"), "{stderr}");
}

#[test]
fn verify_rebuilds_in_a_scratch_cache_and_reports_bit_for_bit() {
    let p = Project::new("adapter: lora\nlora_r: 2\nlora_alpha: 4\nmax_steps: 2\n");
    write_tiny_model_dir(&p.path("model"), 17);
    let (code, _, stderr) = kiln(&p, &["run", "kiln.yml"]);
    assert_eq!(code, Some(0), "{stderr}");
    let entries = p.ws(&[]).cache.keys().unwrap().len();

    let (code, stdout, stderr) = kiln(&p, &["verify", "kiln.yml", "--stages", "train"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("train: reproduced bit-for-bit"), "{stdout}");
    assert!(!stdout.contains("pack:"), "only the chosen stage: {stdout}");

    let (code, stdout, stderr) = kiln(&p, &["verify", "kiln.yml"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    for s in ["tokenize[0]", "tokenize[1]", "pack", "train"] {
        assert!(
            stdout.contains(&format!("{s}: reproduced bit-for-bit")),
            "{stdout}"
        );
    }
    // The main cache is untouched and the scratch cache is gone.
    assert_eq!(p.ws(&[]).cache.keys().unwrap().len(), entries);
    let tmp = p.path("cache/tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");

    // A lock that says otherwise: a mismatch, exit 1.
    let lp = p.path("kiln.lock");
    let mut lock: serde_json::Value = serde_json::from_slice(&std::fs::read(&lp).unwrap()).unwrap();
    for s in lock["configs"]["kiln.yml"]["stages"]
        .as_array_mut()
        .unwrap()
    {
        if s["name"] == "train" {
            s["output"] = serde_json::Value::String("0".repeat(64));
        }
    }
    std::fs::write(&lp, lock.to_string()).unwrap();
    let (code, stdout, _) = kiln(&p, &["verify", "kiln.yml", "--stages", "train"]);
    assert_eq!(code, Some(1));
    assert!(stdout.contains("train: MISMATCH"), "{stdout}");
}
