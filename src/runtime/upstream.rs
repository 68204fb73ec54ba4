//! HTTP/1.1 to one plain-HTTP remote endpoint, for inference: the request
//! path's client ([`Upstream`]). Each thread keeps its own idle keep-alive
//! connections to the endpoint; a request takes one, writes its head and
//! the client's body in one write, and reads the answer in the same task,
//! on the thread that accepted the client — no connection task, no
//! channel, no header map. (hyper's pooled client, used before, cost more
//! user time per pass-through request than nginx's whole request:
//! BENCHMARKS.md, issue 17.) TLS endpoints keep hyper's client
//! (`remote.rs`).
//!
//! Answers are parsed with `httparse`, hyper's own parser: bodies framed by
//! `content-length`, chunked, or (for a server that says neither) by the
//! end of the connection; interim 1xx answers are skipped. A connection is
//! put back only when its answer was complete, framed, and not followed by
//! stray bytes, and the server did not ask to close it.
//!
//! An idle connection the server has closed is noticed before it is used
//! (it reads as ended) and dropped; connections idle too long are closed
//! as the pool is used. When a reused connection still ends or resets
//! before the first byte of its answer (the server closed it as the request
//! went out), the request is sent once more, on a new connection, and only
//! once: inference is a pure function of its input (ARCHITECTURE.md), and
//! the remote gave no answer to count twice. An answer the remote sent
//! before it had read the whole request (a 413, say) is read and used when
//! the rest of the request cannot be written.
//!
//! Each answer is timed from the request (its connection included) to the
//! kernel's receive timestamp of the answer's last bytes (`SO_TIMESTAMPNS`,
//! [`Answer::took`]; Linux):
//! the remote's latency, without the time the reading thread waits for the
//! CPU once the answer is in (the shadow copies' thread runs at the lowest
//! priority) — the same yardstick for every version. (Transmit timestamps
//! too, from the error queue, cost 2.6 µs of CPU per request: not taken.)
//!
//! Answers are bounded by the server's `--max-body-bytes`, as requests are;
//! buffers grow as bytes arrive (a claimed length reserves nothing), and a
//! connection does not keep a large answer's buffer once it is answered.

use std::cell::RefCell;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most idle connections one thread keeps to one endpoint (more, at a
/// peak, are closed once answered).
const MAX_IDLE: usize = 256;
/// Longest answer head (status line and headers) read from a remote.
const MAX_HEAD: usize = 64 << 10;
/// Most headers an answer may have (as hyper allows).
const MAX_HEADERS: usize = 100;
/// The buffer a new connection starts with.
const BUFFER: usize = 8 << 10;
/// A connection's buffer larger than this (a large answer was read into
/// it) is not kept once the answer is handed over.
const KEPT_BUFFER: usize = 64 << 10;
/// How long an answer sent early (before the request was all written) may
/// take to read once the request cannot be written any more.
const EARLY_ANSWER: Duration = Duration::from_secs(1);

/// The inference client of one plain-HTTP endpoint.
pub struct Upstream {
    /// What to connect to (an IPv6 address without its brackets).
    host: String,
    port: u16,
    /// `POST {path} HTTP/1.1`, `host`, and the version's own headers: the
    /// start of every request's head.
    head: Vec<u8>,
    connect_timeout: Duration,
    /// How long a connection may stay idle before it is closed.
    idle_for: Duration,
    /// The largest answer body taken (`--max-body-bytes`).
    max_answer: usize,
    /// Each thread's idle connections, most recently used last.
    idle: thread_local::ThreadLocal<RefCell<Vec<Idle>>>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// One connection and its read buffer.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    /// The kernel timestamps what is read (`SO_TIMESTAMPNS`; a socket
    /// that refuses is read as it is, its answers untimed).
    timed: bool,
    /// When the last bytes read reached the kernel (`timed` only).
    arrived: Option<SystemTime>,
}

/// A remote's answer: its status, its `Inference-Header-Content-Length`,
/// and its body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub header_len: Option<String>,
    pub body: Bytes,
    /// From the request (its connection included) to the arrival, in the
    /// kernel, of the answer's last bytes; `None` when the socket gave no
    /// timestamp.
    pub took: Option<Duration>,
    /// When the answer's last bytes arrived (the kernel's clock).
    arrived: Option<SystemTime>,
}

/// Why a request got no answer, and what went wrong, for the caller's
/// message.
#[derive(Debug)]
pub struct Failure {
    pub kind: FailureKind,
    pub why: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// No connection could be opened.
    Connect,
    /// The connection failed before any answer came.
    Lost,
    /// An answer came but could not be read: not HTTP, cut short, too
    /// large.
    BadAnswer,
}

/// A failed exchange: whether any of the answer had arrived (a request the
/// server dropped unanswered on a reused connection is sent again).
struct Broken {
    answered: bool,
    why: String,
}

impl Broken {
    fn failure(self) -> Failure {
        Failure {
            kind: match self.answered {
                true => FailureKind::BadAnswer,
                false => FailureKind::Lost,
            },
            why: self.why,
        }
    }

    fn before_answer(e: std::io::Error) -> Broken {
        Broken {
            answered: false,
            why: e.to_string(),
        }
    }

    fn answer(why: impl Into<String>) -> Broken {
        Broken {
            answered: true,
            why: why.into(),
        }
    }
}

impl Upstream {
    /// The client of `uri` (an `http://` URI with its path), whose requests
    /// carry `headers` (name, value; checked valid by the caller, none of
    /// them framing the request; a `host` replaces the URI's), and whose
    /// answers may be up to `max_answer` bytes.
    pub fn new<'a>(
        uri: &hyper::Uri,
        headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
        connect_timeout: Duration,
        idle_for: Duration,
        max_answer: usize,
    ) -> Upstream {
        let authority = uri.authority().map_or("", |a| a.as_str());
        let host = uri.host().unwrap_or("");
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut head = format!("POST {path} HTTP/1.1\r\n").into_bytes();
        let mut has_host = false;
        for (name, value) in headers {
            has_host |= name.eq_ignore_ascii_case("host");
            head.extend_from_slice(name.as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value);
            head.extend_from_slice(b"\r\n");
        }
        if !has_host {
            head.extend_from_slice(format!("host: {authority}\r\n").as_bytes());
        }
        Upstream {
            host: host.to_string(),
            port: uri.port_u16().unwrap_or(80),
            head,
            connect_timeout,
            idle_for,
            max_answer,
            idle: thread_local::ThreadLocal::new(),
        }
    }

    /// Posts `body` (of `content_type`, with its binary header length when
    /// set) and reads the answer, whatever its status.
    pub async fn post(
        &self,
        content_type: &str,
        header_len: Option<usize>,
        body: &[u8],
        id: Option<&str>,
    ) -> Result<Answer, Failure> {
        // The kernel stamps arrivals by the realtime clock; the monotonic
        // one bounds the result should the realtime clock be set meanwhile.
        let started = (SystemTime::now(), Instant::now());
        let mut answer = self.answer(content_type, header_len, body, id).await?;
        answer.took = answer
            .arrived
            .and_then(|arrived| arrived.duration_since(started.0).ok())
            .map(|took| took.min(started.1.elapsed()));
        Ok(answer)
    }

    /// [`Upstream::post`], untimed.
    async fn answer(
        &self,
        content_type: &str,
        header_len: Option<usize>,
        body: &[u8],
        id: Option<&str>,
    ) -> Result<Answer, Failure> {
        let request = self.request(content_type, header_len, body, id);
        let Some(idle) = self.take() else {
            let conn = self.connect().await?;
            return self.send_on(conn, &request).await.map_err(Broken::failure);
        };
        match self.send_on(idle, &request).await {
            // Closed by the server as the request went out: once more, on
            // a new connection.
            Err(broken) if !broken.answered => {
                let conn = self.connect().await?;
                self.send_on(conn, &request).await.map_err(Broken::failure)
            }
            answered => answered.map_err(Broken::failure),
        }
    }

    /// Sends `request` on `conn` and reads the answer; the connection goes
    /// back to the pool when it can be used again.
    async fn send_on(&self, mut conn: Conn, request: &[u8]) -> Result<Answer, Broken> {
        let (answer, reusable) = conn.exchange(request, self.max_answer).await?;
        if reusable {
            if conn.buf.capacity() > KEPT_BUFFER {
                conn.buf = BytesMut::with_capacity(BUFFER);
            }
            self.put(conn);
        }
        Ok(answer)
    }

    /// The whole request: head and body, for one write. The request's id
    /// (printable ASCII: `protocol::check_id`) goes in its own header.
    fn request(
        &self,
        content_type: &str,
        header_len: Option<usize>,
        body: &[u8],
        id: Option<&str>,
    ) -> Vec<u8> {
        use std::io::Write as _;
        let id_len = id.map_or(0, |id| id.len() + 24);
        let mut request = Vec::with_capacity(self.head.len() + 128 + id_len + body.len());
        request.extend_from_slice(&self.head);
        let _ = write!(request, "content-type: {content_type}\r\n");
        if let Some(id) = id {
            let _ = write!(
                request,
                "{}: {}\r\n",
                crate::protocol::REQUEST_ID_HEADER,
                id.trim()
            );
        }
        if let Some(n) = header_len {
            let _ = write!(request, "inference-header-content-length: {n}\r\n");
        }
        let _ = write!(request, "content-length: {}\r\n\r\n", body.len());
        request.extend_from_slice(body);
        request
    }

    /// This thread's most recently used idle connection that is still open.
    fn take(&self) -> Option<Conn> {
        let mut idle = self.idle.get()?.borrow_mut();
        self.close_expired(&mut idle);
        while let Some(Idle { conn, .. }) = idle.pop() {
            if conn.is_open() {
                return Some(conn);
            }
        }
        None
    }

    fn put(&self, conn: Conn) {
        let mut idle = self.idle.get_or_default().borrow_mut();
        self.close_expired(&mut idle);
        if idle.len() >= MAX_IDLE {
            return;
        }
        idle.push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    /// Closes the connections idle for longer than `idle_for` (the oldest
    /// first in the list: each was put back after the one before).
    fn close_expired(&self, idle: &mut Vec<Idle>) {
        let now = Instant::now();
        let expired =
            idle.partition_point(|i| now.saturating_duration_since(i.since) >= self.idle_for);
        idle.drain(..expired);
    }

    async fn connect(&self) -> Result<Conn, Failure> {
        let failed = |why: String| Failure {
            kind: FailureKind::Connect,
            why,
        };
        let stream = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| failed(format!("no connection within {:?}", self.connect_timeout)))?
        .map_err(|e| failed(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let timed = stamps::enable(&stream);
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(BUFFER),
            timed,
            arrived: None,
        })
    }
}

/// The kernel's receive timestamps (Linux; elsewhere answers are untimed).
#[cfg(target_os = "linux")]
mod stamps {
    use std::os::fd::AsRawFd;
    use std::time::{Duration, SystemTime};

    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt};
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    /// Room for a message's control data (one receive timestamp), aligned
    /// as the kernel's `cmsghdr` is read from it.
    #[repr(C, align(8))]
    struct Control([u8; 64]);

    /// Asks the kernel to timestamp what `stream` receives (`SO_TIMESTAMPNS`).
    pub fn enable(stream: &TcpStream) -> bool {
        setsockopt(stream, sockopt::ReceiveTimestampns, &true).is_ok()
    }

    /// Reads into `buf`, with the receive timestamp of the last bytes read.
    pub async fn read(
        stream: &TcpStream,
        buf: &mut [u8],
    ) -> std::io::Result<(usize, Option<SystemTime>)> {
        let fd = stream.as_raw_fd();
        let mut control = Control([0; 64]);
        stream
            .async_io(Interest::READABLE, || {
                let mut iov = [std::io::IoSliceMut::new(buf)];
                let msg = recvmsg::<()>(fd, &mut iov, Some(&mut control.0), MsgFlags::empty())?;
                let stamp = msg.cmsgs().ok().and_then(|mut c| {
                    c.find_map(|m| match m {
                        ControlMessageOwned::ScmTimestampns(t) => Some(t),
                        _ => None,
                    })
                });
                let stamp = stamp.and_then(|t| {
                    let secs = u64::try_from(t.tv_sec()).ok().filter(|s| *s > 0)?;
                    let nanos = u32::try_from(t.tv_nsec()).unwrap_or(0);
                    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
                });
                Ok((msg.bytes, stamp))
            })
            .await
    }
}

#[cfg(not(target_os = "linux"))]
mod stamps {
    use std::time::SystemTime;
    use tokio::net::TcpStream;

    pub fn enable(_: &TcpStream) -> bool {
        false
    }

    pub async fn read(_: &TcpStream, _: &mut [u8]) -> std::io::Result<(usize, Option<SystemTime>)> {
        unreachable!("a connection without timestamps is read as it is")
    }
}

/// How an answer's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    /// Until the server closes the connection.
    ToEnd,
}

/// What an answer's head says.
#[derive(Debug)]
struct Head {
    status: u16,
    /// The head's length in the buffer.
    len: usize,
    framing: Framing,
    header_len: Option<String>,
    /// The server keeps the connection open.
    keep_alive: bool,
}

impl Conn {
    /// Whether an idle connection is still open: nothing to read yet (the
    /// server closed it, or sent what no request asked for, otherwise).
    fn is_open(&self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Writes `request` and reads its answer (bodies up to `max` bytes);
    /// also says whether the connection may be used again.
    async fn exchange(&mut self, request: &[u8], max: usize) -> Result<(Answer, bool), Broken> {
        self.buf.clear();
        self.arrived = None;
        let written = self.stream.write_all(request).await;
        let head = match written {
            Ok(()) => self.read_head().await?,
            // An answer may have come before the server stopped reading.
            Err(e) => match tokio::time::timeout(EARLY_ANSWER, self.read_head()).await {
                Ok(Ok(head)) => Head {
                    keep_alive: false,
                    ..head
                },
                _ => return Err(Broken::before_answer(e)),
            },
        };
        let (body, complete) = match head.framing {
            Framing::Length(n) => (self.read_length(head.len, n, max).await?, true),
            Framing::Chunked => (self.read_chunked(head.len, max).await?, true),
            Framing::ToEnd => (self.read_to_end(head.len, max).await?, false),
        };
        // Bytes after the answer are nothing a request asked for.
        let reusable = complete && head.keep_alive && self.buf.is_empty();
        let answer = Answer {
            status: head.status,
            header_len: head.header_len,
            body,
            took: None,
            arrived: self.arrived,
        };
        Ok((answer, reusable))
    }

    /// Reads more into the buffer; the end of the connection is an error
    /// (`what` says what was being read).
    async fn fill(&mut self, what: &str) -> Result<(), Broken> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            // Doubling as an answer grows (reserve grows by at least the
            // capacity): what a length claims is not reserved up front.
            self.buf.reserve(BUFFER);
        }
        let answered = !self.buf.is_empty();
        match self.read_more().await {
            Ok(0) if answered => Err(Broken::answer(format!("connection closed {what}"))),
            Ok(0) => Err(Broken {
                answered: false,
                why: "connection closed before an answer".into(),
            }),
            Ok(_) => Ok(()),
            Err(e) if answered => Err(Broken::answer(format!("{e} ({what})"))),
            Err(e) => Err(Broken::before_answer(e)),
        }
    }

    /// Reads what has arrived into the buffer's room (the caller makes
    /// some); on a timed connection, notes when it reached the kernel.
    async fn read_more(&mut self) -> std::io::Result<usize> {
        if !self.timed {
            return self.stream.read_buf(&mut self.buf).await;
        }
        let start = self.buf.len();
        let room = (self.buf.capacity() - start).clamp(1, KEPT_BUFFER);
        // The kernel writes into initialised memory only (no unsafe here).
        self.buf.resize(start + room, 0);
        let read = stamps::read(&self.stream, &mut self.buf[start..]).await;
        let n = read.as_ref().map_or(0, |(n, _)| *n);
        self.buf.truncate(start + n);
        let (n, stamp) = read?;
        // The read with the answer's last bytes says when they arrived
        // (none: the answer goes untimed, not timed by an earlier read).
        if n > 0 {
            self.arrived = stamp;
        }
        Ok(n)
    }

    /// Reads the answer's head, skipping interim (1xx) answers.
    async fn read_head(&mut self) -> Result<Head, Broken> {
        loop {
            if !self.buf.is_empty() {
                match parse_head(&self.buf)? {
                    Some(head) if (100..200).contains(&head.status) => {
                        self.buf.advance(head.len);
                        continue;
                    }
                    Some(head) => return Ok(head),
                    None if self.buf.len() > MAX_HEAD => {
                        return Err(Broken::answer(format!(
                            "the answer's head is longer than {MAX_HEAD} bytes"
                        )));
                    }
                    None => {}
                }
            }
            self.fill("in the answer's head").await?;
        }
    }

    /// A body of `n` bytes after a head of `head` bytes.
    async fn read_length(&mut self, head: usize, n: usize, max: usize) -> Result<Bytes, Broken> {
        if n > max {
            return Err(too_large(n, max));
        }
        let end = head + n;
        while self.buf.len() < end {
            self.fill("in the answer's body").await?;
        }
        let mut whole = self.buf.split_to(end);
        whole.advance(head);
        Ok(whole.freeze())
    }

    /// A chunked body after a head of `head` bytes, trailers skipped.
    async fn read_chunked(&mut self, head: usize, max: usize) -> Result<Bytes, Broken> {
        self.buf.advance(head);
        let mut body = BytesMut::new();
        loop {
            let (start, size) = loop {
                match httparse::parse_chunk_size(&self.buf) {
                    Ok(httparse::Status::Complete((start, size))) => break (start, size),
                    Ok(httparse::Status::Partial) if self.buf.len() > MAX_HEAD => {
                        return Err(Broken::answer("a chunk's size line is too long"));
                    }
                    Ok(httparse::Status::Partial) => self.fill("in a chunk's size").await?,
                    Err(_) => return Err(Broken::answer("the answer's chunked body is malformed")),
                }
            };
            if size == 0 {
                self.buf.advance(start);
                return self.skip_trailers().await.map(|()| body.freeze());
            }
            let size = usize::try_from(size)
                .ok()
                .filter(|s| body.len().saturating_add(*s) <= max)
                .ok_or_else(|| too_large(body.len().saturating_add(size as usize), max))?;
            // The chunk and its closing CRLF.
            let end = start + size + 2;
            while self.buf.len() < end {
                self.fill("in a chunk").await?;
            }
            if &self.buf[end - 2..end] != b"\r\n" {
                return Err(Broken::answer("a chunk does not end with CRLF"));
            }
            body.extend_from_slice(&self.buf[start..end - 2]);
            self.buf.advance(end);
        }
    }

    /// The trailer section after the last chunk, up to its empty line.
    async fn skip_trailers(&mut self) -> Result<(), Broken> {
        loop {
            match self.buf.windows(2).position(|w| w == b"\r\n") {
                Some(0) => {
                    self.buf.advance(2);
                    return Ok(());
                }
                Some(line) => self.buf.advance(line + 2),
                None if self.buf.len() > MAX_HEAD => {
                    return Err(Broken::answer("the answer's trailers are too long"));
                }
                None => self.fill("in the trailers").await?,
            }
        }
    }

    /// A body that ends with the connection.
    async fn read_to_end(&mut self, head: usize, max: usize) -> Result<Bytes, Broken> {
        self.buf.advance(head);
        loop {
            if self.buf.len() > max {
                return Err(too_large(self.buf.len(), max));
            }
            self.buf.reserve(BUFFER);
            match self.read_more().await {
                Ok(0) => return Ok(self.buf.split().freeze()),
                Ok(_) => {}
                Err(e) => return Err(Broken::answer(format!("{e} (in the answer's body)"))),
            }
        }
    }
}

/// An answer larger than the server takes.
fn too_large(n: usize, max: usize) -> Broken {
    Broken::answer(format!(
        "an answer of {n} bytes or more is larger than --max-body-bytes ({max}); \
         start the server with a larger --max-body-bytes if the model's answers are this large"
    ))
}

/// The head at the start of `buf`, `None` until it is whole.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, Broken> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut answer = httparse::Response::new(&mut headers);
    let len = match answer.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            // An HTTP/2 server's first frame (a gRPC server's, say) has no
            // status line.
            let hint = match buf.first() {
                Some(b'H') => "",
                _ => "; a gRPC server is registered as grpc://host:port",
            };
            return Err(Broken::answer(format!(
                "the answer is not HTTP/1.1 ({e}){hint}"
            )));
        }
    };
    let status = answer.code.unwrap_or(0);
    let mut length: Option<usize> = None;
    let mut chunked = None;
    let mut close = answer.version == Some(0);
    let mut header_len = None;
    for h in answer.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<usize>()
                .ok()
                .filter(|_| !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()));
            match (n, length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => {
                    return Err(Broken::answer(format!(
                        "the answer's content-length {value:?} is not valid or disagrees with another"
                    )));
                }
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // The last coding decides (RFC 9112, 6.3).
            let last = value.rsplit(',').next().unwrap_or("").trim();
            chunked = Some(last.eq_ignore_ascii_case("chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") && answer.version == Some(0) {
                    close = false;
                }
            }
        } else if h
            .name
            .eq_ignore_ascii_case(crate::protocol::HEADER_CONTENT_LENGTH)
        {
            header_len = Some(value.to_string());
        }
    }
    let framing = if status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::Length(0)
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::ToEnd,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::ToEnd,
        }
    };
    Ok(Some(Head {
        status,
        len,
        framing,
        header_len,
        keep_alive: !close,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    /// A server that answers each connection's requests with `answers`,
    /// one per request read, then does what `after` says; returns its
    /// address and what it read.
    async fn server(
        answers: Vec<Vec<&'static [u8]>>,
    ) -> (String, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (seen, requests) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            for per_connection in answers {
                let (mut stream, _) = listener.accept().await.unwrap();
                for answer in per_connection {
                    let request = read_request(&mut stream).await;
                    let _ = seen.send(request);
                    stream.write_all(answer).await.unwrap();
                }
                // Then closed.
            }
        });
        (addr, requests)
    }

    /// One request: its head and its content-length's body.
    async fn read_request(stream: &mut TcpStream) -> Vec<u8> {
        let mut buf = Vec::new();
        loop {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the client closed mid-request");
            buf.extend_from_slice(&chunk[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            if let httparse::Status::Complete(len) = req.parse(&buf).unwrap() {
                let cl: usize = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
                    .unwrap();
                if buf.len() >= len + cl {
                    return buf;
                }
            }
        }
    }

    fn upstream(addr: &str) -> Upstream {
        let uri: hyper::Uri = format!("http://{addr}/v2/models/m/infer").parse().unwrap();
        Upstream::new(
            &uri,
            [("authorization", b"Bearer t".as_slice())],
            Duration::from_secs(2),
            Duration::from_secs(90),
            1 << 20,
        )
    }

    const OK: &[u8] =
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ninference-header-content-length: 3\r\n\r\nhello";

    #[tokio::test]
    async fn writes_the_head_and_body_and_reuses_the_connection() {
        let (addr, mut seen) = server(vec![vec![OK, OK]]).await;
        let up = upstream(&addr);
        for id in [Some("r-1"), None] {
            let answer = up
                .post("application/json", Some(2), b"{}", id)
                .await
                .unwrap();
            assert_eq!(answer.status, 200);
            assert_eq!(answer.header_len.as_deref(), Some("3"));
            assert_eq!(&answer.body[..], b"hello");
        }
        let request = String::from_utf8(seen.recv().await.unwrap()).unwrap();
        assert_eq!(
            request,
            format!(
                "POST /v2/models/m/infer HTTP/1.1\r\nauthorization: Bearer t\r\nhost: {addr}\r\n\
                 content-type: application/json\r\nx-ferry-request-id: r-1\r\n\
                 inference-header-content-length: 2\r\ncontent-length: 2\r\n\r\n{{}}"
            )
        );
        // The second request came on the same connection (the server
        // accepts only one), without an id: it had none.
        let second = String::from_utf8(seen.recv().await.unwrap()).unwrap();
        assert!(!second.contains("x-ferry-request-id"), "{second}");
    }

    #[tokio::test]
    async fn reads_chunked_bodies_and_skips_interim_answers() {
        const CHUNKED: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n";
        let (addr, _seen) = server(vec![vec![CHUNKED, OK]]).await;
        let up = upstream(&addr);
        let answer = up
            .post("application/json", None, b"{}", None)
            .await
            .unwrap();
        assert_eq!(&answer.body[..], b"hello world");
        // The connection stayed usable after the trailers.
        let answer = up
            .post("application/json", None, b"{}", None)
            .await
            .unwrap();
        assert_eq!(&answer.body[..], b"hello");
    }

    #[tokio::test]
    async fn a_body_to_the_end_of_the_connection_is_read_and_not_reused() {
        const TO_END: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\r\nbusy";
        let (addr, _seen) = server(vec![vec![TO_END], vec![OK]]).await;
        let up = upstream(&addr);
        let answer = up
            .post("application/json", None, b"{}", None)
            .await
            .unwrap();
        assert_eq!((answer.status, &answer.body[..]), (503, &b"busy"[..]));
        let answer = up
            .post("application/json", None, b"{}", None)
            .await
            .unwrap();
        assert_eq!(&answer.body[..], b"hello");
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_replaced_and_the_request_sent_once() {
        // The first connection answers once and is closed by the server;
        // the second answers the next request.
        let (addr, mut seen) = server(vec![vec![OK], vec![OK]]).await;
        let up = upstream(&addr);
        up.post("application/json", None, b"{}", None)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let answer = up
            .post("application/json", None, b"{}", None)
            .await
            .unwrap();
        assert_eq!(&answer.body[..], b"hello");
        assert!(seen.recv().await.is_some());
        assert!(seen.recv().await.is_some());
        assert!(
            seen.try_recv().is_err(),
            "each request reached the server once"
        );
    }

    #[tokio::test]
    async fn a_reused_connection_dropped_unanswered_sends_the_request_again_on_a_new_one() {
        // The first connection answers once, then takes the next request
        // and closes without a word (as a server closing an idle
        // connection does when the request crosses its close); the second
        // connection answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (seen, mut requests) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (mut first, _) = listener.accept().await.unwrap();
            let _ = seen.send(read_request(&mut first).await);
            first.write_all(OK).await.unwrap();
            let _ = seen.send(read_request(&mut first).await);
            drop(first);
            let (mut second, _) = listener.accept().await.unwrap();
            let _ = seen.send(read_request(&mut second).await);
            second.write_all(OK).await.unwrap();
            let _ = read_request(&mut second).await;
        });
        let up = upstream(&addr);
        up.post("application/json", None, b"{}", None)
            .await
            .unwrap();
        let answer = up
            .post("application/json", None, b"{}", None)
            .await
            .unwrap();
        assert_eq!(&answer.body[..], b"hello");
        for _ in 0..3 {
            assert!(requests.recv().await.is_some());
        }
        // A fresh connection that is dropped unanswered is an error, not
        // another try: the server is really failing.
    }

    #[tokio::test]
    async fn a_server_that_closes_without_answering_is_an_error_on_a_new_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let _ = read_request(&mut stream).await;
            }
        });
        let err = upstream(&addr)
            .post("application/json", None, b"{}", None)
            .await
            .unwrap_err();
        assert_eq!(err.kind, FailureKind::Lost);
        assert!(err.why.contains("closed before an answer"), "{}", err.why);
    }

    #[tokio::test]
    async fn refused_connections_and_bad_answers_say_what_was_wrong() {
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap().to_string();
        drop(closed);
        let err = upstream(&addr)
            .post("application/json", None, b"{}", None)
            .await
            .unwrap_err();
        assert_eq!(err.kind, FailureKind::Connect, "{err:?}");

        for (bad, says) in [
            (
                &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nhi"[..],
                "content-length",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
                "content-length",
            ),
            (b"SMTP ready\r\n\r\n", "not HTTP/1.1"),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
                "connection closed in the answer's body",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                "chunked body is malformed",
            ),
        ] {
            let (addr, _seen) = server(vec![vec![bad]]).await;
            let err = upstream(&addr)
                .post("application/json", None, b"{}", None)
                .await
                .unwrap_err();
            assert!(
                err.why.contains(says),
                "{:?}: {}",
                String::from_utf8_lossy(bad),
                err.why
            );
        }
    }

    #[tokio::test]
    async fn a_request_dropped_unanswered_is_sent_once_more_and_no_more() {
        // A server that answers until told to drop every request unanswered
        // (a worker dying on one input, on every connection).
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let read = Arc::new(AtomicUsize::new(0));
        let drop_all = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (count, dropping) = (read.clone(), drop_all.clone());
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let (count, dropping) = (count.clone(), dropping.clone());
                tokio::spawn(async move {
                    loop {
                        read_request(&mut stream).await;
                        count.fetch_add(1, Ordering::SeqCst);
                        if dropping.load(Ordering::SeqCst) {
                            return;
                        }
                        // Held, so the client opens three connections.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        stream.write_all(OK).await.unwrap();
                    }
                });
            }
        });
        let up = upstream(&addr);
        let post = || up.post("application/json", None, b"{}", None);
        let (a, b, c) = tokio::join!(post(), post(), post());
        for answer in [a, b, c] {
            answer.unwrap();
        }
        assert_eq!(up.idle.get().unwrap().borrow().len(), 3);
        drop_all.store(true, Ordering::SeqCst);
        read.store(0, Ordering::SeqCst);
        let err = post().await.unwrap_err();
        assert_eq!(err.kind, FailureKind::Lost, "{err:?}");
        assert_eq!(
            read.load(Ordering::SeqCst),
            2,
            "sent on one idle connection, then once on a new one, whatever the pool held"
        );
    }

    #[tokio::test]
    async fn a_large_answer_is_not_kept_in_the_connections_buffer() {
        static LARGE: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
            let mut answer = b"HTTP/1.1 200 OK\r\ncontent-length: 300000\r\n\r\n".to_vec();
            answer.resize(answer.len() + 300_000, b'x');
            answer
        });
        let (addr, _seen) = server(vec![vec![&LARGE[..], OK]]).await;
        let up = upstream(&addr);
        let answer = up
            .post("application/json", None, b"{}", None)
            .await
            .unwrap();
        assert_eq!(answer.body.len(), 300_000);
        drop(answer);
        let kept = up.idle.get().unwrap().borrow()[0].conn.buf.capacity();
        assert!(
            kept <= KEPT_BUFFER,
            "the idle connection keeps {kept} bytes"
        );
        let answer = up
            .post("application/json", None, b"{}", None)
            .await
            .unwrap();
        assert_eq!(&answer.body[..], b"hello");
    }

    #[tokio::test]
    async fn an_answer_larger_than_the_limit_is_refused_before_it_is_read() {
        const CLAIMS: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 10000000000\r\n\r\n";
        let (addr, _seen) = server(vec![vec![CLAIMS]]).await;
        let err = upstream(&addr)
            .post("application/json", None, b"{}", None)
            .await
            .unwrap_err();
        assert_eq!(err.kind, FailureKind::BadAnswer);
        assert!(err.why.contains("--max-body-bytes"), "{}", err.why);
    }

    #[tokio::test]
    async fn a_host_header_given_replaces_the_endpoints() {
        let (addr, mut seen) = server(vec![vec![OK]]).await;
        let uri: hyper::Uri = format!("http://{addr}/v2/models/m/infer").parse().unwrap();
        let up = Upstream::new(
            &uri,
            [("host", b"models.example.com".as_slice())],
            Duration::from_secs(2),
            Duration::from_secs(90),
            1 << 20,
        );
        up.post("application/json", None, b"{}", None)
            .await
            .unwrap();
        let request = String::from_utf8(seen.recv().await.unwrap()).unwrap();
        assert_eq!(request.matches("host:").count(), 1, "{request}");
        assert!(
            request.contains("host: models.example.com\r\n"),
            "{request}"
        );
    }

    #[tokio::test]
    async fn an_answer_sent_before_the_request_was_read_is_used() {
        // The server reads the head, answers 413 and closes, leaving most
        // of a large body unread.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 512];
            let _ = stream.read(&mut head).await.unwrap();
            stream
                .write_all(b"HTTP/1.1 413 Payload Too Large\r\nconnection: close\r\ncontent-length: 9\r\n\r\ntoo large")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(stream);
        });
        let body = vec![b' '; 20 << 20];
        let answer = upstream(&addr)
            .post("application/json", None, &body, None)
            .await
            .unwrap();
        assert_eq!((answer.status, &answer.body[..]), (413, &b"too large"[..]));
    }

    #[tokio::test]
    async fn connections_idle_too_long_are_closed_as_the_pool_is_used() {
        let (addr, _seen) = server(vec![vec![OK], vec![OK]]).await;
        let uri: hyper::Uri = format!("http://{addr}/v2/models/m/infer").parse().unwrap();
        let up = Upstream::new(
            &uri,
            [],
            Duration::from_secs(2),
            Duration::from_millis(30),
            1 << 20,
        );
        up.post("application/json", None, b"{}", None)
            .await
            .unwrap();
        assert_eq!(up.idle.get().unwrap().borrow().len(), 1);
        tokio::time::sleep(Duration::from_millis(60)).await;
        // The expired connection is closed, not used: the server's second
        // connection answers.
        let answer = up
            .post("application/json", None, b"{}", None)
            .await
            .unwrap();
        assert_eq!(&answer.body[..], b"hello");
    }

    #[tokio::test]
    async fn connection_close_is_honoured() {
        const CLOSING: &[u8] =
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nhello";
        let (addr, _seen) = server(vec![vec![CLOSING], vec![OK]]).await;
        let up = upstream(&addr);
        up.post("application/json", None, b"{}", None)
            .await
            .unwrap();
        assert!(up.idle.get().is_none_or(|i| i.borrow().is_empty()));
        let answer = up
            .post("application/json", None, b"{}", None)
            .await
            .unwrap();
        assert_eq!(&answer.body[..], b"hello");
        assert_eq!(up.idle.get().unwrap().borrow().len(), 1);
    }

    /// An answer's time is the remote's: the time the reading thread took
    /// to get to it (blocked here; on a busy gateway, the shadow copies'
    /// low-priority thread waiting for the CPU) is not counted.
    #[test]
    fn an_answers_time_does_not_count_the_readers_wait_for_the_cpu() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        // Answers each connection's request 100 ms after reading it.
        let (read_at, request_read) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut open = Vec::new();
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let _ = stream.read(&mut [0u8; 4096]).unwrap();
                let _ = read_at.send(Instant::now());
                std::thread::sleep(Duration::from_millis(100));
                stream.write_all(OK).unwrap();
                open.push(stream);
            }
        });
        let post = || {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let up = upstream(&addr);
                    let started = Instant::now();
                    let post = tokio::spawn(async move {
                        up.post("application/json", None, b"{}", None)
                            .await
                            .unwrap()
                    });
                    // The request goes out; then this thread is busy
                    // while the answer arrives.
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    std::thread::sleep(Duration::from_millis(600));
                    let busy_until = Instant::now();
                    let answer = post.await.unwrap();
                    assert_eq!(&answer.body[..], b"hello");
                    (answer.took, started.elapsed(), busy_until)
                })
            })
            .join()
            .unwrap()
        };
        let (took, wall, busy_until) = post();
        // The answer (100 ms after the request was read) came while this
        // thread was busy: there was a wait to leave out.
        let read = request_read.recv().unwrap();
        assert!(
            read + Duration::from_millis(100) < busy_until,
            "the request went out before the thread was busy"
        );
        let took = took.expect("the answer is timed");
        assert!(wall >= Duration::from_millis(600), "{wall:?}");
        assert!(
            took >= Duration::from_millis(100) && took < Duration::from_millis(400),
            "the remote took 100 ms, this thread {wall:?}; timed {took:?}"
        );
    }
}
