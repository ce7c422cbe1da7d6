//! Sweeps: variants share the data stages and the base model, build each training once, keep
//! their ids when values are added, and get their own output directories.

mod common;
use common::*;

const BASE: &str =
    "adapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_linear: true\nmax_steps: 2\nseed: 3\n";

fn project(sweep: &str) -> Project {
    let p = Project::new(&format!("{BASE}{sweep}"));
    write_tiny_model_dir(&p.path("model"), 17);
    p
}

fn count(names: &[String], prefix: &str) -> usize {
    names
        .iter()
        .filter(|n| *n == prefix || n.starts_with(&format!("{prefix}@")))
        .count()
}

#[test]
fn a_four_variant_sweep_builds_the_data_once_and_each_training_once() {
    one_thread();
    let p = project("sweep:\n  learning_rate: [1e-3, 2e-3]\n  lora_r: [2, 4]\n");
    let ws = p.ws(&[]);
    assert_eq!(ws.variants.len(), 4);
    let names: Vec<String> = ws.plan.stages.iter().map(|s| s.name.clone()).collect();
    assert_eq!(count(&names, "pack"), 1, "{names:?}");
    assert_eq!(count(&names, "tokenize[0]"), 1);
    assert_eq!(count(&names, "fetch.model"), 1);
    assert_eq!(count(&names, "train"), 4, "{names:?}");
    assert!(
        names.iter().all(|n| n != "train"),
        "train stages are per variant"
    );

    let (s, _) = p.run(&[]);
    assert_eq!(count(&s.built, "pack"), 1);
    assert_eq!(count(&s.built, "train"), 4, "{:?}", s.built);
    // Each variant's adapter in its own output_dir/<id>/, trained with its own values.
    let ws = p.ws(&[]);
    ws.materialize_outputs().unwrap();
    for v in &ws.variants {
        let id = v.id.clone().unwrap();
        let cfg: serde_json::Value = serde_json::from_slice(
            &std::fs::read(p.path(&format!("outputs/{id}/adapter_config.json"))).unwrap(),
        )
        .unwrap();
        let r = if v.label.contains("lora_r=2") { 2 } else { 4 };
        assert_eq!(cfg["r"], r, "{}", v.label);
        assert_eq!(
            v.settings.output_dir,
            std::path::PathBuf::from(format!("./outputs/{id}"))
        );
    }
    // Nothing changed: nothing to build.
    let (s, _) = p.run(&[]);
    assert!(s.built.is_empty(), "{:?}", s.built);

    // Adding a value: old variants keep their ids; only the new ones train.
    let old: Vec<String> = ws.variants.iter().map(|v| v.id.clone().unwrap()).collect();
    let cfg = std::fs::read_to_string(&p.config)
        .unwrap()
        .replace("[1e-3, 2e-3]", "[1e-3, 2e-3, 5e-3]");
    std::fs::write(&p.config, cfg).unwrap();
    let ws = p.ws(&[]);
    assert_eq!(ws.variants.len(), 6);
    let ids: Vec<String> = ws.variants.iter().map(|v| v.id.clone().unwrap()).collect();
    assert!(old.iter().all(|o| ids.contains(o)), "{old:?} vs {ids:?}");
    let (s, _) = p.run(&[]);
    assert_eq!(count(&s.built, "train"), 2, "{:?}", s.built);
    assert!(
        s.built.iter().all(|n| n.starts_with("train@")),
        "{:?}",
        s.built
    );
}

#[test]
fn paired_values_change_together_and_a_data_key_splits_the_data_stages() {
    let p = project(
        "sweep:\n  sequence_len: [256, 512]\n  _:\n    - {lora_r: 2, lora_alpha: 4}\n    - {lora_r: 8, lora_alpha: 16}\n",
    );
    let ws = p.ws(&[]);
    let labels: Vec<&str> = ws.variants.iter().map(|v| v.label.as_str()).collect();
    assert_eq!(labels.len(), 4);
    assert!(
        labels.contains(&"lora_alpha=16 lora_r=8 sequence_len=256"),
        "{labels:?}"
    );
    assert!(!labels.iter().any(|l| l.contains("lora_alpha=16 lora_r=2")));
    let names: Vec<String> = ws.plan.stages.iter().map(|s| s.name.clone()).collect();
    // sequence_len splits tokenize/pack into two; the fetches stay shared.
    assert_eq!(count(&names, "tokenize[0]"), 2, "{names:?}");
    assert_eq!(count(&names, "pack"), 2);
    assert_eq!(count(&names, "fetch.model"), 1);
    assert_eq!(count(&names, "train"), 4);
}

#[test]
fn sweep_errors_name_the_key_and_single_config_commands_refuse_a_sweep() {
    let p = project("sweep:\n  learning_rate: 1e-3\n");
    let e = kiln::workspace::Workspace::open(&p.config, &[])
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("sweep.learning_rate") && e.contains("list"),
        "{e}"
    );

    let p = project("sweep:\n  learning_rate: [1e-3, 2e-3]\n  lora_dropot: [0.0]\n");
    let e = kiln::workspace::Workspace::open(&p.config, &[])
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("lora_dropot") && e.contains("did you mean"),
        "{e}"
    );

    let p = project("sweep:\n  learning_rate: [1e-3, 2e-3]\n");
    let e = kiln::config::load(&p.config, &[])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("sweep"), "{e}");
}

#[test]
fn kiln_compare_tabulates_the_variants_sorted_by_a_metric() {
    let p = project("eval_steps: 1\nsweep:\n  learning_rate: [1e-3, 5e-2]\n  lora_r: [2, 4]\n");
    let kiln = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .current_dir(p.dir.path())
            .env("KILN_NUM_THREADS", "1")
            .env_remove("KILN_CACHE")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    // Before building: every variant listed, none built.
    let table = kiln(&["compare", "kiln.yml"]);
    assert_eq!(table.matches("(not built)").count(), 4, "{table}");
    kiln(&["run", "kiln.yml"]);
    let csv = kiln(&["compare", "kiln.yml", "--sort", "final_loss", "--csv"]);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "variant,learning_rate,lora_r,final_loss,best_eval_loss,eval_perplexity,tokens_per_s,train_seconds"
    );
    assert_eq!(lines.len(), 5, "{csv}");
    let losses: Vec<f64> = lines[1..]
        .iter()
        .map(|l| l.split(',').nth(3).unwrap().parse().unwrap())
        .collect();
    assert!(
        losses.windows(2).all(|w| w[0] <= w[1]),
        "not sorted: {losses:?}"
    );
    for l in &lines[1..] {
        let cells: Vec<&str> = l.split(',').collect();
        let eval: f64 = cells[4].parse().unwrap();
        let ppl: f64 = cells[5].parse().unwrap();
        assert!((eval.exp() - ppl).abs() / ppl < 1e-3, "{l}");
        assert!(cells[6].parse::<f64>().unwrap() > 0.0, "{l}");
    }
    let json = kiln(&["compare", "kiln.yml", "--json"]);
    let first: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert!(
        first["best_eval_loss"].is_f64() && first["learning_rate"].is_string(),
        "{first}"
    );
}

#[test]
fn keep_going_finishes_the_other_variants_and_a_rerun_retries_only_the_failed_one() {
    let p = project("max_grad_norm: 0\nsweep:\n  learning_rate: [1e-3, 1e38]\n");
    let kiln = |args: &[&str]| p.kiln(args);
    let ws = p.ws(&[]);
    let good = ws
        .variants
        .iter()
        .find(|v| v.label.contains("0.001"))
        .unwrap();
    let bad = ws
        .variants
        .iter()
        .find(|v| !v.label.contains("0.001"))
        .unwrap();
    let (good_train, bad_train) = (
        good.stage("train").unwrap().to_string(),
        bad.stage("train").unwrap().to_string(),
    );
    // Without --keep-going the first failure stops the run (exit 1).
    let (code, out, stderr) = kiln(&["run", "kiln.yml", "--keep-going"]);
    assert_eq!(code, Some(1), "{out}\n{stderr}");
    assert!(stderr.contains(&format!("FAILED {bad_train}")), "{stderr}");
    assert!(stderr.contains("loss became"), "{stderr}");
    assert!(out.contains(&format!("built  {good_train}")), "{out}");
    assert!(p.ws(&[]).entry_of(&good_train).is_ok());
    // A rerun retries only the failed variant.
    let (code, out, _) = kiln(&["run", "kiln.yml", "--keep-going"]);
    assert_eq!(code, Some(1));
    assert!(out.contains(&format!("build  {bad_train}")), "{out}");
    assert!(!out.contains(&format!("build  {good_train}")), "{out}");
}

#[test]
fn kiln_plot_draws_each_variants_curves_into_an_svg_and_a_png() {
    let p = project("eval_steps: 1\nsweep:\n  learning_rate: [1e-3, 5e-3]\n");
    let kiln = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .current_dir(p.dir.path())
            .env("KILN_NUM_THREADS", "1")
            .env_remove("KILN_CACHE")
            .output()
            .unwrap()
    };
    let out = kiln(&["plot", "kiln.yml", "-o", "c.svg"]);
    assert!(!out.status.success(), "nothing built yet");
    assert!(kiln(&["run", "kiln.yml"]).status.success());
    let out = kiln(&["plot", "kiln.yml", "-o", "c.svg"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svg = std::fs::read_to_string(p.path("c.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    // Two variants: a train polyline and an eval polyline each, labelled by their values.
    assert_eq!(svg.matches("<polyline").count(), 4, "{svg}");
    assert_eq!(svg.matches("stroke-dasharray").count(), 2);
    assert!(svg.contains("learning_rate=0.001") && svg.contains("learning_rate=0.005"));
    // PNG: the same chart rasterized (2x), a valid image with the curves' colours in it.
    let out = kiln(&["plot", "kiln.yml", "-o", "c.png"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(p.path("c.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let (w, h) = (
        u32::from_be_bytes(png[16..20].try_into().unwrap()),
        u32::from_be_bytes(png[20..24].try_into().unwrap()),
    );
    assert_eq!((w, h), (1800, 1040));
    assert!(!p.path("c.png.kiln-tmp").exists());
    let img = resvg::tiny_skia::Pixmap::decode_png(&png).unwrap();
    let has = |rgb: (u8, u8, u8), x0: u32, x1: u32| {
        img.pixels().iter().enumerate().any(|(i, px)| {
            let x = i as u32 % w;
            (x0..x1).contains(&x) && (px.red(), px.green(), px.blue()) == rgb
        })
    };
    // Both variants' curves are drawn in the plot area, and the legend has text in it.
    assert!(has((0x1f, 0x77, 0xb4), 140, 1280), "first variant's colour");
    assert!(
        has((0xd6, 0x27, 0x28), 140, 1280),
        "second variant's colour"
    );
    assert!(has((0, 0, 0), 1340, 1800), "legend text was rendered");
    let out = kiln(&["plot", "kiln.yml", "-o", "c.jpg"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(".svg or .png"));
}

#[test]
fn variant_picks_one_point_of_a_sweep_for_single_model_commands() {
    let p = project("sweep:\n  learning_rate: [1e-3, 5e-3]\n");
    let kiln = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .current_dir(p.dir.path())
            .env("KILN_NUM_THREADS", "1")
            .env_remove("KILN_CACHE")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let ws = p.ws(&[]);
    let v = ws
        .variants
        .iter()
        .find(|v| v.label.contains("0.005"))
        .unwrap();
    let id = v.id.clone().unwrap();
    let train = v.stage("train").unwrap().to_string();
    let (ok, _, stderr) = kiln(&["inference", "kiln.yml", "--prompt", "hi"]);
    assert!(!ok && stderr.contains("--variant"), "{stderr}");
    assert!(kiln(&["run", "kiln.yml"]).0);
    // The variant's stages are the sweep's: nothing to build, the same train entry.
    let (ok, out, stderr) = kiln(&["train", "kiln.yml", "--variant", &id[..4]]);
    assert!(ok, "{stderr}");
    assert!(out.contains("nothing to do"), "{out}");
    let narrowed = kiln::workspace::Workspace::open(
        &p.config,
        &[
            "learning_rate=0.005".into(),
            format!("output_dir=./outputs/{id}"),
            "sweep=null".into(),
        ],
    )
    .unwrap();
    assert_eq!(
        narrowed.entry_of("train").unwrap(),
        ws.entry_of(&train).unwrap()
    );
    let (ok, _, stderr) = kiln(&[
        "inference",
        "kiln.yml",
        "--variant",
        &id,
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
    ]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = kiln(&[
        "inference",
        "kiln.yml",
        "--variant",
        "zzzz",
        "--prompt",
        "hi",
    ]);
    assert!(!ok && stderr.contains("0 variants match"), "{stderr}");
}

#[test]
fn jobs_build_independent_stages_at_once_one_train_at_a_time_with_the_same_bytes() {
    let sweep = "sweep:\n  learning_rate: [1e-3, 5e-3]\n";
    let p = project(sweep);
    let q = project(sweep);
    let run = |p: &Project, extra: &[&str]| {
        let mut args = vec!["run", "kiln.yml"];
        args.extend_from_slice(extra);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(&args)
            .current_dir(p.dir.path())
            .env("KILN_NUM_THREADS", "1")
            .env_remove("KILN_CACHE")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let out = run(&p, &["--jobs", "4"]);
    let pos = |needle: &str| {
        out.find(needle)
            .unwrap_or_else(|| panic!("no {needle:?} in\n{out}"))
    };
    // The two datasets tokenize at the same time…
    assert!(
        pos("build  tokenize[1]") < pos("built  tokenize[0]"),
        "{out}"
    );
    // …but the two trainings never overlap.
    let ws = p.ws(&[]);
    let trains: Vec<String> = ws
        .variants
        .iter()
        .map(|v| v.stage("train").unwrap().to_string())
        .collect();
    let (a, b) = if pos(&format!("build  {}", trains[0])) < pos(&format!("build  {}", trains[1])) {
        (&trains[0], &trains[1])
    } else {
        (&trains[1], &trains[0])
    };
    assert!(
        pos(&format!("built  {a}")) < pos(&format!("build  {b}")),
        "{out}"
    );
    // Same bytes as one at a time.
    run(&q, &[]);
    let qs = q.ws(&[]);
    for t in &trains {
        assert_eq!(
            std::fs::read(ws.entry_of(t).unwrap().join("adapter_model.safetensors")).unwrap(),
            std::fs::read(qs.entry_of(t).unwrap().join("adapter_model.safetensors")).unwrap()
        );
    }
    assert!(run(&p, &["-j", "4"]).contains("nothing to do"));
    // Runs record what they covered.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["runs", "--dir", "cache", "--json"])
        .current_dir(p.dir.path())
        .output()
        .unwrap();
    let first: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(first["variant"], "sweep of 2 variants");
}
