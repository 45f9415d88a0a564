//! Connection hygiene at the front door: what a client must do to keep a connection to a
//! gRPC listener (the gateway's and the admin one, plain or TLS).
//!
//! - **Handshake timeout**: a connection must finish the TLS handshake (when TLS is on) and
//!   send the HTTP/2 client preface and its first SETTINGS frame within
//!   [`ConnSettings::handshake_timeout`], or it is closed. The bytes read are replayed to the
//!   HTTP/2 server, which never sees the difference.
//! - **Idle timeout**: a connection with no open stream for [`ConnSettings::idle_timeout`] is
//!   closed. Streams are counted by [`StreamLayer`] per connection.
//! - **Max connections**: past [`ConnSettings::max_connections`] open connections (in
//!   handshake or established), new ones are closed as soon as they are accepted.
//! - **Keepalive and max connection age**: HTTP/2 PINGs every `keepalive_interval`; after
//!   `max_connection_age` a connection gets a GOAWAY (tonic) and is closed for good
//!   `max_connection_age_grace` later (here), so load balancers can rebalance.
//! - **Accept errors**: running out of file descriptors (or kernel memory) pauses accepting
//!   with an exponential backoff (counted and logged) instead of ending or spinning.
//!
//! [`StreamLayer`] also ends long-lived admin streams (the health `Watch`, reflection) when
//! the drain begins, so they never hold a shutdown hostage.
//!
//! Metrics (names in [`crate::telemetry::names`]): `llm_gateway_connections_open`,
//! `llm_gateway_connections_closed_total{reason}`, `llm_gateway_connections_refused_total`,
//! `llm_gateway_accept_errors_total{kind}`, each labelled with the `listener`.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, stream::BoxStream};
use http_body::{Body as HttpBody, Frame};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    task::JoinSet,
    time::{Instant, Sleep},
};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::{
    telemetry::names,
    tls::{Conn, TlsState},
};

pub use super::settings::ConnSettings;

/// Applies the HTTP/2 settings tonic implements itself (keepalive; the GOAWAY at the
/// maximum age). The grace is enforced here: tonic's own grace would skip the GOAWAY.
pub fn apply<L>(
    settings: &ConnSettings,
    server: tonic::transport::Server<L>,
) -> tonic::transport::Server<L> {
    let keepalive = (!settings.keepalive_interval.is_zero()).then_some(settings.keepalive_interval);
    let server = server
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(keepalive.map(|_| settings.keepalive_timeout))
        .initial_connection_window_size(settings.connection_window_bytes);
    match settings.max_connection_age {
        Some(age) => server.max_connection_age(age),
        None => server,
    }
}

/// The HTTP/2 client preface (RFC 9113 section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame header length.
const FRAME_HEADER: usize = 9;

/// The largest first SETTINGS frame accepted (the default maximum frame size).
const MAX_SETTINGS_LEN: usize = 16_384;

/// Handshakes in progress at most; further connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 1024;

/// First and longest pause after an accept error for lack of resources.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// Why the gateway closed a connection during the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The timeout passed.
    Timeout,
    /// The TLS handshake failed.
    Tls,
    /// The client did not speak HTTP/2 (wrong preface or first frame).
    NotHttp2,
    /// The client closed the connection (or it broke) first.
    Closed,
}

impl HandshakeFailure {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "handshake_timeout",
            HandshakeFailure::Tls => "tls_failed",
            HandshakeFailure::NotHttp2 => "not_http2",
            HandshakeFailure::Closed => "closed_in_handshake",
        }
    }
}

/// Reads the HTTP/2 client preface and the first frame, which must be SETTINGS; returns
/// every byte read (to replay).
pub async fn read_preface<IO: AsyncRead + Unpin>(io: &mut IO) -> Result<Bytes, HandshakeFailure> {
    match read_start(io, false).await? {
        Start::Http2(replay) => Ok(replay),
        Start::Http1(_) => Err(HandshakeFailure::NotHttp2),
    }
}

/// How a connection began.
#[derive(Debug)]
enum Start {
    /// The HTTP/2 preface and first SETTINGS frame (every byte read, to replay).
    Http2(Bytes),
    /// An HTTP/1.x request (the bytes read so far, to replay).
    Http1(Bytes),
}

/// Whether bytes that are not the HTTP/2 preface begin an HTTP/1.x request: a method token
/// (upper-case letters). The HTTP/1 server answers anything malformed after it with 400.
fn http1_start(buf: &[u8]) -> bool {
    buf.first().is_some_and(u8::is_ascii_uppercase)
}

/// [`read_preface`], or, when `http1` is set, the start of an HTTP/1.x request.
async fn read_start<IO: AsyncRead + Unpin>(
    io: &mut IO,
    http1: bool,
) -> Result<Start, HandshakeFailure> {
    let mut buf = BytesMut::with_capacity(512);
    let mut need = PREFACE.len() + FRAME_HEADER;
    let mut checked = false;
    loop {
        while buf.len() < need {
            buf.reserve(need - buf.len());
            match io.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Err(HandshakeFailure::Closed),
                Ok(_) => {}
            }
            // Reject a wrong preface as soon as its first bytes are in.
            let n = buf.len().min(PREFACE.len());
            if buf[..n] != PREFACE[..n] {
                if http1 && http1_start(&buf) {
                    return Ok(Start::Http1(buf.freeze()));
                }
                return Err(HandshakeFailure::NotHttp2);
            }
        }
        if checked {
            return Ok(Start::Http2(buf.freeze()));
        }
        let header = &buf[PREFACE.len()..PREFACE.len() + FRAME_HEADER];
        let len =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        // Type 0x4 SETTINGS, not an ACK, on stream 0.
        if header[3] != 0x4 || header[4] & 0x1 != 0 || header[5..9] != [0; 4] {
            return Err(HandshakeFailure::NotHttp2);
        }
        if len > MAX_SETTINGS_LEN || len % 6 != 0 {
            return Err(HandshakeFailure::NotHttp2);
        }
        need = PREFACE.len() + FRAME_HEADER + len;
        checked = true;
    }
}

/// The per-connection state [`StreamLayer`] and [`Connection`] share.
#[derive(Debug)]
pub struct ConnState {
    open_streams: AtomicUsize,
    /// When the last stream ended (or the connection started).
    idle_since: Mutex<Instant>,
}

impl ConnState {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            open_streams: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        })
    }

    /// Counts a stream until the guard is dropped.
    pub fn stream_started(self: &Arc<Self>) -> StreamGuard {
        self.open_streams.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.clone())
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        self.open_streams.load(Ordering::Acquire)
    }

    fn idle_since(&self) -> Instant {
        self.idle_since
            .lock()
            .map_or_else(|e| *e.into_inner(), |t| *t)
    }
}

/// One open stream on a connection.
#[derive(Debug)]
pub struct StreamGuard(Arc<ConnState>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        // Set the idle start before the count can read zero.
        if let Ok(mut since) = self.0.idle_since.lock() {
            *since = Instant::now();
        }
        self.0.open_streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What tonic puts in every request's extensions for this connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Addresses.
    pub tcp: TcpConnectInfo,
    /// Stream accounting.
    pub state: Arc<ConnState>,
}

/// Holds one of the listener's connection slots.
#[derive(Debug)]
struct Slot {
    open: Arc<AtomicUsize>,
    listener: &'static str,
}

impl Slot {
    fn take(open: &Arc<AtomicUsize>, max: usize, listener: &'static str) -> Option<Slot> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()?;
        metrics::gauge!(names::CONNECTIONS_OPEN, "listener" => listener).increment(1.0);
        Some(Slot {
            open: open.clone(),
            listener,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!(names::CONNECTIONS_OPEN, "listener" => self.listener).decrement(1.0);
    }
}

fn count_closed(listener: &'static str, reason: &'static str) {
    metrics::counter!(names::CONNECTIONS_CLOSED, "listener" => listener, "reason" => reason)
        .increment(1);
}

/// An established connection: the transport, the handshake bytes to replay, and the idle
/// and age limits, enforced on reads (the HTTP/2 server always has one pending).
pub struct Connection<IO = Conn> {
    io: IO,
    replay: Bytes,
    state: Arc<ConnState>,
    tcp: TcpConnectInfo,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
    /// The age timer and, until the age has passed, the grace that follows it.
    age: Option<(Pin<Box<Sleep>>, Option<Duration>)>,
    closed: bool,
    listener: &'static str,
    _slot: Option<Slot>,
}

impl<IO> std::fmt::Debug for Connection<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.tcp.remote_addr)
            .field("open_streams", &self.state.open_streams())
            .finish_non_exhaustive()
    }
}

impl<IO> Connection<IO> {
    /// Wraps `io` whose handshake produced `replay`; `idle_timeout` zero means no idle limit;
    /// `max_age` is the maximum age and its grace (the HTTP/2 server sends the GOAWAY at the
    /// age; this closes the connection when the grace is over).
    pub fn new(
        io: IO,
        replay: Bytes,
        tcp: TcpConnectInfo,
        idle_timeout: Duration,
        max_age: Option<(Duration, Duration)>,
        listener: &'static str,
    ) -> Self {
        let state = ConnState::new();
        let idle = (!idle_timeout.is_zero())
            .then(|| (idle_timeout, Box::pin(tokio::time::sleep(idle_timeout))));
        Self {
            io,
            replay,
            state,
            tcp,
            idle,
            age: max_age.map(|(age, grace)| (Box::pin(tokio::time::sleep(age)), Some(grace))),
            closed: false,
            listener,
            _slot: None,
        }
    }

    /// The stream accounting of this connection.
    pub fn state(&self) -> &Arc<ConnState> {
        &self.state
    }

    /// Whether the idle limit has passed (and re-arms the timer otherwise).
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> bool {
        let Some((timeout, sleep)) = &mut self.idle else {
            return false;
        };
        while sleep.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if self.state.open_streams() == 0 {
                let due = self.state.idle_since() + *timeout;
                if due <= now {
                    return true;
                }
                sleep.as_mut().reset(due);
            } else {
                sleep.as_mut().reset(now + *timeout);
            }
        }
        false
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo {
            tcp: self.tcp.clone(),
            state: self.state.clone(),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Connection<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Ok(()));
        }
        while let Some((sleep, grace)) = &mut this.age
            && sleep.as_mut().poll(cx).is_ready()
        {
            if let Some(grace) = grace.take() {
                // The GOAWAY goes out now; the streams in flight get the grace.
                count_closed(this.listener, "max_age");
                sleep.as_mut().reset(Instant::now() + grace);
                continue;
            }
            this.closed = true;
            count_closed(this.listener, "max_age_forced");
            tracing::debug!(peer = ?this.tcp.remote_addr, "connection closed: max age and grace passed");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the connection outlived its maximum age and grace",
            )));
        }
        if this.poll_idle(cx) {
            // End of input: the HTTP/2 server closes the connection (no stream is open).
            this.closed = true;
            count_closed(this.listener, "idle");
            tracing::debug!(peer = ?this.tcp.remote_addr, "connection closed: idle");
            return Poll::Ready(Ok(()));
        }
        if this.replay.has_remaining() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay[..n]);
            this.replay.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Connection<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// What an accept error means for the loop: `fd_limit` and `memory` pause accepting.
fn accept_error_kind(err: &io::Error) -> &'static str {
    crate::providers::error::local_io_fault(err).map_or("other", |f| f.label())
}

/// The connections of `listener` for tonic: accepted within the limits of `settings`, TLS
/// handshaken when `tls` is set, past the HTTP/2 preface. Handshakes run concurrently so a
/// slow or hostile client never stalls the loop. The accept task ends when the stream is
/// dropped (which also aborts the handshakes in progress).
///
/// With `http1` set, a connection that starts an HTTP/1.x request instead of the HTTP/2
/// preface is handed there (the console and the JSON mapping of the Admin API on the
/// listener that carries the Admin API); otherwise it is closed (`not_http2`).
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<TlsState>>,
    settings: ConnSettings,
    name: &'static str,
    http1: Option<Http1Sink>,
) -> BoxStream<'static, io::Result<Connection>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Connection>>(64);
    let stop = CancellationToken::new();
    let accept = tokio::spawn(accept_loop(
        listener,
        tls,
        settings,
        name,
        (tx, http1),
        stop.clone(),
    ));
    Box::pin(Incoming {
        rx,
        _guard: AbortOnDrop(accept, stop),
    })
}

/// Where a listener hands its HTTP/1.x connections (see [`incoming`]).
pub type Http1Sink = tokio::sync::mpsc::Sender<Connection>;

/// The HTTP/1.x connections [`incoming`] hands over, as an [`axum::serve::Listener`].
#[derive(Debug)]
pub struct Http1Listener {
    rx: tokio::sync::mpsc::Receiver<Connection>,
    local: std::net::SocketAddr,
}

impl Http1Listener {
    /// A sink for [`incoming`] and the listener that yields what it is sent; `local` is the
    /// listener's address.
    pub fn channel(local: std::net::SocketAddr) -> (Http1Sink, Self) {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        (tx, Self { rx, local })
    }
}

impl axum::serve::Listener for Http1Listener {
    type Io = Connection;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.rx.recv().await {
                Some(conn) => {
                    let peer = conn.tcp.remote_addr.unwrap_or(self.local);
                    return (conn, peer);
                }
                // The accept loop ended: no more connections, ever.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<TlsState>>,
    settings: ConnSettings,
    name: &'static str,
    (tx, http1): (
        tokio::sync::mpsc::Sender<io::Result<Connection>>,
        Option<Http1Sink>,
    ),
    stop: CancellationToken,
) {
    let open = Arc::new(AtomicUsize::new(0));
    let mut handshakes = JoinSet::new();
    let mut backoff = ACCEPT_BACKOFF.0;
    let mut paused: Option<Pin<Box<Sleep>>> = None;
    let max_age = settings
        .max_connection_age
        .map(|age| (age, settings.max_connection_age_grace));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tx.closed() => return,
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
            () = async { if let Some(p) = &mut paused { p.as_mut().await } }, if paused.is_some() => {
                paused = None;
            }
            accepted = listener.accept(), if paused.is_none() && handshakes.len() < MAX_HANDSHAKES => {
                let (tcp, peer) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        let kind = accept_error_kind(&e);
                        metrics::counter!(names::ACCEPT_ERRORS, "listener" => name, "kind" => kind)
                            .increment(1);
                        if kind == "other" {
                            // A connection that failed before we took it (e.g. reset).
                            tracing::debug!(listener = name, error = %e, "accept failed");
                            continue;
                        }
                        tracing::warn!(listener = name, error = %e, pause = ?backoff,
                            "cannot accept connections: out of resources; pausing accept");
                        paused = Some(Box::pin(tokio::time::sleep(backoff)));
                        backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                        continue;
                    }
                };
                backoff = ACCEPT_BACKOFF.0;
                let Some(slot) = Slot::take(&open, settings.max_connections, name) else {
                    metrics::counter!(names::CONNECTIONS_REFUSED, "listener" => name).increment(1);
                    tracing::debug!(listener = name, peer = %peer, "connection refused: max_connections reached");
                    drop(tcp);
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let tcp_info = TcpConnectInfo {
                    local_addr: tcp.local_addr().ok(),
                    remote_addr: Some(peer),
                };
                let acceptor = tls.as_ref().map(|t| t.acceptor());
                let tx = tx.clone();
                let http1 = http1.clone();
                let timeout = settings.handshake_timeout;
                let idle = settings.idle_timeout;
                handshakes.spawn(async move {
                    let start = handshake(tcp, acceptor, http1.is_some());
                    match tokio::time::timeout(timeout, start).await {
                        Ok(Ok((io, Start::Http2(replay)))) => {
                            let mut conn = Connection::new(io, replay, tcp_info, idle, max_age, name);
                            conn._slot = Some(slot);
                            let _ = tx.send(Ok(conn)).await;
                        }
                        Ok(Ok((io, Start::Http1(replay)))) => {
                            // No idle limit here: the HTTP/1 server keeps its own keep-alive,
                            // and these connections carry no HTTP/2 streams to count.
                            let mut conn =
                                Connection::new(io, replay, tcp_info, Duration::ZERO, max_age, name);
                            conn._slot = Some(slot);
                            if let Some(http1) = http1 {
                                let _ = http1.send(conn).await;
                            }
                        }
                        Ok(Err(failure)) => {
                            count_closed(name, failure.label());
                            tracing::debug!(listener = name, peer = %peer, reason = failure.label(), "connection closed in handshake");
                        }
                        Err(_) => {
                            count_closed(name, HandshakeFailure::Timeout.label());
                            tracing::debug!(listener = name, peer = %peer, "connection closed: handshake timed out");
                        }
                    }
                });
            }
        }
    }
}

async fn handshake(
    tcp: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    http1: bool,
) -> Result<(Conn, Start), HandshakeFailure> {
    let mut io = match tls {
        Some(acceptor) => Conn::Tls(Box::new(
            acceptor
                .accept(tcp)
                .await
                .map_err(|_| HandshakeFailure::Tls)?,
        )),
        None => Conn::Plain(tcp),
    };
    // Over TLS, ALPN says which protocol follows; `http/1.1` is offered only where an HTTP/1
    // server waits (see `tls`).
    let start = read_start(&mut io, http1).await?;
    Ok((io, start))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>, CancellationToken);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.1.cancel();
        self.0.abort();
    }
}

struct Incoming {
    rx: tokio::sync::mpsc::Receiver<io::Result<Connection>>,
    _guard: AbortOnDrop,
}

impl Stream for Incoming {
    type Item = io::Result<Connection>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

// -------------------------------------------------------------------------------------------
// Stream accounting and the drain of long-lived streams
// -------------------------------------------------------------------------------------------

/// Streams that stay open until the client ends them; the drain ends them instead.
const LONG_LIVED: [&str; 3] = [
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Counts the open streams of each connection (for the idle limit) and ends long-lived
/// streams with UNAVAILABLE once `drain` is cancelled (after whatever they have ready, such
/// as the health service's NOT_SERVING, is sent).
#[derive(Debug, Clone)]
pub struct StreamLayer {
    drain: CancellationToken,
}

impl StreamLayer {
    /// A layer whose long-lived streams end when `drain` is cancelled.
    pub fn new(drain: CancellationToken) -> Self {
        Self { drain }
    }
}

impl<S> tower::Layer<S> for StreamLayer {
    type Service = StreamService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        StreamService {
            inner,
            drain: self.drain.clone(),
        }
    }
}

/// The service of [`StreamLayer`].
#[derive(Debug, Clone)]
pub struct StreamService<S> {
    inner: S,
    drain: CancellationToken,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for StreamService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let guard = req
            .extensions()
            .get::<ConnInfo>()
            .map(|info| info.state.stream_started());
        let drain = LONG_LIVED
            .contains(&req.uri().path())
            .then(|| Box::pin(self.drain.clone().cancelled_owned()));
        let future = self.inner.call(req);
        Box::pin(async move {
            let response = future.await?;
            Ok(response.map(|inner| {
                tonic::body::Body::new(StreamBody {
                    inner,
                    _guard: guard,
                    drain,
                    ended: false,
                })
            }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds its stream's slot and may be ended by the drain.
    struct StreamBody<B> {
        #[pin]
        inner: B,
        _guard: Option<StreamGuard>,
        drain: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
        ended: bool,
    }
}

impl<B> HttpBody for StreamBody<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = Bytes;
    type Error = tonic::codegen::StdError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if let Some(drain) = this.drain
            && drain.as_mut().poll(cx).is_ready()
        {
            *this.ended = true;
            let mut trailers = http::HeaderMap::new();
            let status = tonic::Status::unavailable("the gateway is shutting down");
            if status.add_header(&mut trailers).is_err() {
                return Poll::Ready(None);
            }
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    fn settings_frame() -> Vec<u8> {
        let mut bytes = PREFACE.to_vec();
        // SETTINGS, 6 bytes: MAX_CONCURRENT_STREAMS = 100.
        bytes.extend_from_slice(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]);
        bytes
    }

    #[tokio::test]
    async fn the_preface_and_settings_are_read_and_kept() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let mut sent = settings_frame();
        sent.extend_from_slice(b"more");
        client.write_all(&sent).await.unwrap();
        let got = read_preface(&mut server).await.unwrap();
        assert!(sent.starts_with(&got));
        assert!(got.len() >= settings_frame().len());
    }

    #[tokio::test]
    async fn not_http2_is_refused_early() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(
            read_preface(&mut server).await,
            Err(HandshakeFailure::NotHttp2)
        );
        let (mut client, mut server) = tokio::io::duplex(1024);
        let mut bytes = PREFACE.to_vec();
        // A HEADERS frame first.
        bytes.extend_from_slice(&[0, 0, 0, 1, 4, 0, 0, 0, 1]);
        client.write_all(&bytes).await.unwrap();
        assert_eq!(
            read_preface(&mut server).await,
            Err(HandshakeFailure::NotHttp2)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn half_a_preface_times_out() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(&PREFACE[..10]).await.unwrap();
        let result = tokio::time::timeout(Duration::from_secs(10), read_preface(&mut server)).await;
        assert!(result.is_err(), "the handshake waits for the rest");
        drop(client);
        assert_eq!(
            read_preface(&mut server).await,
            Err(HandshakeFailure::Closed)
        );
    }

    fn connection(
        idle: Duration,
    ) -> (tokio::io::DuplexStream, Connection<tokio::io::DuplexStream>) {
        let (client, server) = tokio::io::duplex(1024);
        let tcp = TcpConnectInfo {
            local_addr: None,
            remote_addr: None,
        };
        let conn = Connection::new(server, Bytes::from_static(b"hi"), tcp, idle, None, "test");
        (client, conn)
    }

    #[tokio::test(start_paused = true)]
    async fn replays_then_closes_when_idle() {
        let (_client, mut conn) = connection(Duration::from_secs(60));
        let start = Instant::now();
        let mut buf = [0u8; 8];
        assert_eq!(conn.read(&mut buf).await.unwrap(), 2);
        assert_eq!(&buf[..2], b"hi");
        // Nothing arrives and no stream is open: end of input at the idle limit.
        assert_eq!(conn.read(&mut buf).await.unwrap(), 0);
        assert!(start.elapsed() >= Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_stream_keeps_the_connection() {
        let (_client, mut conn) = connection(Duration::from_secs(60));
        let mut buf = [0u8; 8];
        assert_eq!(conn.read(&mut buf).await.unwrap(), 2);
        let guard = conn.state().stream_started();
        let read = tokio::time::timeout(Duration::from_secs(600), conn.read(&mut buf)).await;
        assert!(read.is_err(), "no idle close while a stream is open");
        tokio::time::sleep(Duration::from_secs(30)).await;
        let ended = Instant::now();
        drop(guard);
        assert_eq!(conn.read(&mut buf).await.unwrap(), 0);
        assert!(ended.elapsed() >= Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn past_max_age_and_grace_the_connection_is_closed_even_with_a_stream() {
        let (_client, server) = tokio::io::duplex(1024);
        let tcp = TcpConnectInfo {
            local_addr: None,
            remote_addr: None,
        };
        let (age, grace) = (Duration::from_secs(60), Duration::from_secs(30));
        let mut conn = Connection::new(
            server,
            Bytes::new(),
            tcp,
            Duration::ZERO,
            Some((age, grace)),
            "test",
        );
        let _stream = conn.state().stream_started();
        let start = Instant::now();
        let mut buf = [0u8; 8];
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        assert!(start.elapsed() >= age + grace);
    }

    #[test]
    fn settings_validation_names_fields() {
        assert!(ConnSettings::default().validate().is_empty());
        let bad = ConnSettings {
            handshake_timeout: Duration::ZERO,
            max_connections: 0,
            max_connection_age: Some(Duration::from_millis(10)),
            connection_window_bytes: 1024,
            ..ConnSettings::default()
        };
        let fields: Vec<_> = bad.validate().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "handshake_timeout",
                "max_connections",
                "max_connection_age",
                "connection_window_bytes"
            ]
        );
    }

    #[test]
    fn config_file_problems_name_the_connections_field() {
        let load = |text: &str| {
            crate::config::Config::from_toml(
                text,
                std::path::Path::new("t.toml"),
                &crate::config::Overrides::default(),
                &|_| None,
            )
        };
        let config = load("[connections]\nidle_timeout = \"1m\"\n").unwrap();
        assert_eq!(config.connections.idle_timeout, Duration::from_secs(60));
        let Err(crate::config::ConfigError::Invalid(issues)) =
            load("[connections]\nmax_connections = 0\nhandshake_timeout = \"0s\"\n")
        else {
            panic!("invalid settings accepted");
        };
        let fields: Vec<_> = issues.iter().map(|i| i.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "connections.handshake_timeout",
                "connections.max_connections"
            ]
        );
        let Err(crate::config::ConfigError::Invalid(issues)) =
            load("[connections]\nhandshake_timeout = \"soon\"\n")
        else {
            panic!("a bad duration accepted");
        };
        assert!(issues[0].field.starts_with("connections"), "{issues:?}");
    }

    #[test]
    fn settings_parse_with_defaults_and_refuse_unknown_keys() {
        let s: ConnSettings =
            toml::from_str("idle_timeout = \"5m\"\nmax_connection_age = \"30m\"").unwrap();
        assert_eq!(s.idle_timeout, Duration::from_secs(300));
        assert_eq!(s.max_connection_age, Some(Duration::from_secs(1800)));
        assert_eq!(s.max_connections, ConnSettings::default().max_connections);
        assert!(toml::from_str::<ConnSettings>("max_conections = 3").is_err());
    }
}
