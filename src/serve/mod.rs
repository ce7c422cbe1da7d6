//! `kiln serve`: a small chat page and an OpenAI-compatible API over one loaded model.
//!
//! - `GET /` — the chat page (embedded; the server exposes no files).
//! - `GET /v1/models` — the one model.
//! - `POST /v1/chat/completions` — `{messages, stream?, max_tokens?, temperature?, top_p?,
//!   top_k?, seed?}`; with `stream: true` the answer arrives as server-sent events
//!   (`chat.completion.chunk` objects, then `data: [DONE]`).
//! - `GET /health`.
//!
//! One worker thread owns the model; requests wait in a bounded queue and are answered in order
//! (a full queue answers 503). Bodies over the limit get 413, malformed ones 400, always as an
//! OpenAI-style JSON error.

use crate::infer::{ChatSession, GenSettings};
use crate::model::generate::SamplingOptions;
use crate::text::template::Message;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::sync::mpsc;

const PAGE: &str = include_str!("serve_page.html");

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Requests waiting for the model beyond the one running.
    pub queue: usize,
    pub model_name: String,
    pub title: String,
    /// Defaults for requests that do not say.
    pub defaults: GenSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {message}")]
    Bind { addr: String, message: String },
}

/// One streamed piece of an answer.
enum Piece {
    Text(String),
    Done {
        finish_reason: String,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

struct Job {
    messages: Vec<Message>,
    settings: GenSettings,
    out: mpsc::Sender<Piece>,
}

fn error_body(status: u16, message: &str) -> String {
    let kind = match status {
        400 | 404 | 405 | 413 => "invalid_request_error",
        503 => "overloaded",
        _ => "server_error",
    };
    json!({"error": {"message": message, "type": kind, "code": status}}).to_string()
}

fn with_type<R: Read>(resp: tiny_http::Response<R>, ty: &str) -> tiny_http::Response<R> {
    match tiny_http::Header::from_bytes(&b"Content-Type"[..], ty.as_bytes()) {
        Ok(h) => resp.with_header(h),
        Err(()) => resp,
    }
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn respond_json(req: tiny_http::Request, status: u16, body: String) {
    let resp = with_type(
        tiny_http::Response::from_string(body).with_status_code(status),
        "application/json",
    );
    let _ = req.respond(resp);
}

/// Parses and checks a chat completion request.
fn parse_request(
    body: &[u8],
    defaults: &GenSettings,
) -> Result<(Vec<Message>, GenSettings, bool), String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("malformed JSON: {e}"))?;
    let msgs = v
        .get("messages")
        .and_then(|m| m.as_array())
        .ok_or("`messages` must be a list of {role, content}")?;
    if msgs.is_empty() {
        return Err("`messages` is empty".into());
    }
    let mut messages = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let role = m.get("role").and_then(|r| r.as_str());
        // content: a string, or OpenAI's list of {type: text, text} parts.
        let content = match m.get("content") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(parts)) => Some(
                parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
                    .collect::<Vec<_>>()
                    .join(""),
            ),
            _ => None,
        };
        match (role, content) {
            (Some(r), Some(c)) if ["system", "user", "assistant", "tool"].contains(&r) => messages
                .push(Message {
                    role: r.into(),
                    content: c,
                }),
            _ => {
                return Err(format!(
                "messages[{i}]: needs `role` (system, user, assistant, tool) and string `content`"
            ))
            }
        }
    }
    let mut s = defaults.clone();
    let num = |k: &str| v.get(k).filter(|x| !x.is_null());
    if let Some(t) = num("temperature") {
        s.sampling.temperature = t
            .as_f64()
            .filter(|t| (0.0..=2.0).contains(t))
            .ok_or("`temperature` must be a number in [0, 2]")?;
    }
    if let Some(t) = num("top_p") {
        s.sampling.top_p = t
            .as_f64()
            .filter(|t| *t > 0.0 && *t <= 1.0)
            .ok_or("`top_p` must be a number in (0, 1]")?;
    }
    if let Some(t) = num("top_k") {
        s.sampling.top_k = t.as_u64().ok_or("`top_k` must be a whole number")? as usize;
    }
    if let Some(t) = num("seed") {
        s.sampling.seed = t.as_u64().ok_or("`seed` must be a whole number")?;
    }
    for k in ["max_tokens", "max_completion_tokens"] {
        if let Some(t) = num(k) {
            s.max_new_tokens = t
                .as_u64()
                .filter(|n| *n > 0 && *n <= 8192)
                .ok_or(format!("`{k}` must be a whole number in [1, 8192]"))?
                as usize;
        }
    }
    let stream = match num("stream") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("`stream` must be true or false".into()),
    };
    Ok((messages, s, stream))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs the server until the process ends. `ready` gets the bound address (port 0 picks one).
pub fn serve(
    mut chat: ChatSession,
    opts: ServeOptions,
    ready: impl FnOnce(std::net::SocketAddr),
) -> Result<(), ServeError> {
    let addr = format!("{}:{}", opts.host, opts.port);
    let server = tiny_http::Server::http(&addr).map_err(|e| ServeError::Bind {
        addr: addr.clone(),
        message: e.to_string(),
    })?;
    if let Some(a) = server.server_addr().to_ip() {
        ready(a);
    }
    let (jobs_tx, jobs_rx) = mpsc::sync_channel::<Job>(opts.queue);
    std::thread::spawn(move || {
        for job in jobs_rx {
            chat.settings = job.settings;
            let out = job.out.clone();
            let r = chat.complete(&job.messages, &mut |piece| {
                out.send(Piece::Text(piece.to_string())).is_ok()
            });
            let _ = match r {
                Ok(reply) => job.out.send(Piece::Done {
                    finish_reason: reply.stats.finish_reason,
                    prompt_tokens: reply.stats.prompt_tokens,
                    completion_tokens: reply.stats.generated_tokens,
                }),
                Err(e) => job.out.send(Piece::Failed(e.to_string())),
            };
        }
    });
    let opts = std::sync::Arc::new(opts);
    for req in server.incoming_requests() {
        let jobs = jobs_tx.clone();
        let opts = opts.clone();
        std::thread::spawn(move || handle(req, &jobs, &opts));
    }
    Ok(())
}

fn handle(mut req: tiny_http::Request, jobs: &mpsc::SyncSender<Job>, opts: &ServeOptions) {
    let method = req.method().clone();
    let path = req.url().split('?').next().unwrap_or("").to_string();
    match (method, path.as_str()) {
        (tiny_http::Method::Get, "/") => {
            let page = PAGE
                .replace("{{TITLE}}", &html_escape(&opts.title))
                .replace("{{MODEL}}", &html_escape(&opts.model_name));
            let resp = with_type(
                tiny_http::Response::from_string(page),
                "text/html; charset=utf-8",
            );
            let _ = req.respond(resp);
        }
        (tiny_http::Method::Get, "/health") => respond_json(req, 200, json!({"status": "ok"}).to_string()),
        (tiny_http::Method::Get, "/v1/models") => respond_json(
            req,
            200,
            json!({"object": "list", "data": [{"id": opts.model_name, "object": "model", "created": 0, "owned_by": "kiln"}]})
                .to_string(),
        ),
        (tiny_http::Method::Post, "/v1/chat/completions") => {
            if req.body_length().is_some_and(|n| n > opts.max_body_bytes) {
                let m = format!("request body over {} bytes", opts.max_body_bytes);
                return respond_json(req, 413, error_body(413, &m));
            }
            let mut body = Vec::new();
            let limit = opts.max_body_bytes as u64 + 1;
            if req.as_reader().take(limit).read_to_end(&mut body).is_err() {
                return respond_json(req, 400, error_body(400, "could not read the request body"));
            }
            if body.len() > opts.max_body_bytes {
                let m = format!("request body over {} bytes", opts.max_body_bytes);
                return respond_json(req, 413, error_body(413, &m));
            }
            let (messages, settings, stream) = match parse_request(&body, &opts.defaults) {
                Ok(x) => x,
                Err(m) => return respond_json(req, 400, error_body(400, &m)),
            };
            let (tx, rx) = mpsc::channel();
            let job = Job {
                messages,
                settings,
                out: tx,
            };
            if jobs.try_send(job).is_err() {
                return respond_json(req, 503, error_body(503, "the request queue is full; retry later"));
            }
            let n = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let id = format!("chatcmpl-{}-{n}", now());
            if stream {
                stream_answer(req, rx, &id, &opts.model_name);
            } else {
                let mut text = String::new();
                for p in rx {
                    match p {
                        Piece::Text(t) => text.push_str(&t),
                        Piece::Done {
                            finish_reason,
                            prompt_tokens,
                            completion_tokens,
                        } => {
                            let body = json!({
                                "id": id, "object": "chat.completion", "created": now(),
                                "model": opts.model_name,
                                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
                                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
                            });
                            return respond_json(req, 200, body.to_string());
                        }
                        Piece::Failed(m) => return respond_json(req, 500, error_body(500, &m)),
                    }
                }
                respond_json(req, 500, error_body(500, "the model worker stopped"));
            }
        }
        (_, "/" | "/health" | "/v1/models" | "/v1/chat/completions") => {
            respond_json(req, 405, error_body(405, "method not allowed"))
        }
        _ => respond_json(req, 404, error_body(404, &format!("no route {path}"))),
    }
}

/// Server-sent events over the raw connection in HTTP/1.1 chunked framing, one chunk flushed per
/// token (tiny_http's own chunked writer buffers 8 KiB, which would hold the stream back); the
/// zero-length chunk tells the client the answer is complete even on a kept-alive connection.
fn stream_answer(req: tiny_http::Request, rx: mpsc::Receiver<Piece>, id: &str, model: &str) {
    let mut w = req.into_writer();
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if w.write_all(head.as_bytes())
        .and_then(|_| w.flush())
        .is_err()
    {
        return;
    }
    let created = now();
    let chunk = |delta: Value, finish: Value| {
        let v = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {v}\n\n")
    };
    let mut send = |s: String| {
        let framed = if s.is_empty() {
            "0\r\n\r\n".to_string()
        } else {
            format!("{:x}\r\n{s}\r\n", s.len())
        };
        w.write_all(framed.as_bytes())
            .and_then(|_| w.flush())
            .is_ok()
    };
    if !send(chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )) {
        return;
    }
    for p in rx {
        let ok = match p {
            Piece::Text(t) => send(chunk(json!({"content": t}), Value::Null)),
            Piece::Done { finish_reason, .. } => {
                send(chunk(json!({}), Value::String(finish_reason)));
                send("data: [DONE]\n\n".into());
                send(String::new());
                return;
            }
            Piece::Failed(m) => {
                send(format!("data: {}\n\n", error_body(500, &m)));
                send(String::new());
                return;
            }
        };
        // A closed connection drops `rx`; the worker sees the send fail and stops generating.
        if !ok {
            return;
        }
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Defaults for a served model: greedy unless the config's `gradio_temperature` says otherwise.
pub fn default_settings(max_new_tokens: usize, temperature: f64) -> GenSettings {
    GenSettings {
        sampling: SamplingOptions {
            temperature,
            ..Default::default()
        },
        max_new_tokens,
    }
}
