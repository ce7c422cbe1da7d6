//! Golden keys: each stage's key for a fixed fixture is pinned. A change here is deliberate: it
//! means the key's inputs or encoding changed, so bump that stage's VERSION and update the pin.

mod common;
use common::*;

fn keys(p: &Project) -> Vec<(String, String)> {
    p.run(&[]);
    p.plan(&[])
        .into_iter()
        .map(|s| (s.name, s.key.unwrap()))
        .collect()
}

const PINNED: &[(&str, &str)] = &[
    (
        "fetch.model",
        "94d3692e733a00438a70e0ebc381fbcf6d2a1264352856208af263e5ba6a8358",
    ),
    (
        "fetch.data[0]",
        "de88ee5da685103cf0769f283564c6fb9604a576e40fa4c2abda247718b46f57",
    ),
    (
        "tokenize[0]",
        "0e4a3d96b5b8f55bbd4cf518cb28e1da51f9a09f4c91a57974a2cdcc5ac2559f",
    ),
    (
        "fetch.data[1]",
        "59c62b9f7e2df7f517c7420ec15c5411dc777bf2343f38f0dfba58f29efc904e",
    ),
    (
        "tokenize[1]",
        "696ed8707e7110d4fd439a6673dc5238bc06751040d6bec5c7fc6363c1d9746e",
    ),
    (
        "pack",
        "228d061a7635bbd06a9ed557451f9b9b7068ff1c36c02c8e8df6c33dfcd07c13",
    ),
];

#[test]
fn stage_keys_are_pinned() {
    one_thread();
    let p = Project::new("seed: 42\n");
    let got = keys(&p);
    for ((name, key), (pname, pkey)) in got.iter().zip(PINNED) {
        assert_eq!(name, pname);
        if std::env::var("KILN_PRINT_KEYS").is_ok() {
            println!("    (\"{name}\", \"{key}\"),");
            continue;
        }
        assert_eq!(
            key, pkey,
            "key of {name} changed: bump its stage VERSION and update the pin"
        );
    }
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
