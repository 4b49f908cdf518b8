//! The agent's HTTP listeners - `/healthz`, `/readyz` and `/metrics` on `--http-addr`,
//! and every healthCheckNodePort - on one small server that no client can stall,
//! bloat or end (issue 24): hyper's HTTP/1 on a tokio runtime of its own (one worker
//! thread: file mode has no runtime, and the Kubernetes source's is the watches').
//!
//! Per listener, whoever the clients are:
//! - each connection is a task of its own: a client that never reads stalls only its
//!   own connection, and holds at most one response (hyper answers pipelined
//!   requests one at a time and reads no further while a response is unwritten);
//! - a request head must arrive whole within [`Limits::header_read_timeout`], which
//!   also bounds how long a kept-alive connection may sit idle (hyper starts the
//!   timer whenever it waits for a head), and may be at most
//!   [`Limits::max_header_bytes`] (hyper answers 431 and closes);
//! - a response write that makes no progress for [`Limits::write_timeout`] closes
//!   the connection ([`WriteDeadline`]);
//! - request bodies are never read: only GET and HEAD are answered, anything else
//!   gets 405, and a request that carries a body gets `Connection: close`;
//! - at most [`Limits::max_connections`] connections are open: a new one beyond that
//!   is accepted and the *oldest* is closed to make room. A flood then cuts
//!   connections short but cannot keep a prober out: a kubelet or load-balancer
//!   probe is answered unless that many newer connections arrive while its own
//!   request is in flight. (Closing the new connection at once, or pausing
//!   `accept`, would refuse or queue every probe for as long as the attacker keeps
//!   the slots full, which costs it one connection per slot per timeout.)
//! - a failed `accept` (EMFILE, ENFILE, ECONNABORTED...) is logged, rate-limited,
//!   and retried after a short backoff; when the process is out of descriptors the
//!   oldest connection is closed first, so the listener can take the next one. The
//!   listener ends only when it is dropped.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::Full;
use hyper::{
    body::{Body, Incoming},
    header::{HeaderName, HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
    task::AbortHandle,
};
use tracing::{debug, info, warn};

/// What one listener allows its clients.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Open connections at most; a new one beyond closes the oldest.
    pub max_connections: usize,
    /// A request head must arrive whole within this, counted from when the
    /// connection opens or its previous response was written (so also the idle
    /// keep-alive timeout).
    pub header_read_timeout: Duration,
    /// A response write that makes no progress for this long closes the connection.
    pub write_timeout: Duration,
    /// Request line and headers, in bytes.
    pub max_header_bytes: usize,
    /// Header fields in a request.
    pub max_headers: usize,
}

impl Limits {
    /// For probes, load-balancer health checks and Prometheus: requests of a few
    /// hundred bytes, answered in milliseconds, from a handful of clients.
    pub const DEFAULT: Self = Self {
        max_connections: 64,
        header_read_timeout: Duration::from_secs(5),
        write_timeout: Duration::from_secs(5),
        max_header_bytes: 8 * 1024,
        max_headers: 32,
    };
}

/// hyper's read buffer: the least it takes (a head never needs more than
/// [`Limits::max_header_bytes`]); it also bounds what it buffers of a response.
const READ_BUFFER_BYTES: usize = 16 * 1024;

/// Accept errors are logged at most once per this, with a count of the rest.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// After a failed accept: the first wait, doubled up to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_LAST: Duration = Duration::from_secs(1);

/// An answer: status, extra headers, body (`Content-Length` is set from it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Reply {
    /// A `text/plain` answer.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            headers: vec![("Content-Type", "text/plain; charset=utf-8".into())],
            body: body.into(),
        }
    }
}

/// Answers a GET or HEAD of a path. Cheap answers should be ready at once; slow ones
/// (rendering `/metrics`) belong on the blocking pool (`spawn_blocking`), so that the
/// runtime's one worker keeps serving everyone else.
pub type Handler = Arc<dyn Fn(&str) -> BoxFuture<'static, Reply> + Send + Sync>;

/// The runtime every HTTP listener of the agent runs on: one worker thread, and at
/// most two blocking threads for slow answers. Start it after the process gave up
/// its capabilities: its threads inherit the starting thread's.
pub struct HttpRuntime {
    runtime: tokio::runtime::Runtime,
}

impl HttpRuntime {
    pub fn start() -> Result<Arc<Self>> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(2)
            .thread_name("http")
            .enable_io()
            .enable_time()
            .build()
            .context("starting the HTTP runtime")?;
        Ok(Arc::new(Self { runtime }))
    }

    /// Listen on `addr` (bound before this returns, so a port in use is an error
    /// here) and answer with `handler` until the [`Listener`] is dropped.
    pub fn serve(&self, addr: SocketAddr, limits: Limits, handler: Handler) -> Result<Listener> {
        let std_listener =
            std::net::TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
        std_listener.set_nonblocking(true)?;
        let listener = {
            let _runtime = self.runtime.enter();
            TcpListener::from_std(std_listener)?
        };
        let open = Arc::new(Mutex::new(Open::default()));
        let accept = self
            .runtime
            .spawn(accept_loop(listener, addr, limits, handler, open.clone()))
            .abort_handle();
        debug!(%addr, "serving HTTP");
        Ok(Listener { accept, open })
    }
}

/// A listening socket and its connections; dropping it closes them all.
pub struct Listener {
    accept: AbortHandle,
    open: Arc<Mutex<Open>>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.accept.abort();
        let tasks = match self.open.lock() {
            Ok(mut open) => {
                open.closed = true;
                std::mem::take(&mut open.tasks)
            }
            Err(_) => return,
        };
        for task in tasks.into_values() {
            task.abort();
        }
    }
}

/// A listener's open connections, oldest first.
#[derive(Default)]
struct Open {
    next_id: u64,
    tasks: BTreeMap<u64, AbortHandle>,
    /// The listener was dropped: take no more.
    closed: bool,
}

impl Open {
    /// Make room for one more connection under `max`: the oldest ones to close.
    fn make_room(&mut self, max: usize) -> Vec<AbortHandle> {
        let mut evicted = Vec::new();
        while self.tasks.len() >= max.max(1) {
            match self.tasks.pop_first() {
                Some((_, task)) => evicted.push(task),
                None => break,
            }
        }
        evicted
    }
}

/// Removes its connection from [`Open`] when the connection's task ends or is
/// aborted.
struct Leave {
    open: Arc<Mutex<Open>>,
    id: u64,
}

impl Drop for Leave {
    fn drop(&mut self) {
        if let Ok(mut open) = self.open.lock() {
            open.tasks.remove(&self.id);
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    limits: Limits,
    handler: Handler,
    open: Arc<Mutex<Open>>,
) {
    let mut backoff = BACKOFF_FIRST;
    let mut errors = Throttle::new(LOG_EVERY);
    let mut evictions = Throttle::new(LOG_EVERY);
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                backoff = BACKOFF_FIRST;
                let evicted = admit(&open, stream, limits, &handler);
                if evicted > 0 {
                    if let Some(more) = evictions.admit(Instant::now()) {
                        info!(
                            %addr,
                            limit = limits.max_connections,
                            "HTTP connection limit reached: closed the oldest connection \
                             ({more} more times since last logged)"
                        );
                    }
                }
            }
            Err(e) => {
                // Out of descriptors: give one back so the next accept can succeed.
                let freed = if out_of_descriptors(&e) {
                    let oldest = open.lock().ok().and_then(|mut o| o.tasks.pop_first());
                    oldest.map(|(_, task)| task.abort()).is_some()
                } else {
                    false
                };
                if let Some(more) = errors.admit(Instant::now()) {
                    warn!(
                        %addr,
                        closed_oldest = freed,
                        "HTTP accept failed: {e}; retrying in {backoff:?} ({more} more \
                         failures since last logged)"
                    );
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_LAST);
            }
        }
    }
}

fn out_of_descriptors(e: &io::Error) -> bool {
    use nix::libc::{EMFILE, ENFILE, ENOBUFS, ENOMEM};
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE | ENOBUFS | ENOMEM))
}

/// Start serving `stream` in a task of its own, closing the oldest connections if
/// the listener is full. Returns how many were closed.
fn admit(
    open: &Arc<Mutex<Open>>,
    stream: tokio::net::TcpStream,
    limits: Limits,
    handler: &Handler,
) -> usize {
    let Ok(mut guard) = open.lock() else {
        return 0;
    };
    if guard.closed {
        return 0;
    }
    let evicted = guard.make_room(limits.max_connections);
    let id = guard.next_id;
    guard.next_id += 1;
    let leave = Leave {
        open: open.clone(),
        id,
    };
    let handler = handler.clone();
    // Inserted under the lock: a task that ends at once removes itself after this.
    let task = tokio::spawn(async move {
        let _leave = leave;
        serve_connection(stream, limits, handler).await;
    });
    guard.tasks.insert(id, task.abort_handle());
    drop(guard);
    let count = evicted.len();
    for task in evicted {
        task.abort();
    }
    count
}

/// Answer the requests of one connection until it closes or breaks a limit.
pub async fn serve_connection<S>(stream: S, limits: Limits, handler: Handler)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(WriteDeadline::new(stream, limits.write_timeout));
    let service = service_fn(move |request: Request<Incoming>| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(respond(request, &handler).await) }
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_headers(limits.max_headers)
        .max_buf_size(READ_BUFFER_BYTES)
        .serve_connection(io, service)
        .await;
    if let Err(e) = served {
        debug!("HTTP connection closed: {e}");
    }
}

async fn respond(request: Request<Incoming>, handler: &Handler) -> Response<Full<Bytes>> {
    // Bodies are never read: a request that sends one ends its connection, so the
    // rest of it is not taken for the next request.
    let has_body = !request.body().is_end_stream();
    let reply = match *request.method() {
        Method::GET | Method::HEAD => handler(request.uri().path()).await,
        _ => {
            let mut reply = Reply::text(405, "only GET and HEAD are answered\n");
            reply.headers.push((ALLOW.as_str(), "GET, HEAD".into()));
            reply
        }
    };
    drop(request);
    let mut response = Response::new(Full::new(Bytes::from(reply.body)));
    *response.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    for (name, value) in reply.headers {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            (Ok(name), Ok(value)) => {
                headers.insert(name, value);
            }
            _ => warn!(name, "HTTP header not sent: not a valid header"),
        }
    }
    if !headers.contains_key(CONTENT_TYPE) {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    if has_body {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A stream whose writes fail with `TimedOut` once one has made no progress for
/// `timeout`: a client that stops reading cannot hold its connection (and the
/// response waiting in it) for good.
pub struct WriteDeadline<S> {
    inner: S,
    timeout: Duration,
    /// Running while a write is pending; reset by any progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteDeadline<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            stalled: None,
        }
    }

    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Pending => {
                let timeout = self.timeout;
                let stalled = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match stalled.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the client read nothing for {timeout:?}"),
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
            done => {
                self.stalled = None;
                done
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, polled)
    }
}

/// Lets one event in per period and counts the rest, for log lines an attacker
/// could otherwise repeat as fast as it connects.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl Throttle {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            held_back: 0,
        }
    }

    /// `Some(n)`: log this one, with `n` held back since the last; `None`: count it.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.every)
        {
            self.held_back += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held_back))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    fn handler() -> Handler {
        Arc::new(|path: &str| {
            let reply = Reply::text(200, format!("you asked for {path}\n"));
            Box::pin(std::future::ready(reply))
        })
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    }

    /// A connection served in the background; the test holds the client's end.
    fn connect(limits: Limits) -> (DuplexStream, tokio::task::JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(serve_connection(server, limits, handler()));
        (client, task)
    }

    async fn exchange(request: &str) -> String {
        let (mut client, task) = connect(Limits::DEFAULT);
        client.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        task.await.unwrap();
        answer
    }

    #[test]
    fn get_and_head_are_answered_and_every_other_method_gets_405() {
        runtime().block_on(async {
            let get =
                exchange("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
            assert!(get.starts_with("HTTP/1.1 200 OK\r\n"), "{get}");
            assert!(get.ends_with("\r\n\r\nyou asked for /healthz\n"), "{get}");
            let head =
                exchange("HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
            assert!(head.contains("content-length: 23\r\n"), "{head}");
            assert!(head.ends_with("\r\n\r\n"), "no body: {head}");
            for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
                let answer = exchange(&format!(
                    "{method} /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                ))
                .await;
                assert!(answer.starts_with("HTTP/1.1 405 "), "{method}: {answer}");
                assert!(answer.contains("allow: GET, HEAD\r\n"), "{answer}");
                assert!(answer.contains("connection: close\r\n"), "{answer}");
            }
        });
    }

    #[test]
    fn a_head_past_the_limit_is_refused_with_431_and_the_connection_closed() {
        runtime().block_on(async {
            let long = format!(
                "GET / HTTP/1.1\r\nX-Long: {}\r\n\r\n",
                "a".repeat(Limits::DEFAULT.max_header_bytes)
            );
            let answer = exchange(&long).await;
            assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
        });
    }

    #[test]
    fn a_client_that_sends_no_head_or_reads_no_answer_is_dropped_after_the_timeouts() {
        const AN_HOUR: Duration = Duration::from_secs(3600);
        runtime().block_on(async {
            // Half a head, then nothing: the header read timeout ends it.
            let limits = Limits {
                write_timeout: AN_HOUR,
                ..Limits::DEFAULT
            };
            let (mut client, task) = connect(limits);
            client.write_all(b"GET / HTTP/1.1\r\nHost:").await.unwrap();
            tokio::time::sleep(limits.header_read_timeout / 2).await;
            assert!(!task.is_finished());
            tokio::time::sleep(limits.header_read_timeout).await;
            assert!(task.is_finished());

            // Pipelined requests, never read: the answers stall in the connection's
            // buffer (64 KiB here), then the write timeout ends it.
            let limits = Limits {
                header_read_timeout: AN_HOUR,
                ..Limits::DEFAULT
            };
            let (mut client, task) = connect(limits);
            let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
            let mut written = 0;
            while tokio::time::timeout(Duration::from_secs(1), client.write_all(request))
                .await
                .is_ok()
            {
                written += 1;
            }
            assert!(written < 10_000, "the server kept reading: {written}");
            tokio::time::sleep(limits.write_timeout / 2).await;
            assert!(!task.is_finished());
            tokio::time::sleep(limits.write_timeout).await;
            assert!(task.is_finished(), "the stalled connection is still served");
        });
    }

    #[test]
    fn the_oldest_connections_make_room_for_a_new_one() {
        let runtime = runtime();
        let _entered = runtime.enter();
        let mut open = Open::default();
        for id in 0..3 {
            let task = runtime.spawn(std::future::pending::<()>());
            open.tasks.insert(id, task.abort_handle());
        }
        assert_eq!(open.make_room(5).len(), 0);
        let evicted = open.make_room(2);
        assert_eq!(evicted.len(), 2);
        assert_eq!(open.tasks.keys().copied().collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn a_throttled_log_lets_one_line_through_per_period_and_counts_the_rest() {
        let start = Instant::now();
        let mut throttle = Throttle::new(Duration::from_secs(10));
        assert_eq!(throttle.admit(start), Some(0));
        for second in 1..10 {
            assert_eq!(throttle.admit(start + Duration::from_secs(second)), None);
        }
        assert_eq!(throttle.admit(start + Duration::from_secs(10)), Some(9));
        assert_eq!(throttle.admit(start + Duration::from_secs(11)), None);
    }
}
