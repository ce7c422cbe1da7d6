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
//! (a full queue answers 503). Bodies over the limit get 413 without being read, malformed ones
//! 400, always as an OpenAI-style JSON error; connections are capped and time out when idle (see
//! [`http`]). An answer that reaches the model's context ends there with `finish_reason:
//! "length"`, as OpenAI's API does; a prompt over the context is a 400 naming both lengths.

use crate::infer::{ChatSession, GenSettings};
use crate::model::generate::SamplingOptions;
use crate::text::template::Message;
use serde_json::{json, Value};
use std::sync::mpsc;

mod http;

const PAGE: &str = include_str!("page.html");

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Requests waiting for the model beyond the one running.
    pub queue: usize,
    /// Open connections at most (more get 503).
    pub max_connections: usize,
    /// A connection idle this long is closed; a request must arrive within it.
    pub idle_timeout: std::time::Duration,
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
    /// The request failed: status and message.
    Failed(u16, String),
}

struct Job {
    messages: Vec<Message>,
    settings: GenSettings,
    out: mpsc::Sender<Piece>,
}

fn error_body(status: u16, message: &str) -> String {
    let kind = match status {
        400 | 404 | 405 | 408 | 413 | 431 | 501 => "invalid_request_error",
        503 => "overloaded",
        _ => "server_error",
    };
    json!({"error": {"message": message, "type": kind, "code": status}}).to_string()
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

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
    let bind_err = |e: std::io::Error| ServeError::Bind {
        addr: addr.clone(),
        message: e.to_string(),
    };
    let listener = std::net::TcpListener::bind(&addr).map_err(bind_err)?;
    ready(listener.local_addr().map_err(bind_err)?);
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
                // The request's own fault (e.g. a prompt longer than the context): 400.
                Err(e @ crate::infer::InferError::Invalid(_)) => {
                    job.out.send(Piece::Failed(400, e.to_string()))
                }
                Err(e) => job.out.send(Piece::Failed(500, e.to_string())),
            };
        }
    });
    let limits = http::Limits {
        max_body_bytes: opts.max_body_bytes,
        max_head_bytes: 16 << 10,
        idle_timeout: opts.idle_timeout,
        max_connections: opts.max_connections.max(1),
    };
    let page = PAGE
        .replace("{{TITLE}}", &html_escape(&opts.title))
        .replace("{{MODEL}}", &html_escape(&opts.model_name));
    let app = App {
        jobs: jobs_tx,
        opts,
        page,
    };
    http::run(listener, limits, std::sync::Arc::new(app));
    Ok(())
}

struct App {
    jobs: mpsc::SyncSender<Job>,
    opts: ServeOptions,
    page: String,
}

fn send_json(res: &mut http::Responder<'_>, status: u16, body: String) {
    let _ = res.send(status, "application/json", body.as_bytes());
}

impl http::Handler for App {
    fn takes_body(&self, method: &str, path: &str) -> bool {
        method == "POST" && path == "/v1/chat/completions"
    }

    fn error_body(&self, status: u16, message: &str) -> (&'static str, Vec<u8>) {
        ("application/json", error_body(status, message).into_bytes())
    }

    fn handle(&self, req: http::Request, res: &mut http::Responder<'_>) {
        let opts = &self.opts;
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/") => {
                let _ = res.send(200, "text/html; charset=utf-8", self.page.as_bytes());
            }
            ("GET", "/health") => send_json(res, 200, json!({"status": "ok"}).to_string()),
            ("GET", "/v1/models") => send_json(
                res,
                200,
                json!({"object": "list", "data": [{"id": opts.model_name, "object": "model", "created": 0, "owned_by": "kiln"}]})
                    .to_string(),
            ),
            ("POST", "/v1/chat/completions") => self.chat(&req.body, res),
            (_, "/" | "/health" | "/v1/models" | "/v1/chat/completions") => {
                send_json(res, 405, error_body(405, "method not allowed"))
            }
            _ => send_json(res, 404, error_body(404, &format!("no route {}", req.path))),
        }
    }
}

impl App {
    fn chat(&self, body: &[u8], res: &mut http::Responder<'_>) {
        let opts = &self.opts;
        let (messages, settings, stream) = match parse_request(body, &opts.defaults) {
            Ok(x) => x,
            Err(m) => return send_json(res, 400, error_body(400, &m)),
        };
        let (tx, rx) = mpsc::channel();
        let job = Job {
            messages,
            settings,
            out: tx,
        };
        if self.jobs.try_send(job).is_err() {
            return send_json(
                res,
                503,
                error_body(503, "the request queue is full; retry later"),
            );
        }
        let n = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("chatcmpl-{}-{n}", now());
        if stream {
            return stream_answer(res, rx, &id, &opts.model_name);
        }
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
                    return send_json(res, 200, body.to_string());
                }
                Piece::Failed(code, m) => return send_json(res, code, error_body(code, &m)),
            }
        }
        send_json(res, 500, error_body(500, "the model worker stopped"));
    }
}

/// Server-sent events, one chunk flushed per token; the zero-length chunk tells the client the
/// answer is complete even on a kept-alive connection. A request refused before its first token
/// (e.g. a prompt over the context) still gets a plain JSON error with its status.
fn stream_answer(res: &mut http::Responder<'_>, rx: mpsc::Receiver<Piece>, id: &str, model: &str) {
    let first = match rx.recv() {
        Ok(Piece::Failed(code, m)) => return send_json(res, code, error_body(code, &m)),
        Ok(p) => p,
        Err(_) => return send_json(res, 500, error_body(500, "the model worker stopped")),
    };
    let Ok(mut w) = res.stream(200, "text/event-stream") else {
        return;
    };
    let created = now();
    let chunk = |delta: Value, finish: Value| {
        let v = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {v}\n\n")
    };
    if w.send(chunk(json!({"role": "assistant", "content": ""}), Value::Null).as_bytes())
        .is_err()
    {
        return;
    }
    for p in std::iter::once(first).chain(rx) {
        let ok = match p {
            Piece::Text(t) => w.send(chunk(json!({"content": t}), Value::Null).as_bytes()),
            Piece::Done { finish_reason, .. } => {
                let _ = w
                    .send(chunk(json!({}), Value::String(finish_reason)).as_bytes())
                    .and_then(|_| w.send(b"data: [DONE]\n\n"))
                    .and_then(|_| w.finish());
                return;
            }
            Piece::Failed(code, m) => {
                let _ = w
                    .send(format!("data: {}\n\n", error_body(code, &m)).as_bytes())
                    .and_then(|_| w.finish());
                return;
            }
        };
        // A closed connection drops `rx`; the worker sees the send fail and stops generating.
        if ok.is_err() {
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
