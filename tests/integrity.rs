//! Integrity end to end through the real binary: a corrupt "fresh" entry is caught when it is
//! consumed (published to output_dir, loaded for chat) and rebuilt; a no-op run leaves
//! output_dir untouched; two runs at once both succeed; a full disk is reported as a failed
//! write with the fix and leaves no half-written files.

mod common;
use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const TRAINED: &str = "adapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_linear: true\nmax_steps: 3\nwarmup_steps: 1\nseed: 3\nmerge_lora: true\noutput_dir: out\n";

fn trained_project() -> Project {
    let p = Project::new(TRAINED);
    write_tiny_model_dir(&p.path("model"), 5);
    p
}

/// Flips one byte of a file in place, keeping its size and mtime (only ctime can tell).
fn flip_byte_keep_mtime(path: &Path, at: usize) {
    use std::os::unix::fs::PermissionsExt;
    let md = std::fs::metadata(path).unwrap();
    let mtime = md.modified().unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x40;
    std::fs::write(path, &b).unwrap();
    std::fs::set_permissions(path, md.permissions()).unwrap();
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_eq!(std::fs::metadata(path).unwrap().modified().unwrap(), mtime);
}

fn entry(p: &Project, stage: &str) -> PathBuf {
    p.ws(&[]).entry_of(stage).unwrap()
}

/// Waits out the racily-clean window, so a check's stamp is remembered.
fn settle() {
    std::thread::sleep(std::time::Duration::from_millis(2100));
}

#[test]
fn a_no_op_run_leaves_output_dir_untouched_and_links_large_files() {
    let p = trained_project();
    let (code, out, err) = p.kiln(&["run", "kiln.yml"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let before = tree_files(&p.path("out"));
    assert!(
        before.contains_key("adapter_model.safetensors"),
        "{before:?}"
    );
    assert!(
        before.contains_key("merged/model.safetensors")
            || before.keys().any(|k| k.starts_with("merged/model"))
    );
    // Linked from the cache where the filesystem allows (same inode: no bytes written).
    let train = entry(&p, "train");
    let cached = std::fs::metadata(train.join("adapter_model.safetensors")).unwrap();
    let published = std::fs::metadata(p.path("out/adapter_model.safetensors")).unwrap();
    assert_eq!(
        cached.ino(),
        published.ino(),
        "the adapter in output_dir is a hard link (or reflink) to the read-only cache file"
    );
    assert!(cached.permissions().readonly(), "entry files are read-only");
    settle();
    for _ in 0..2 {
        let (code, out, err) = p.kiln(&["run", "kiln.yml"]);
        assert_eq!(code, Some(0), "{err}");
        assert!(out.contains("nothing to do"), "{out}");
        assert_eq!(
            tree_files(&p.path("out")),
            before,
            "a no-op run rewrote output_dir"
        );
    }
    assert!(
        !tree_files(&p.path("out"))
            .keys()
            .any(|k| k.contains("kiln-tmp")),
        "no temporary files left"
    );
}

#[test]
fn copies_are_kept_too_and_a_changed_output_file_is_put_back() {
    let p = trained_project();
    let run = |p: &Project| {
        let out = p
            .kiln_command(&["run", "kiln.yml"])
            .env("KILN_LINK", "copy")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    run(&p);
    let first = tree_files(&p.path("out"));
    let cached = std::fs::metadata(entry(&p, "train").join("adapter_model.safetensors")).unwrap();
    let published = std::fs::metadata(p.path("out/adapter_model.safetensors")).unwrap();
    assert_ne!(cached.ino(), published.ino(), "KILN_LINK=copy copies");
    assert!(
        !published.permissions().readonly(),
        "a copy is the user's to edit"
    );
    settle();
    run(&p);
    assert_eq!(
        tree_files(&p.path("out")),
        first,
        "unchanged copies are left alone"
    );
    // The user edits a published file: the next run puts the built one back.
    flip_byte_keep_mtime(&p.path("out/adapter_config.json"), 3);
    let out = run(&p);
    assert!(out.contains("nothing to do"), "{out}");
    assert_eq!(
        std::fs::read(p.path("out/adapter_config.json")).unwrap(),
        first["adapter_config.json"].3
    );
}

#[test]
fn a_corrupt_fresh_entry_is_caught_when_published_and_rebuilt() {
    let p = trained_project();
    let (code, _, err) = p.kiln(&["run", "kiln.yml"]);
    assert_eq!(code, Some(0), "{err}");
    let good = std::fs::read(p.path("out/adapter_model.safetensors")).unwrap();
    settle();
    // A no-op run verifies by stamp: nothing is re-read, nothing is reported.
    let (_, out, err) = p.kiln(&["run", "kiln.yml"]);
    assert!(
        out.contains("nothing to do") && !err.contains("corrupt"),
        "{out}{err}"
    );
    // A flipped byte with size and mtime kept as they were.
    let file = entry(&p, "train").join("adapter_model.safetensors");
    flip_byte_keep_mtime(&file, good.len() - 7);
    let (code, out, err) = p.kiln(&["run", "kiln.yml"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        err.contains("corrupt cache entry for train")
            && err.contains("adapter_model.safetensors: content changed")
            && err.contains("quarantined, rebuilding"),
        "{err}"
    );
    assert!(out.contains("built "), "{out}");
    assert_eq!(
        std::fs::read(p.path("out/adapter_model.safetensors")).unwrap(),
        good,
        "output_dir holds the rebuilt (identical) adapter, not the corrupt one"
    );
    assert!(p.ws(&[]).cache.verify(&entry_key(&p, "train")).is_empty());
    assert_eq!(
        std::fs::read_dir(p.path("cache/quarantine"))
            .unwrap()
            .count(),
        1,
        "the corrupt entry is kept aside for inspection"
    );
}

fn entry_key(p: &Project, stage: &str) -> String {
    status(&p.plan(&[]), stage).key.clone().unwrap()
}

#[test]
fn a_model_loaded_for_chat_is_verified_first() {
    let p = trained_project();
    let (code, _, err) = p.kiln(&["run", "kiln.yml"]);
    assert_eq!(code, Some(0), "{err}");
    let merged = entry(&p, "merge");
    let weights = std::fs::read_dir(&merged)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|f| f.extension().is_some_and(|x| x == "safetensors"))
        .unwrap();
    let n = std::fs::metadata(&weights).unwrap().len() as usize;
    flip_byte_keep_mtime(&weights, n - 11);
    // The CLI refuses, naming the stage, the file and the fix (exit 1, no panic).
    let (code, _, err) = p.kiln(&["inference", "kiln.yml", "--prompt", "hi"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("merge: its cache entry") && err.contains("content changed"),
        "{err}"
    );
    // Quarantined: a run rebuilds it.
    let (code, out, err) = p.kiln(&["run", "kiln.yml"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("built "), "{out}");
    assert!(p.ws(&[]).load_chat_model(None).is_ok());
    // The library call says the same.
    let weights = std::fs::read_dir(entry(&p, "merge"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|f| f.extension().is_some_and(|x| x == "safetensors"))
        .unwrap();
    flip_byte_keep_mtime(&weights, n - 11);
    let err = match p.ws(&[]).load_chat_model(None) {
        Ok(_) => panic!("a corrupt merged model was loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.starts_with("merge: its cache entry")
            && err.contains("content changed")
            && err.contains("quarantined")
            && err.contains("kiln run"),
        "{err}"
    );
}

#[test]
fn two_kiln_runs_at_once_both_succeed() {
    let p = trained_project();
    for round in 0..4 {
        if round > 0 {
            // Publishing into a fresh output_dir is where fixed temporary names collided.
            let _ = std::fs::remove_dir_all(p.path("out"));
        }
        let kids: Vec<_> = (0..2)
            .map(|_| {
                p.kiln_command(&["run", "kiln.yml"])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for k in kids {
            let o = k.wait_with_output().unwrap();
            assert!(
                o.status.success(),
                "round {round}: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let names: Vec<String> = tree_files(&p.path("out")).into_keys().collect();
        assert!(names.iter().any(|k| k == "adapter_model.safetensors"));
        assert!(!names.iter().any(|k| k.contains("kiln-tmp")), "{names:?}");
    }
}

/// A tmpfs of `kib` KiB over `dir` in a private mount namespace, running kiln there.
fn kiln_on_small_disk(p: &Project, dir: &str, kib: u64) -> Option<(i32, String, String)> {
    let probe = std::process::Command::new("unshare")
        .args(["-rm", "true"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: unshare -rm is not available here (no user namespaces)");
        return None;
    }
    std::fs::create_dir_all(p.path(dir)).unwrap();
    // Inside the namespace: run, then list what was left half-written on the small disk.
    let script = format!(
        "mount -t tmpfs -o size={kib}k tmpfs {dir} || exit 99; \"$0\" run kiln.yml; rc=$?; find {dir} -name '*kiln-tmp*' > leftovers.txt; exit $rc",
    );
    let out = std::process::Command::new("unshare")
        .args(["-rm", "sh", "-c", &script, env!("CARGO_BIN_EXE_kiln")])
        .current_dir(p.dir.path())
        .env("KILN_NUM_THREADS", "1")
        .env_remove("KILN_CACHE")
        .output()
        .unwrap();
    Some((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    ))
}

#[test]
fn a_full_disk_is_a_failed_write_with_the_fix_and_no_half_files() {
    // output_dir on a 16 KiB disk: the outputs do not fit.
    let p = trained_project();
    let Some((code, out, err)) = kiln_on_small_disk(&p, "out", 16) else {
        return;
    };
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("cannot write") && err.contains("no space left on the device"),
        "{err}"
    );
    assert!(!err.contains("cannot read"), "{err}");
    assert!(err.contains("kiln cache gc"), "says what to do: {err}");
    assert_eq!(
        std::fs::read_to_string(p.path("leftovers.txt")).unwrap(),
        "",
        "no temporary files left on the full disk"
    );
    // The finished stages are all still in the cache: a rerun with space only publishes.
    let (code, out, err) = p.kiln(&["run", "kiln.yml"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("nothing to do"), "{out}");

    // The cache itself on a small disk: the build fails saying so; nothing half-built is an
    // entry, and a rerun with space builds.
    let q = trained_project();
    let Some((code, out, err)) = kiln_on_small_disk(&q, "cache", 600) else {
        return;
    };
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("no space left on the device") && !err.contains("cannot read"),
        "{err}"
    );
    let (code, _, err) = q.kiln(&["run", "kiln.yml"]);
    assert_eq!(code, Some(0), "{err}");
}

/// Every published entry: key -> its manifest's digest; each must verify clean.
fn entries_verified(p: &Project) -> std::collections::BTreeMap<String, String> {
    let ws = p.ws(&[]);
    let mut out = std::collections::BTreeMap::new();
    for key in ws.cache.keys().unwrap() {
        let m = ws
            .cache
            .manifest(&key)
            .unwrap()
            .unwrap_or_else(|| panic!("{key}: an entry without a manifest is visible"));
        let damage = ws.cache.verify(&key);
        assert!(damage.is_empty(), "{key} ({}): {damage:?}", m.name);
        out.insert(key, m.digest);
    }
    out
}

/// kill -9 at spread-out points of a tiny pipeline (fetch … train with a checkpoint every step
/// … merge, publishing to output_dir), eight times over: no finished entry is ever lost or
/// half-visible, and the run that finally completes gives exactly the uninterrupted run's files.
#[test]
fn killed_at_random_points_the_pipeline_recovers_to_the_same_bytes() {
    let config = format!("{TRAINED}save_steps: 1\nmax_steps: 6\n");
    let reference = Project::new(&config);
    write_tiny_model_dir(&reference.path("model"), 5);
    let t = std::time::Instant::now();
    let (code, _, err) = reference.kiln(&["run", "kiln.yml"]);
    assert_eq!(code, Some(0), "{err}");
    let span = t.elapsed().as_millis() as u64;
    let want: std::collections::BTreeMap<String, Vec<u8>> = tree_files(&reference.path("out"))
        .into_iter()
        .map(|(k, v)| (k, v.3))
        .collect();

    let victim = Project::new(&config);
    write_tiny_model_dir(&victim.path("model"), 5);
    let mut seen = std::collections::BTreeMap::new();
    let mut kills = 0;
    // SplitMix64-spread kill times over [0, 1.1 × the uninterrupted run's time]. A try whose
    // kill point falls after the (partly cached) run has finished starts over; how many do
    // depends on the machine's load, so tries go on until eight kills landed mid-way (at most 30).
    let mut x: u64 = 0x5eed;
    let mut tries = 0;
    while kills < 8 && tries < 30 {
        tries += 1;
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let at = (z ^ (z >> 31)) % (span * 11 / 10 + 1);
        let mut child = victim
            .kiln_command(&["run", "kiln.yml"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(at));
        let finished = child.try_wait().unwrap().is_some();
        let _ = child.kill();
        let _ = child.wait();
        let now = entries_verified(&victim);
        for (k, d) in &seen {
            assert_eq!(
                now.get(k),
                Some(d),
                "finished entry {k} lost after a kill at {at} ms"
            );
        }
        seen = now;
        if finished {
            // Everything was built before this kill point: start over, so the next kill
            // lands in real work.
            let _ = std::fs::remove_dir_all(victim.path("cache"));
            let _ = std::fs::remove_dir_all(victim.path("out"));
            seen.clear();
        } else {
            kills += 1;
        }
    }
    assert!(
        kills >= 8,
        "only {kills} of {tries} runs were killed mid-way"
    );
    let (code, _, err) = victim.kiln(&["run", "kiln.yml"]);
    assert_eq!(code, Some(0), "{err}");
    let got: std::collections::BTreeMap<String, Vec<u8>> = tree_files(&victim.path("out"))
        .into_iter()
        .map(|(k, v)| (k, v.3))
        .collect();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "no leftovers, nothing missing"
    );
    for (name, bytes) in &want {
        assert!(
            got[name] == *bytes,
            "{name} differs from the uninterrupted run's"
        );
    }
    entries_verified(&victim);
}

/// `kiln validate` checks the config against a local model: sequence_len past the context,
/// LoRA target modules that match no layer, and a config.json that does not describe the
/// weights — each with the config line and the fix; `kiln run` refuses the same before any work.
#[test]
fn validate_checks_the_config_against_the_local_model() {
    let p = trained_project();
    let base = std::fs::read_to_string(&p.config).unwrap();
    let check = |extra: &str, want: &[&str]| {
        std::fs::write(&p.config, format!("{base}{extra}")).unwrap();
        let (code, out, err) = p.kiln(&["validate", "kiln.yml"]);
        assert_eq!(code, Some(2), "{extra}: {out}{err}");
        for w in want {
            assert!(err.contains(w), "{extra}: wanted {w:?} in {err}");
        }
        let (code, _, err2) = p.kiln(&["run", "kiln.yml"]);
        assert_eq!(code, Some(2), "{err2}");
        assert!(
            !p.path("cache/objects").exists()
                || std::fs::read_dir(p.path("cache/objects")).unwrap().count() == 0,
            "nothing built before the refusal"
        );
    };
    // sequence_len: 512 in the base config is overridden by the later key (a warning).
    check(
        "sequence_len: 4096\n",
        &["`sequence_len`: 4096 is longer than the model's context: max_position_embeddings is 1024", "lower sequence_len to 1024"],
    );
    check(
        "lora_target_modules: [q_proj, qproj]\nlora_target_linear: false\n",
        &[
            "`lora_target_modules`: `qproj` matches no layer",
            "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
        ],
    );
    std::fs::write(&p.config, &base).unwrap();
    let cfg_path = p.path("model/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["vocab_size"] = serde_json::json!(cfg["vocab_size"].as_u64().unwrap() + 7);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let (code, _, err) = p.kiln(&["validate", "kiln.yml"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("model.embed_tokens.weight is [")
            && err.contains("but config.json implies")
            && err.contains("vocab_size × hidden_size")
            && err.contains("does not describe these weights"),
        "{err}"
    );
}
