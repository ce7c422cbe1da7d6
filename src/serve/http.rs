//! The HTTP/1.1 layer under `kiln serve`, on `httparse` (request-head parsing only): connections,
//! framing and limits are kiln's, so that no request can make the server buffer what it will not
//! use.
//!
//! - A body is read only when the route takes one and its declared or chunked length is within
//!   `max_body_bytes`; anything else is answered (413, 404, 405, …) without reading it, and the
//!   connection is closed after a bounded drain (a fixed 8 KiB buffer, at most 1 MiB or 1 s) so
//!   the client still sees the answer.
//! - At most `max_connections` connections are open at once, one thread each; a connection over
//!   the cap gets a 503 from a single rejecting thread and is closed.
//! - Each request's head, and then its body, must arrive within `idle_timeout`; a connection idle
//!   that long between requests is closed (silently; 408 when a request was half sent). Writes
//!   time out alike, so a client that stops reading frees its thread.
//! - Keep-alive (HTTP/1.1 default, HTTP/1.0 on request), `Expect: 100-continue`, chunked request
//!   bodies, pipelined requests. A request with both `Content-Length` and `Transfer-Encoding`, or
//!   conflicting lengths, is refused (400), as RFC 9112 asks.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// The server's limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_head_bytes: usize,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// One request, its body read (when the route takes one).
pub struct Request {
    pub method: String,
    /// The path without the query string.
    pub path: String,
    pub body: Vec<u8>,
}

/// The application behind the HTTP layer.
pub trait Handler: Send + Sync + 'static {
    /// Whether this route reads a request body (others are answered without reading it).
    fn takes_body(&self, method: &str, path: &str) -> bool;
    fn handle(&self, req: Request, res: &mut Responder<'_>);
    /// The body of an error the HTTP layer answers itself: (content type, bytes).
    fn error_body(&self, status: u16, message: &str) -> (&'static str, Vec<u8>);
}

const HEADERS_MAX: usize = 64;
const DRAIN_BYTES: usize = 1 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(1);

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Writes the answer to one request.
pub struct Responder<'a> {
    stream: &'a mut TcpStream,
    /// Close the connection after this answer.
    close: bool,
    /// An answer was written completely.
    done: bool,
    /// Something was written (a failed or unfinished answer closes the connection).
    started: bool,
}

impl<'a> Responder<'a> {
    fn head(&self, status: u16, content_type: &str, framing: &str) -> String {
        let conn = if self.close { "close" } else { "keep-alive" };
        format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\n{framing}\r\nConnection: {conn}\r\n\r\n",
            reason(status)
        )
    }

    /// A whole answer with its length.
    pub fn send(&mut self, status: u16, content_type: &str, body: &[u8]) -> io::Result<()> {
        self.started = true;
        let mut out = self
            .head(
                status,
                content_type,
                &format!("Content-Length: {}", body.len()),
            )
            .into_bytes();
        out.extend_from_slice(body);
        self.stream.write_all(&out)?;
        self.stream.flush()?;
        self.done = true;
        Ok(())
    }

    /// Starts a chunked answer; each [`Stream::send`] is one chunk, flushed at once.
    pub fn stream<'s>(&'s mut self, status: u16, content_type: &str) -> io::Result<Stream<'s, 'a>> {
        self.started = true;
        let head = self.head(
            status,
            &format!("{content_type}\r\nCache-Control: no-cache"),
            "Transfer-Encoding: chunked",
        );
        self.stream.write_all(head.as_bytes())?;
        self.stream.flush()?;
        Ok(Stream { r: self })
    }
}

/// A chunked answer in progress; [`Stream::finish`] ends it (dropping it unfinished closes the
/// connection, which tells the client the answer is incomplete).
pub struct Stream<'r, 'a> {
    r: &'r mut Responder<'a>,
}

impl Stream<'_, '_> {
    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let mut out = format!("{:x}\r\n", data.len()).into_bytes();
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
        self.r.stream.write_all(&out)?;
        self.r.stream.flush()
    }

    pub fn finish(self) -> io::Result<()> {
        self.r.stream.write_all(b"0\r\n\r\n")?;
        self.r.stream.flush()?;
        self.r.done = true;
        Ok(())
    }
}

/// Bytes read from a connection and not yet consumed.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    deadline: Instant,
}

enum Fill {
    More,
    Eof,
}

impl Conn {
    fn avail(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }

    /// Reads what arrives before the deadline (at most 8 KiB).
    fn fill(&mut self) -> io::Result<Fill> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk) {
            Ok(0) => Ok(Fill::Eof),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(Fill::More)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::ErrorKind::TimedOut.into()),
            Err(e) => Err(e),
        }
    }

    /// One CRLF-terminated line (without it), at most `max` bytes.
    fn line(&mut self, max: usize) -> Result<Vec<u8>, Fail> {
        loop {
            if let Some(i) = self.avail().windows(2).position(|w| w == b"\r\n") {
                let l = self.avail()[..i].to_vec();
                self.consume(i + 2);
                return Ok(l);
            }
            if self.avail().len() > max {
                return Err(Fail::status(400, "chunk-size line too long"));
            }
            match self.fill() {
                Ok(Fill::More) => {}
                Ok(Fill::Eof) => return Err(Fail::Gone),
                Err(e) => return Err(Fail::from_io(e)),
            }
        }
    }

    /// Exactly `n` more bytes, appended to `out`.
    fn take(&mut self, mut n: usize, out: &mut Vec<u8>) -> Result<(), Fail> {
        loop {
            let k = n.min(self.avail().len());
            out.extend_from_slice(&self.avail()[..k]);
            self.consume(k);
            n -= k;
            if n == 0 {
                return Ok(());
            }
            match self.fill() {
                Ok(Fill::More) => {}
                Ok(Fill::Eof) => return Err(Fail::Gone),
                Err(e) => return Err(Fail::from_io(e)),
            }
        }
    }
}

/// Why a request could not be read.
enum Fail {
    /// Answer with this status and close.
    Status(u16, String),
    /// The client went away or timed out between requests: close without a word.
    Gone,
}

impl Fail {
    fn status(code: u16, m: &str) -> Fail {
        Fail::Status(code, m.to_string())
    }
    fn from_io(e: io::Error) -> Fail {
        if matches!(
            e.kind(),
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
        ) {
            Fail::status(408, "the request did not arrive in time")
        } else {
            Fail::Gone
        }
    }
}

/// A request's head.
struct Head {
    method: String,
    path: String,
    keep_alive: bool,
    expect_continue: bool,
    framing: Framing,
}

enum Framing {
    None,
    Length(u64),
    Chunked,
}

fn header_tokens<'h>(headers: &'h [(String, String)], name: &str) -> Vec<&'h str> {
    headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| v.split(','))
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .collect()
}

impl Head {
    fn from_parsed(r: &httparse::Request<'_, '_>) -> Result<Head, Fail> {
        let method = r.method.unwrap_or("").to_string();
        let target = r.path.unwrap_or("");
        let path = target.split('?').next().unwrap_or("").to_string();
        let headers: Vec<(String, String)> = r
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let conn = header_tokens(&headers, "connection");
        let has = |t: &str| conn.iter().any(|c| c.eq_ignore_ascii_case(t));
        let keep_alive = if r.version == Some(0) {
            has("keep-alive")
        } else {
            !has("close")
        };
        let expect = header_tokens(&headers, "expect");
        let expect_continue = match expect.as_slice() {
            [] => false,
            [e] if e.eq_ignore_ascii_case("100-continue") => true,
            _ => return Err(Fail::status(400, "unsupported Expect header")),
        };
        let te = header_tokens(&headers, "transfer-encoding");
        let lengths: Vec<&str> = headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .flat_map(|(_, v)| v.split(','))
            .map(|t| t.trim())
            .collect();
        let framing = if !te.is_empty() {
            if !lengths.is_empty() {
                return Err(Fail::status(
                    400,
                    "both Content-Length and Transfer-Encoding given",
                ));
            }
            match te.as_slice() {
                [c] if c.eq_ignore_ascii_case("chunked") => Framing::Chunked,
                _ => {
                    return Err(Fail::Status(
                        501,
                        format!("Transfer-Encoding {} is not supported", te.join(", ")),
                    ))
                }
            }
        } else if let Some(first) = lengths.first() {
            let parse = |s: &str| -> Option<u64> {
                if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                // Over u64: certainly over any limit.
                Some(s.parse::<u64>().unwrap_or(u64::MAX))
            };
            let n = parse(first).ok_or(Fail::status(400, "malformed Content-Length"))?;
            if lengths.iter().any(|l| parse(l) != Some(n)) {
                return Err(Fail::status(400, "conflicting Content-Length values"));
            }
            Framing::Length(n)
        } else {
            Framing::None
        };
        Ok(Head {
            method,
            path,
            keep_alive,
            expect_continue,
            framing,
        })
    }
}

/// Reads the next request's head. `Ok(None)`: the connection ended (or idled out) cleanly.
fn read_head(c: &mut Conn, limits: &Limits) -> Result<Option<Head>, Fail> {
    c.deadline = Instant::now() + limits.idle_timeout;
    loop {
        // Blank lines before a request are allowed (RFC 9112 §2.2).
        while c.avail().starts_with(b"\r\n") {
            c.consume(2);
        }
        if !c.avail().is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
            let mut r = httparse::Request::new(&mut headers);
            match r.parse(c.avail()) {
                Ok(httparse::Status::Complete(n)) if n > limits.max_head_bytes => {
                    return Err(Fail::Status(
                        431,
                        format!("request head over {} bytes", limits.max_head_bytes),
                    ))
                }
                Ok(httparse::Status::Complete(n)) => {
                    let head = Head::from_parsed(&r)?;
                    c.consume(n);
                    return Ok(Some(head));
                }
                Ok(httparse::Status::Partial) => {}
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(Fail::status(431, "too many header fields"))
                }
                Err(e) => return Err(Fail::Status(400, format!("malformed request: {e}"))),
            }
            if c.avail().len() > limits.max_head_bytes {
                return Err(Fail::Status(
                    431,
                    format!("request head over {} bytes", limits.max_head_bytes),
                ));
            }
        }
        let started = !c.avail().is_empty();
        match c.fill() {
            Ok(Fill::More) => {}
            Ok(Fill::Eof) if started => return Err(Fail::Gone),
            Ok(Fill::Eof) => return Ok(None),
            Err(_) if !started => return Ok(None),
            Err(e) => return Err(Fail::from_io(e)),
        }
    }
}

fn too_large(max: usize) -> Fail {
    Fail::Status(413, format!("request body over {max} bytes"))
}

/// Reads a body of at most `max` bytes as `framing` says.
fn read_body(c: &mut Conn, framing: &Framing, max: usize) -> Result<Vec<u8>, Fail> {
    let mut body = Vec::new();
    match framing {
        Framing::None => {}
        Framing::Length(n) => {
            let n = usize::try_from(*n)
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| too_large(max))?;
            body.reserve_exact(n);
            c.take(n, &mut body)?;
        }
        Framing::Chunked => loop {
            let line = c.line(1024)?;
            let size = line.split(|b| *b == b';').next().unwrap_or(&[]);
            let size = std::str::from_utf8(size)
                .ok()
                .map(str::trim)
                .filter(|s| !s.is_empty() && s.len() <= 16)
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                .ok_or(Fail::status(400, "malformed chunk size"))?;
            if size == 0 {
                // Trailer fields, then the empty line.
                let mut trailer = 0usize;
                loop {
                    let l = c.line(8192)?;
                    trailer += l.len();
                    if l.is_empty() {
                        return Ok(body);
                    }
                    if trailer > 8192 {
                        return Err(Fail::status(431, "trailer fields too large"));
                    }
                }
            }
            let size = usize::try_from(size)
                .ok()
                .filter(|s| body.len().saturating_add(*s) <= max)
                .ok_or_else(|| too_large(max))?;
            c.take(size, &mut body)?;
            if !c.line(2)?.is_empty() {
                return Err(Fail::status(400, "chunk data longer than its size"));
            }
        },
    }
    Ok(body)
}

/// Closes after an answer while the client may still be sending: stop writing, read and discard
/// (fixed buffer, bounded bytes and time) so the kernel does not reset the connection before the
/// client has read the answer, then close.
fn linger_close(stream: &mut TcpStream, bytes: usize, time: Duration) {
    let _ = stream.shutdown(Shutdown::Write);
    let end = Instant::now() + time;
    let mut buf = [0u8; 8192];
    let mut seen = 0usize;
    while seen < bytes {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen += n,
        }
    }
}

fn serve_connection(stream: TcpStream, limits: &Limits, app: &dyn Handler) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(limits.idle_timeout));
    let mut c = Conn {
        stream,
        buf: Vec::new(),
        pos: 0,
        deadline: Instant::now(),
    };
    let fail = |c: &mut Conn, f: Fail| {
        if let Fail::Status(code, m) = f {
            let (ty, body) = app.error_body(code, &m);
            let mut r = Responder {
                stream: &mut c.stream,
                close: true,
                done: false,
                started: false,
            };
            let _ = r.send(code, ty, &body);
            linger_close(&mut c.stream, DRAIN_BYTES, DRAIN_TIME);
        }
    };
    loop {
        let head = match read_head(&mut c, limits) {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(f) => return fail(&mut c, f),
        };
        let has_body = match head.framing {
            Framing::None | Framing::Length(0) => false,
            Framing::Length(_) | Framing::Chunked => true,
        };
        let takes = app.takes_body(&head.method, &head.path);
        // A body the route does not take is never read: answer, then close.
        let mut close = !head.keep_alive || (has_body && !takes);
        let mut body = Vec::new();
        if has_body && takes {
            if let Framing::Length(n) = head.framing {
                if n > limits.max_body_bytes as u64 {
                    return fail(&mut c, too_large(limits.max_body_bytes));
                }
            }
            if head.expect_continue {
                let cont = b"HTTP/1.1 100 Continue\r\n\r\n";
                if c.stream
                    .write_all(cont)
                    .and_then(|_| c.stream.flush())
                    .is_err()
                {
                    return;
                }
            }
            c.deadline = Instant::now() + limits.idle_timeout;
            body = match read_body(&mut c, &head.framing, limits.max_body_bytes) {
                Ok(b) => b,
                Err(f) => return fail(&mut c, f),
            };
        } else if has_body && head.expect_continue {
            // The client waits for our word before sending: nothing of the body is in flight.
            close = true;
        }
        let req = Request {
            method: head.method,
            path: head.path,
            body,
        };
        let mut r = Responder {
            stream: &mut c.stream,
            close,
            done: false,
            started: false,
        };
        app.handle(req, &mut r);
        if !r.started {
            let (ty, b) = app.error_body(500, "no answer");
            r.close = true;
            let _ = r.send(500, ty, &b);
        }
        if r.close || !r.done {
            let (bytes, time) = if has_body && !takes {
                (DRAIN_BYTES, DRAIN_TIME)
            } else {
                (64 << 10, Duration::from_millis(200))
            };
            linger_close(&mut c.stream, bytes, time);
            return;
        }
    }
}

/// Decrements the open-connection count when a connection's thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves connections from `listener` until the process ends.
pub fn run(listener: TcpListener, limits: Limits, app: Arc<dyn Handler>) {
    let open = Arc::new(AtomicUsize::new(0));
    // Over-cap connections are answered 503 by one thread, a few at a time; more are dropped.
    let (busy_tx, busy_rx) = mpsc::sync_channel::<TcpStream>(64);
    {
        let app = app.clone();
        std::thread::spawn(move || {
            let (ty, body) = app.error_body(503, "too many open connections; retry later");
            for mut s in busy_rx {
                let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
                let mut r = Responder {
                    stream: &mut s,
                    close: true,
                    done: false,
                    started: false,
                };
                let _ = r.send(503, ty, &body);
                linger_close(&mut s, 64 << 10, Duration::from_millis(100));
            }
        });
    }
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(_) => {
                // Out of file descriptors or similar: let open connections finish.
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        if open.load(Ordering::Acquire) >= limits.max_connections {
            let _ = busy_tx.try_send(stream);
            continue;
        }
        open.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(open.clone());
        let (limits, app) = (limits.clone(), app.clone());
        let spawned = std::thread::Builder::new()
            .name("kiln-http".into())
            .spawn(move || {
                let _slot = slot;
                serve_connection(stream, &limits, app.as_ref());
            });
        // A thread that cannot start drops its connection (and its slot) with the closure.
        drop(spawned);
    }
}
