//! `kiln serve` as a real process on a tiny trained model: the OpenAI-compatible API with a raw
//! HTTP client (plain and streamed answers, errors, concurrent requests, no files exposed), and
//! the chat page in a real headless browser.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
    start_with(&[])
}

fn start_with(extra: &[&str]) -> Server {
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
        .args(extra)
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
    // Undo chunked transfer encoding (streamed answers use it).
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

/// A field of /proc/<pid>/status as a number (VmRSS in kB, Threads).
fn proc_status(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads one response (Content-Length, chunked or to EOF): (status, head, body).
fn read_response(r: &mut BufReader<TcpStream>) -> (u16, String, String) {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let lower = head.to_ascii_lowercase();
    let length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let mut body = Vec::new();
    if let Some(n) = length {
        body.resize(n, 0);
        r.read_exact(&mut body).unwrap();
    } else if lower.contains("transfer-encoding: chunked") {
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let n = usize::from_str_radix(line.trim(), 16).unwrap();
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if status != 100 {
        let _ = r.read_to_end(&mut body);
    }
    (status, head, String::from_utf8_lossy(&body).into_owned())
}

fn closes(head: &str) -> bool {
    head.to_ascii_lowercase().contains("connection: close")
}

/// Hostile HTTP over raw sockets: huge declared bodies are answered without being read (memory
/// stays flat), connections are capped and time out, half-sent requests get 408, bad framing
/// 400/431/501, and the ordinary features (keep-alive, pipelining, 100-continue, chunked bodies)
/// still work.
#[test]
fn hostile_http_cannot_exhaust_the_server() {
    // The idle timeout leaves room for a loaded machine: the cap check below must run before
    // it closes the held connections.
    let srv = start_with(&["--max-connections", "12", "--idle-timeout", "3"]);
    let a = srv.addr.as_str();
    let pid = srv.child.id();
    assert_eq!(http(a, "GET", "/health", "").0, 200);
    // That connection's thread ends after its lingering close (up to 100 ms): until then it
    // holds one of the 12 slots, and the 12th idle connection below would be the one refused.
    std::thread::sleep(Duration::from_millis(400));
    let rss0 = proc_status(pid, "VmRSS");
    let threads0 = proc_status(pid, "Threads");

    // The connection cap: 12 idle connections are held, the 13th is told 503 at once.
    let idle: Vec<TcpStream> = (0..12).map(|_| connect(a)).collect();
    // Until the server holds them all (one thread each).
    let held = Instant::now();
    while proc_status(pid, "Threads") < threads0 + 12 && held.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    let (st, _, b) = http(a, "GET", "/health", "");
    assert_eq!(st, 503, "{b}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(
        proc_status(pid, "Threads") <= threads0 + 12,
        "one thread per open connection at most"
    );
    // The idle timeout closes them (without a word: nothing was asked).
    for mut s in idle {
        let mut buf = [0u8; 64];
        assert_eq!(s.read(&mut buf).unwrap(), 0, "idle connection closed");
    }
    assert!(t.elapsed() < Duration::from_secs(8));
    assert_eq!(http(a, "GET", "/health", "").0, 200);

    // A declared length of 10^15 on every kind of route: answered, never buffered.
    for (line, want) in [
        ("POST /v1/chat/completions", 413),
        ("GET /health", 200),
        ("GET /nope", 404),
        ("PUT /v1/models", 405),
    ] {
        let t = Instant::now();
        let mut s = connect(a);
        write!(
            s,
            "{line} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000000\r\n\r\n"
        )
        .unwrap();
        let _ = s.write_all(&[b'x'; 65536]);
        let (st, head, b) = read_response(&mut BufReader::new(s));
        assert_eq!(st, want, "{line}: {b}");
        assert!(
            closes(&head),
            "{line}: the unread body ends the connection: {head}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "{line}: {:?}",
            t.elapsed()
        );
    }
    // Ten at once, each declaring 50 MB and sending 4 MB of it.
    let senders: Vec<_> = (0..10)
        .map(|_| {
            let a = a.to_string();
            std::thread::spawn(move || {
                let mut s = connect(&a);
                write!(
                    s,
                    "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n"
                )
                .unwrap();
                let mut w = s.try_clone().unwrap();
                let writer = std::thread::spawn(move || {
                    let block = vec![b'x'; 1 << 16];
                    for _ in 0..64 {
                        if w.write_all(&block).is_err() {
                            break;
                        }
                    }
                });
                let st = read_response(&mut BufReader::new(s)).0;
                let _ = writer.join();
                st
            })
        })
        .collect();
    for h in senders {
        assert_eq!(h.join().unwrap(), 413);
    }
    // Chunked bodies count too.
    let mut s = connect(a);
    write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n100000\r\n").unwrap();
    let _ = s.write_all(&[b'x'; 65536]);
    assert_eq!(read_response(&mut BufReader::new(s)).0, 413);
    let grown = proc_status(pid, "VmRSS").saturating_sub(rss0);
    assert!(
        grown < 30_000,
        "RSS grew {grown} kB answering rejected bodies"
    );

    // Half-sent requests time out with 408 (the head, then the body).
    for partial in [
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mess",
    ] {
        let t = Instant::now();
        let mut s = connect(a);
        s.write_all(partial.as_bytes()).unwrap();
        let (st, head, _) = read_response(&mut BufReader::new(s));
        assert_eq!(st, 408, "{partial:?}");
        assert!(closes(&head));
        let e = t.elapsed();
        assert!(
            e >= Duration::from_secs(2) && e < Duration::from_secs(8),
            "{e:?}"
        );
    }

    // Bad framing.
    let long = format!(
        "GET /health HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "y".repeat(20_000)
    );
    for (raw, want) in [
        ("HELLO\r\n\r\n", 400),
        ("POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        ("POST /v1/chat/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
        ("POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
        ("POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        ("POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (long.as_str(), 431),
    ] {
        let mut s = connect(a);
        s.write_all(raw.as_bytes()).unwrap();
        let (st, _, b) = read_response(&mut BufReader::new(s));
        assert_eq!(st, want, "{raw:.80?}: {b}");
        if st != 0 {
            assert!(json(&b)["error"]["message"].is_string(), "{b}");
        }
    }

    // Keep-alive with pipelined requests, then a close.
    let s = connect(a);
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    w.write_all(
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .unwrap();
    let (st1, h1, _) = read_response(&mut r);
    let (st2, h2, b2) = read_response(&mut r);
    assert_eq!((st1, st2), (200, 200));
    assert!(!closes(&h1) && !closes(&h2), "{h1}{h2}");
    assert_eq!(json(&b2)["object"], "list");
    let req = r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}"#;
    write!(
        w,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{req}",
        req.len()
    )
    .unwrap();
    let (st, h, b) = read_response(&mut r);
    assert_eq!(st, 200, "{b}");
    assert!(!closes(&h));
    w.write_all(b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (st, h, _) = read_response(&mut r);
    assert_eq!(st, 200);
    assert!(closes(&h));

    // Expect: 100-continue, and a chunked body.
    let s = connect(a);
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    write!(w, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n", req.len()).unwrap();
    assert_eq!(read_response(&mut r).0, 100);
    w.write_all(req.as_bytes()).unwrap();
    let (st, _, b) = read_response(&mut r);
    assert_eq!(st, 200, "{b}");
    let (x, y) = req.split_at(10);
    write!(
        w,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{x}\r\n{:x};ext=1\r\n{y}\r\n0\r\n\r\n",
        x.len(),
        y.len()
    )
    .unwrap();
    let (st, _, b) = read_response(&mut r);
    assert_eq!(st, 200, "{b}");
    assert_eq!(json(&b)["object"], "chat.completion");
    // An oversized declared body with Expect gets 413 before anything is sent.
    write!(w, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 999999\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut r).0, 413);

    assert_eq!(http(a, "GET", "/health", "").0, 200, "still serving");
}

/// An answer that reaches the model's context ends there with finish_reason "length" (plain and
/// streamed), as OpenAI's API does; a prompt over the context is a 400 that says so.
#[test]
fn answers_stop_at_the_context_with_finish_reason_length() {
    let srv = start();
    let a = srv.addr.as_str();
    let ask = |content: &str, max_tokens: usize, stream: bool| {
        let req = serde_json::json!({"messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "stream": stream});
        http(a, "POST", "/v1/chat/completions", &req.to_string())
    };
    // The tiny model's context is 1024 tokens; fill most of it.
    let content = "x".repeat(1000);
    let (st, _, b) = ask(&content, 1, false);
    assert_eq!(st, 200, "{b}");
    let prompt = json(&b)["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 1000 && prompt < 1024, "{prompt}");
    let (st, _, b) = ask(&content, 500, false);
    assert_eq!(st, 200, "{b}");
    let v = json(&b);
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{b}");
    assert_eq!(
        v["usage"]["completion_tokens"].as_u64().unwrap(),
        1024 - prompt
    );
    let plain = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let (st, _, b) = ask(&content, 500, true);
    assert_eq!(st, 200);
    let events: Vec<&str> = b
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{b}");
    let last = json(events[events.len() - 2]);
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    let streamed: String = events[..events.len() - 1]
        .iter()
        .filter_map(|e| {
            json(e)["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(streamed, plain);

    for stream in [false, true] {
        let (st, _, b) = ask(&"x".repeat(1100), 5, stream);
        assert_eq!(st, 400, "{b}");
        let m = json(&b)["error"]["message"].as_str().unwrap().to_string();
        assert!(m.contains("context of 1024 tokens"), "{m}");
    }
    assert_eq!(http(a, "GET", "/health", "").0, 200);
}

/// The real `openai` Python client (its venv made by scripts/fetch-test-data.sh) against the
/// server: plain and streamed answers, finish_reason "length" at the context, 400 and 413 errors
/// as the client's own exception types.
#[cfg(feature = "thirdparty-tests")]
#[test]
fn the_openai_python_client_works_against_the_server() {
    let td = std::env::var("KILN_TESTDATA")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/kiln-testdata")
        });
    let py = td.join("openai-venv/bin/python");
    assert!(
        py.exists(),
        "run scripts/fetch-test-data.sh first ({})",
        py.display()
    );
    let srv = start();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/openai-client-check.py");
    let out = Command::new(py)
        .arg(script)
        .arg(&srv.addr)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = json(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(seen["context"][2], "length", "{seen}");
    assert_eq!(seen["too_large"], 413);
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
