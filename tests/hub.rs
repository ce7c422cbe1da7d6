//! The hub path end to end against a local server that speaks the Hugging Face Hub's HTTP API on
//! 127.0.0.1 (repo info, `resolve/` with Range, etag and x-repo-commit headers). One test, since
//! HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE are process-wide.

mod common;
use common::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
struct Repo {
    commit: String,
    files: HashMap<String, Vec<u8>>,
}

#[derive(Clone, Default)]
struct Hub {
    repos: Arc<Mutex<HashMap<String, Repo>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

fn respond(
    stream: &mut std::net::TcpStream,
    status: &str,
    headers: &[(String, String)],
    body: &[u8],
) {
    let mut h = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str("\r\n");
    let _ = stream.write_all(h.as_bytes());
    let _ = stream.write_all(body);
}

impl Hub {
    fn serve(&self) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let hub = self.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut first = String::new();
                if reader.read_line(&mut first).is_err() {
                    continue;
                }
                let mut range = None;
                loop {
                    let mut l = String::new();
                    if reader.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
                        break;
                    }
                    if let Some(v) = l.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        range = Some(v.trim().to_string());
                    }
                }
                let path = first.split_whitespace().nth(1).unwrap_or("/").to_string();
                hub.requests.lock().unwrap().push(path.clone());
                hub.handle(&mut stream, &path, range);
            }
        });
        format!("http://{addr}")
    }

    fn handle(&self, stream: &mut std::net::TcpStream, path: &str, range: Option<String>) {
        let repos = self.repos.lock().unwrap().clone();
        // /api/{models|datasets}/{org}/{name}/revision/{rev}
        if let Some(rest) = path.strip_prefix("/api/") {
            let parts: Vec<&str> = rest.split('/').collect();
            if parts.len() == 5 && parts[3] == "revision" {
                let id = format!(
                    "{}{}/{}",
                    if parts[0] == "datasets" {
                        "datasets/"
                    } else {
                        ""
                    },
                    parts[1],
                    parts[2]
                );
                if let Some(r) = repos.get(&id) {
                    let siblings: Vec<serde_json::Value> = r
                        .files
                        .keys()
                        .map(|f| serde_json::json!({"rfilename": f}))
                        .collect();
                    let body =
                        serde_json::json!({"sha": r.commit, "siblings": siblings}).to_string();
                    return respond(
                        stream,
                        "200 OK",
                        &[("Content-Type".into(), "application/json".into())],
                        body.as_bytes(),
                    );
                }
            }
            return respond(
                stream,
                "404 Not Found",
                &[],
                b"{\"error\":\"Repository not found\"}",
            );
        }
        // /{datasets/}{org}/{name}/resolve/{rev}/{file...}
        let p = path.trim_start_matches('/');
        let (id, rest) = if let Some(r) = p.strip_prefix("datasets/") {
            let mut it = r.splitn(3, '/');
            (
                format!(
                    "datasets/{}/{}",
                    it.next().unwrap_or(""),
                    it.next().unwrap_or("")
                ),
                it.next().unwrap_or("").to_string(),
            )
        } else {
            let mut it = p.splitn(3, '/');
            (
                format!("{}/{}", it.next().unwrap_or(""), it.next().unwrap_or("")),
                it.next().unwrap_or("").to_string(),
            )
        };
        let Some(r) = repos.get(&id) else {
            return respond(stream, "404 Not Found", &[], b"no repo");
        };
        let Some(after) = rest.strip_prefix("resolve/") else {
            return respond(stream, "404 Not Found", &[], b"bad path");
        };
        let (rev, file) = after.split_once('/').unwrap_or((after, ""));
        if rev != "main" && rev != r.commit {
            return respond(stream, "404 Not Found", &[], b"no revision");
        }
        let Some(body) = r.files.get(file) else {
            return respond(stream, "404 Not Found", &[], b"no file");
        };
        let etag = format!("\"{}\"", blake3::hash(body).to_hex());
        let headers = |start: usize, end: usize| {
            vec![
                ("ETag".to_string(), etag.clone()),
                ("X-Repo-Commit".to_string(), r.commit.clone()),
                (
                    "Content-Range".to_string(),
                    format!("bytes {start}-{end}/{}", body.len()),
                ),
            ]
        };
        match range.as_deref() {
            Some("0-0") => respond(
                stream,
                "206 Partial Content",
                &headers(0, 0),
                &body[..1.min(body.len())],
            ),
            Some(r) => {
                let start: usize = r.trim_end_matches('-').parse().unwrap_or(0);
                respond(
                    stream,
                    "206 Partial Content",
                    &headers(start, body.len().saturating_sub(1)),
                    &body[start..],
                )
            }
            None => respond(
                stream,
                "200 OK",
                &headers(0, body.len().saturating_sub(1)),
                body,
            ),
        }
    }
}

#[test]
fn hub_model_and_dataset_fetch_pin_commits_and_work_offline() {
    one_thread();
    let tok = tempfile::tempdir().unwrap();
    write_model_dir(tok.path(), Some(CHATML));
    let mut model = Repo {
        commit: "a".repeat(40),
        ..Default::default()
    };
    for f in ["tokenizer.json", "tokenizer_config.json", "config.json"] {
        model
            .files
            .insert(f.into(), std::fs::read(tok.path().join(f)).unwrap());
    }
    model.files.insert("README.md".into(), b"# tiny".to_vec());
    let mut data = Repo {
        commit: "b".repeat(40),
        ..Default::default()
    };
    data.files
        .insert("data/train.jsonl".into(), alpaca_rows(12).into_bytes());
    data.files
        .insert("data/test.jsonl".into(), alpaca_rows(5).into_bytes());
    data.files
        .insert("extra/train.jsonl".into(), alpaca_rows(3).into_bytes());
    data.files.insert("README.md".into(), b"# qa".to_vec());
    let hub = Hub::default();
    hub.repos
        .lock()
        .unwrap()
        .insert("kiln-test/tiny".into(), model);
    hub.repos
        .lock()
        .unwrap()
        .insert("datasets/kiln-test/qa".into(), data);
    let endpoint = hub.serve();
    let hf_home = tempfile::tempdir().unwrap();
    std::env::set_var("HF_ENDPOINT", &endpoint);
    std::env::set_var("HF_HOME", hf_home.path());
    std::env::remove_var("HF_HUB_OFFLINE");

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("kiln.yml");
    std::fs::write(&cfg, "base_model: kiln-test/tiny\ndatasets:\n  - path: kiln-test/qa\n    type: alpaca\n    split: train\nsequence_len: 512\ncache_dir: cache\n").unwrap();
    let ws = kiln::workspace::Workspace::open(&cfg, &[]).unwrap();
    // The hub model here is a tokenizer only: build the data stages.
    let data_only = kiln::scheduler::RunOptions {
        targets: vec!["pack".into()],
        ..Default::default()
    };
    let s = ws.scheduler().run(&data_only, &mut |_| {}).unwrap();
    assert_eq!(
        s.built,
        vec!["fetch.model", "fetch.data[0]", "tokenize[0]", "pack"]
    );
    // The resolved commit is pinned in the stage record.
    let plan = ws.scheduler().assess().unwrap();
    let key = status(&plan, "fetch.model").key.clone().unwrap();
    let (rec, ..) = ws.index.stage(&key).unwrap().unwrap();
    assert_eq!(
        rec.inputs["hub:kiln-test/tiny@main"]["digest"],
        "a".repeat(40)
    );
    let m = ws.cache.manifest(&key).unwrap().unwrap();
    let names: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        names,
        vec!["config.json", "tokenizer.json", "tokenizer_config.json"],
        "README is not a model file"
    );
    // `split: train` picks the train files only (12 + 3 rows), not data/test.jsonl.
    assert_eq!(ws.pack_stats().unwrap().datasets[0].1.records, 15);
    let by_name =
        kiln::workspace::Workspace::open(&cfg, &["datasets[0].name=extra".into()]).unwrap();
    by_name.scheduler().run(&data_only, &mut |_| {}).unwrap();
    assert_eq!(
        by_name.pack_stats().unwrap().datasets[0].1.records,
        3,
        "`name: extra` picks extra/"
    );
    drop(by_name);
    drop(ws);

    // Offline: resolution comes from the HF cache, no request reaches the server.
    let before = hub.requests.lock().unwrap().len();
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let plan = kiln::workspace::Workspace::open(&cfg, &[])
        .unwrap()
        .scheduler()
        .assess()
        .unwrap();
    assert!(stale_data_names(&plan).is_empty(), "{plan:?}");
    assert_eq!(hub.requests.lock().unwrap().len(), before);
    std::env::remove_var("HF_HUB_OFFLINE");

    // A new commit upstream: the plan names it.
    hub.repos
        .lock()
        .unwrap()
        .get_mut("kiln-test/tiny")
        .unwrap()
        .commit = "c".repeat(40);
    let plan = kiln::workspace::Workspace::open(&cfg, &[])
        .unwrap()
        .scheduler()
        .assess()
        .unwrap();
    let st = status(&plan, "fetch.model");
    assert_eq!(
        st.reason.as_deref(),
        Some(
            format!(
                "hub revision hub:kiln-test/tiny@main moved to commit {}",
                "c".repeat(40)
            )
            .as_str()
        )
    );
    // A missing repo is a clear error.
    let bad = dir.path().join("bad.yml");
    std::fs::write(&bad, "base_model: kiln-test/missing\ndatasets:\n  - path: kiln-test/qa\n    type: alpaca\ncache_dir: cache\n").unwrap();
    let err = kiln::workspace::Workspace::open(&bad, &[])
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("kiln-test/missing@main") && err.contains("cannot resolve revision"),
        "{err}"
    );
}
