//! `kiln serve` as a real process on a tiny trained model: the OpenAI-compatible API with a raw
//! HTTP client (plain and streamed answers, errors, concurrent requests, no files exposed), and
//! the chat page in a real headless browser.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

struct Server {
    child: Child,
    addr: String,
    _p: Project,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> Server {
    let p = Project::new(
        "adapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_linear: true\nmax_steps: 2\ngradio_title: Tiny <test> chat\n",
    );
    write_tiny_model_dir(&p.path("model"), 17);
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let st = Command::new(kiln)
        .args(["train", "kiln.yml"])
        .current_dir(p.dir.path())
        .env("KILN_NUM_THREADS", "1")
        .env_remove("KILN_CACHE")
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let mut child = Command::new(kiln)
        .args([
            "serve",
            "kiln.yml",
            "--port",
            "0",
            "--max-new-tokens",
            "8",
            "--max-body-bytes",
            "4000",
        ])
        .current_dir(p.dir.path())
        .env("KILN_NUM_THREADS", "1")
        .env_remove("KILN_CACHE")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    assert!(
        addr.starts_with("127.0.0.1:"),
        "binds to localhost by default: {addr}"
    );
    Server { child, addr, _p: p }
}

/// One request over a fresh connection; returns (status, head, body).
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    // Undo chunked transfer encoding (tiny_http uses it for larger bodies).
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((len, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            rest = &tail[n + 2..];
        }
        out
    } else {
        body.to_string()
    };
    (status, head.to_string(), body)
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s:?}"))
}

#[test]
fn openai_api_answers_plain_and_streamed_and_rejects_bad_requests() {
    let srv = start();
    let a = srv.addr.as_str();

    let (st, _, body) = http(a, "GET", "/v1/models", "");
    assert_eq!(st, 200);
    assert_eq!(json(&body)["data"][0]["object"], "model");

    let req = r#"{"model": "x", "messages": [{"role": "user", "content": "the answer"}]}"#;
    let (st, head, body) = http(a, "POST", "/v1/chat/completions", req);
    assert_eq!(st, 200, "{body}");
    assert!(head.to_ascii_lowercase().contains("application/json"));
    let v = json(&body);
    assert_eq!(v["object"], "chat.completion");
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 3);

    // Streamed: the same greedy answer, as server-sent events ending in [DONE].
    let sreq = r#"{"messages": [{"role": "user", "content": "the answer"}], "stream": true}"#;
    let (st, head, body) = http(a, "POST", "/v1/chat/completions", sreq);
    assert_eq!(st, 200);
    assert!(head.contains("text/event-stream"), "{head}");
    let events: Vec<&str> = body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let mut streamed = String::new();
    for e in &events[..events.len() - 1] {
        let v = json(e);
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            streamed.push_str(t);
        }
    }
    assert_eq!(streamed, content);
    let last = json(events[events.len() - 2]);
    assert!(last["choices"][0]["finish_reason"].is_string());

    // Errors: JSON bodies with a message, never a crash.
    for (method, path, body, want) in [
        ("POST", "/v1/chat/completions", "{not json", 400),
        ("POST", "/v1/chat/completions", r#"{"messages": []}"#, 400),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"messages": [{"role": "robot", "content": "x"}]}"#,
            400,
        ),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}"#,
            400,
        ),
        ("GET", "/v1/chat/completions", "", 405),
        ("GET", "/../Cargo.toml", "", 404),
        ("GET", "/kiln.yml", "", 404),
        ("GET", "/model/model.safetensors", "", 404),
    ] {
        let (st, _, b) = http(a, method, path, body);
        assert_eq!(st, want, "{method} {path} {body}: {b}");
        assert!(json(&b)["error"]["message"].is_string(), "{b}");
    }
    let big = format!(
        r#"{{"messages": [{{"role": "user", "content": "{}"}}]}}"#,
        "x".repeat(5000)
    );
    let (st, _, b) = http(a, "POST", "/v1/chat/completions", &big);
    assert_eq!(st, 413, "{b}");

    // Concurrent requests are queued and all answered.
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let a = srv.addr.clone();
            std::thread::spawn(move || {
                let r = format!(
                    r#"{{"messages": [{{"role": "user", "content": "question {i}"}}], "max_tokens": 4, "stream": {}}}"#,
                    i % 2 == 0
                );
                http(&a, "POST", "/v1/chat/completions", &r).0
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 200);
    }
    // Still alive.
    assert_eq!(http(a, "GET", "/health", "").0, 200);

    let (st, _, page) = http(a, "GET", "/", "");
    assert_eq!(st, 200);
    assert!(page.contains("Tiny &lt;test&gt; chat"), "title escaped");
}

/// Chromium driven over its DevTools pipe (`--remote-debugging-pipe`: commands on fd 3, replies
/// on fd 4, each a JSON message ending in NUL).
#[cfg(feature = "thirdparty-tests")]
struct Chrome {
    child: Child,
    to: std::io::PipeWriter,
    from: BufReader<std::io::PipeReader>,
    next: u64,
}

#[cfg(feature = "thirdparty-tests")]
impl Chrome {
    fn start(browser: &str, profile: &std::path::Path) -> Chrome {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let (cmd_r, cmd_w) = std::io::pipe().unwrap();
        let (out_r, out_w) = std::io::pipe().unwrap();
        let (a, b) = (cmd_r.as_raw_fd(), out_w.as_raw_fd());
        let mut c = Command::new(browser);
        c.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--remote-debugging-pipe",
            "about:blank",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: only async-signal-safe fcntl/dup2 calls between fork and exec. Copy both ends
        // above 10 first: one may already be fd 3 or 4, and dup2 onto itself would keep its
        // close-on-exec flag.
        unsafe {
            c.pre_exec(move || {
                let (a, b) = (
                    libc::fcntl(a, libc::F_DUPFD, 10),
                    libc::fcntl(b, libc::F_DUPFD, 10),
                );
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = c.spawn().unwrap();
        drop(cmd_r);
        drop(out_w);
        Chrome {
            child,
            to: cmd_w,
            from: BufReader::new(out_r),
            next: 1,
        }
    }

    /// Sends a command and returns its result (events in between are skipped).
    fn call(
        &mut self,
        method: &str,
        params: serde_json::Value,
        session: Option<&str>,
    ) -> serde_json::Value {
        let id = self.next;
        self.next += 1;
        let mut msg = serde_json::json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = s.into();
        }
        self.to.write_all(msg.to_string().as_bytes()).unwrap();
        self.to.write_all(&[0]).unwrap();
        loop {
            let mut buf = Vec::new();
            self.from.read_until(0, &mut buf).unwrap();
            assert!(!buf.is_empty(), "chromium closed the pipe");
            buf.pop();
            let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }
}

#[cfg(feature = "thirdparty-tests")]
impl Drop for Chrome {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The chat page in a real headless browser: load it, type a message, send it, see the streamed
/// reply — the same greedy answer the API gives.
#[cfg(feature = "thirdparty-tests")]
#[test]
fn chat_page_works_in_headless_chromium() {
    let browser = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok())
        .expect("no chromium found: install it (scripts/test.sh does: apt-get install chromium)");
    let srv = start();
    let profile = tempfile::tempdir().unwrap();
    let mut c = Chrome::start(browser, profile.path());
    let target = c.call(
        "Target.createTarget",
        serde_json::json!({"url": format!("http://{}/", srv.addr)}),
        None,
    )["targetId"]
        .clone();
    let session = c.call(
        "Target.attachToTarget",
        serde_json::json!({"targetId": target, "flatten": true}),
        None,
    )["sessionId"]
        .as_str()
        .unwrap()
        .to_string();
    let mut eval = |expr: &str| {
        c.call(
            "Runtime.evaluate",
            serde_json::json!({"expression": expr, "returnByValue": true}),
            Some(&session),
        )["result"]["value"]
            .clone()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // The new target starts on about:blank; wait for the chat page itself.
    while eval("document.readyState === 'complete' && !!document.getElementById('send')") != true {
        assert!(std::time::Instant::now() < deadline, "page did not load");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Type and press Send, as a user does.
    eval("document.getElementById('input').value = 'hello there'; document.getElementById('send').click(); true");
    let state = "(() => { const m = document.querySelector('.msg.assistant, .msg.error'); return m ? (m.dataset.state || '') : ''; })()";
    loop {
        let s = eval(state);
        if s == "done" || s == "error" {
            break;
        }
        if std::time::Instant::now() >= deadline {
            let log = eval("document.getElementById('log').innerHTML + ' | ' + location.href");
            panic!("no reply within 60 s (state {s}): {log}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let user = eval("document.querySelector('.msg.user').textContent");
    assert_eq!(user, "hello there");
    let reply = eval("document.querySelector('.msg.assistant').textContent");
    let req = r#"{"messages": [{"role": "user", "content": "hello there"}]}"#;
    let (_, _, body) = http(&srv.addr, "POST", "/v1/chat/completions", req);
    let want = json(&body)["choices"][0]["message"]["content"].clone();
    assert!(!want.as_str().unwrap().is_empty());
    assert_eq!(reply, want);
}
