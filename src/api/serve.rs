//! The API listener: our own accept loop over hyper, so that TLS, the
//! connection cap and the slow-client timeouts are ours to set. Certificates
//! reload from disk (SIGHUP, or a changed file) without a restart.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// How long in-flight requests get to finish once shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long an evicted connection may take to finish writing an answer.
const EVICT_GRACE: Duration = Duration::from_secs(1);
/// How often the certificate files are checked for changes.
const CERT_POLL: Duration = Duration::from_secs(1);

/// Connection limits: slow or idle clients cannot hold connections forever.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once. When full, a new connection closes an
    /// idle one (of the source address holding most); when none is idle,
    /// it waits in the kernel's accept backlog.
    pub max_connections: usize,
    /// Connections one source address may hold; more are closed at once.
    pub max_connections_per_ip: usize,
    /// How long a connection may take to send a complete request head,
    /// from connecting or from the first byte after its last request;
    /// HTTP/1 and HTTP/2 alike.
    pub header_read_timeout: Duration,
    /// A request running longer is answered 408.
    pub request_timeout: Duration,
    /// A connection with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// How long a client may take to complete the TLS handshake.
    pub tls_handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_connections_per_ip: 128,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            tls_handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// PEM files for HTTPS: a certificate chain (leaf first) and its private key
/// (PKCS#8, RSA or EC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("read {path}: {source}")]
    ReadFile { path: String, source: io::Error },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: String },
    #[error("{path}: no PEM private key (PKCS#8, RSA or EC) found")]
    NoKey { path: String },
    #[error("{path}: bad PEM: {reason}")]
    Pem { path: String, reason: String },
    #[error("certificate {cert} with key {key}: {source}")]
    CertifiedKey {
        cert: String,
        key: String,
        source: rustls::Error,
    },
    #[error("TLS settings: {0}")]
    TlsConfig(rustls::Error),
    #[error("listen for SIGHUP: {0}")]
    Signal(io::Error),
}

/// Serves `app` on `listener` until `shutdown` turns true, then lets
/// in-flight requests finish for up to 5 s. Every request carries the
/// peer's address as [`ConnectInfo<SocketAddr>`].
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsSettings>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ServeError> {
    let acceptor = match &tls {
        Some(tls) => Some(tls_acceptor(tls, shutdown.clone())?),
        None => None,
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let shared = Arc::new(Shared {
        builder,
        app,
        acceptor,
        limits: limits.clone(),
    });
    let table = Arc::new(Mutex::new(Table::default()));
    // Told when a connection ends: room for one waiting in the backlog.
    let room = Arc::new(tokio::sync::Notify::new());
    let mut refused = RateLimitedWarn::default();
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, or a connection reset before we
                // got to it: back off a little instead of spinning.
                tracing::warn!(cause = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ip = peer.ip();
        let over_ip = {
            let t = table.lock().unwrap_or_else(|p| p.into_inner());
            t.per_ip.get(&ip).copied().unwrap_or(0) >= limits.max_connections_per_ip
        };
        if over_ip {
            // Dropping the stream closes it: one address cannot take the
            // slots every other client needs.
            refused.warn(ip, limits.max_connections_per_ip);
            continue;
        }
        // Make room by closing an idle connection rather than letting silent
        // ones starve clients with something to say; the new connection is
        // served at once (the closing one leaves the count as it is asked
        // to go). With every connection busy, further clients wait in the
        // kernel's backlog; we look again as connections end.
        let admitted = loop {
            {
                let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
                if t.conns.len() < limits.max_connections || t.evict_one() {
                    break true;
                }
            }
            tokio::select! {
                _ = room.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = shutdown.wait_for(|s| *s) => break false,
            }
        };
        if !admitted {
            break;
        }
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let slot = Slot::take(&table, &room, ip, activity.clone());
        let conn = Connection {
            shared: shared.clone(),
            peer,
            shutdown: shutdown.clone(),
            activity,
            _slot: slot,
        };
        connections.spawn(conn.run(stream));
    }
    drop(listener);
    tracing::debug!(open = connections.len(), "stopped accepting");
    // Each connection finishes its requests and closes (it saw the same
    // shutdown signal); whatever is left after the grace period is cut.
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drained).await.is_err() {
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace period; closing them");
    }
    connections.abort_all();
    Ok(())
}

/// The open connections, for the per-address limit and eviction.
#[derive(Default)]
struct Table {
    next: u64,
    conns: HashMap<u64, (IpAddr, Arc<Activity>)>,
    per_ip: HashMap<IpAddr, usize>,
}

impl Table {
    /// Asks the oldest idle connection of the address holding the most
    /// connections to close. False when every connection is busy.
    fn evict_one(&mut self) -> bool {
        let victim = self
            .conns
            .iter()
            .filter(|(_, (_, a))| a.evictable())
            .max_by_key(|(id, (ip, _))| {
                (self.per_ip.get(ip).copied().unwrap_or(0), u64::MAX - **id)
            })
            .map(|(id, _)| *id);
        match victim.and_then(|id| self.conns.remove(&id)) {
            Some((ip, activity)) => {
                self.forget_ip(ip);
                activity.close.notify_one();
                true
            }
            None => false,
        }
    }

    fn forget_ip(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }
}

/// A connection's entry in the [`Table`], removed when the task ends.
struct Slot {
    table: Arc<Mutex<Table>>,
    room: Arc<tokio::sync::Notify>,
    id: u64,
}

impl Slot {
    fn take(
        table: &Arc<Mutex<Table>>,
        room: &Arc<tokio::sync::Notify>,
        ip: IpAddr,
        activity: Arc<Activity>,
    ) -> Slot {
        let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
        let id = t.next;
        t.next += 1;
        t.conns.insert(id, (ip, activity));
        *t.per_ip.entry(ip).or_default() += 1;
        Slot {
            table: table.clone(),
            room: room.clone(),
            id,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        // An evicted connection was removed already.
        if let Some((ip, _)) = t.conns.remove(&self.id) {
            t.forget_ip(ip);
        }
        drop(t);
        self.room.notify_one();
    }
}

/// One warning per address and minute, however many connections it tries.
#[derive(Default)]
struct RateLimitedWarn {
    last: HashMap<IpAddr, Instant>,
}

impl RateLimitedWarn {
    fn warn(&mut self, ip: IpAddr, limit: usize) {
        let now = Instant::now();
        if self.last.len() > 10_000 {
            self.last
                .retain(|_, t| now.duration_since(*t) < Duration::from_secs(60));
        }
        let due = self
            .last
            .get(&ip)
            .is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(60));
        if due {
            self.last.insert(ip, now);
            tracing::warn!(%ip, limit, "closing connections from an address over its connection limit");
        }
    }
}

/// What every connection task needs.
struct Shared {
    builder: auto::Builder<TokioExecutor>,
    app: Router,
    acceptor: Option<TlsAcceptor>,
    limits: Limits,
}

struct Connection {
    shared: Arc<Shared>,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
    activity: Arc<Activity>,
    /// Leaves the connection table when the task ends.
    _slot: Slot,
}

impl Connection {
    /// Runs on its own task, so a slow TLS handshake never holds up accepting.
    async fn run(mut self, stream: TcpStream) {
        let activity = self.activity.clone();
        let stream = Tracked {
            inner: stream,
            activity: activity.clone(),
        };
        let Some(acceptor) = self.shared.acceptor.clone() else {
            return self.http(stream, activity).await;
        };
        let limit = self.shared.limits.tls_handshake_timeout;
        let handshake = tokio::time::timeout(limit, acceptor.accept(stream));
        let tls = tokio::select! {
            r = handshake => match r {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %self.peer, cause = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %self.peer, ?limit, "TLS handshake timed out");
                    return;
                }
            },
            _ = self.shutdown.wait_for(|s| *s) => return,
            _ = activity.close.notified() => return,
        };
        self.http(tls, activity).await
    }

    async fn http<I>(self, io: I, activity: Arc<Activity>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            shared,
            peer,
            mut shutdown,
            ..
        } = self;
        let limits = &shared.limits;
        let request_timeout = limits.request_timeout;
        let app = shared.app.clone();
        let busy = activity.clone();
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            let app = app.clone();
            let guard = busy.begin();
            async move {
                let resp = match tokio::time::timeout(request_timeout, app.oneshot(req)).await {
                    Ok(Ok(resp)) => resp,
                    Ok(Err(never)) => match never {},
                    Err(_) => timed_out(request_timeout),
                };
                drop(guard);
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = shared.builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let grace = tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, cause = %e, "connection ended with an error");
                }
                return;
            }
            why = activity.expired(limits.header_read_timeout, limits.idle_timeout) => {
                // Nothing in flight: just close.
                tracing::debug!(%peer, why, "closed a connection");
                return;
            }
            _ = activity.close.notified() => {
                tracing::debug!(%peer, "closing an idle connection to make room");
                if !activity.served.load(Ordering::Relaxed) {
                    return;
                }
                EVICT_GRACE
            }
            _ = shutdown.wait_for(|s| *s) => SHUTDOWN_GRACE,
        };
        // A response being written still reaches its client.
        conn.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(grace, conn).await;
    }
}

/// 408 in the API's error shape.
fn timed_out(limit: Duration) -> Response {
    let body = crate::views::ErrorBody {
        error: format!("request took longer than {} ms", limit.as_millis()),
        detail: None,
    };
    (StatusCode::REQUEST_TIMEOUT, Json(body)).into_response()
}

/// When a connection last moved a byte, how many of its requests are being
/// handled (a slow handler is bounded by the request timeout, not the idle
/// one), and since when it owes us a request head.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    busy: AtomicUsize,
    /// Milliseconds after `start` since which a request head is awaited;
    /// [`NOT_WAITING`] while none is (a request runs, or nothing arrived
    /// since the last one ended).
    waiting_ms: AtomicU64,
    /// Asks the connection to close (eviction).
    close: tokio::sync::Notify,
    /// Whether any request started on it: one that never asked anything
    /// has no answer to finish when it is closed.
    served: std::sync::atomic::AtomicBool,
}

const NOT_WAITING: u64 = u64::MAX;

struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            // A new connection owes its first request head at once.
            waiting_ms: AtomicU64::new(0),
            close: tokio::sync::Notify::new(),
            served: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last_ms.fetch_max(self.now_ms(), Ordering::Relaxed);
    }

    /// Bytes arrived: between requests they start the head clock.
    fn received(&self) {
        self.touch();
        if self.busy.load(Ordering::Relaxed) == 0 {
            let _ = self.waiting_ms.compare_exchange(
                NOT_WAITING,
                self.now_ms(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.waiting_ms.store(NOT_WAITING, Ordering::Relaxed);
        self.served.store(true, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// True when no request runs on this connection.
    fn evictable(&self) -> bool {
        self.busy.load(Ordering::Relaxed) == 0
    }

    /// Resolves once the connection owed a request head for `head`, or
    /// moved nothing for `idle`, while no request was running.
    async fn expired(&self, head: Duration, idle: Duration) -> &'static str {
        let (head, idle) = (head.as_millis() as u64, idle.as_millis() as u64);
        loop {
            let now = self.now_ms();
            let next = if self.busy.load(Ordering::Relaxed) > 0 {
                now + head.min(idle)
            } else {
                let waiting = self.waiting_ms.load(Ordering::Relaxed);
                let head_due = waiting.saturating_add(head);
                let idle_due = self.last_ms.load(Ordering::Relaxed).saturating_add(idle);
                if waiting != NOT_WAITING && now >= head_due {
                    return "no complete request head in time";
                }
                if now >= idle_due {
                    return "idle";
                }
                if waiting != NOT_WAITING {
                    head_due.min(idle_due)
                } else {
                    idle_due
                }
            };
            let at = self.start + Duration::from_millis(next.max(now + 1));
            tokio::time::sleep_until(at.into()).await;
        }
    }
}

/// A socket that records in [`Activity`] every time bytes move.
struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.received();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The crypto provider reqwest's rustls already uses.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads and checks the certificate and key as serving would; for start-up
/// validation, so a bad file is a one-line error before anything starts.
pub fn check_tls(tls: &TlsSettings) -> Result<(), ServeError> {
    load_certified_key(tls, &provider()).map(|_| ())
}

fn load_certified_key(
    tls: &TlsSettings,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, ServeError> {
    let cert_pem = read(&tls.cert)?;
    let key_pem = read(&tls.key)?;
    let pem_err = |path: &Path, e: rustls_pki_types::pem::Error| ServeError::Pem {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(&tls.cert, e))?;
    if chain.is_empty() {
        return Err(ServeError::NoCertificate {
            path: tls.cert.display().to_string(),
        });
    }
    let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(key) => key,
        Err(rustls_pki_types::pem::Error::NoItemsFound) => {
            return Err(ServeError::NoKey {
                path: tls.key.display().to_string(),
            })
        }
        Err(e) => return Err(pem_err(&tls.key, e)),
    };
    CertifiedKey::from_der(chain, key, provider).map_err(|source| ServeError::CertifiedKey {
        cert: tls.cert.display().to_string(),
        key: tls.key.display().to_string(),
        source,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, ServeError> {
    std::fs::read(path).map_err(|source| ServeError::ReadFile {
        path: path.display().to_string(),
        source,
    })
}

/// Hands every handshake the certificate loaded last.
#[derive(Debug)]
struct Reloading {
    current: RwLock<Arc<CertifiedKey>>,
}

impl Reloading {
    fn set(&self, key: CertifiedKey) {
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        *cur = Arc::new(key);
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let cur = self.current.read().unwrap_or_else(|e| e.into_inner());
        Some(cur.clone())
    }
}

/// Loads the certificate (failing start-up if it is bad) and starts the
/// task that reloads it.
fn tls_acceptor(
    tls: &TlsSettings,
    shutdown: watch::Receiver<bool>,
) -> Result<TlsAcceptor, ServeError> {
    let provider = provider();
    let key = load_certified_key(tls, &provider)?;
    let resolver = Arc::new(Reloading {
        current: RwLock::new(Arc::new(key)),
    });
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(ServeError::TlsConfig)?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(ServeError::Signal)?;
    tokio::spawn(reload_certs(
        tls.clone(),
        resolver,
        provider,
        hangup,
        shutdown,
    ));
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Identifies a file version: its mtime and inode (a replaced file has a
/// new inode even if the mtime was kept).
fn fingerprint(tls: &TlsSettings) -> [Option<(SystemTime, u64)>; 2] {
    use std::os::unix::fs::MetadataExt;
    let one = |p: &Path| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.ino()))
    };
    [one(&tls.cert), one(&tls.key)]
}

/// Reloads on SIGHUP and when either file changes. A reload that fails
/// keeps the certificate being served; the next change tries again.
#[tracing::instrument(skip_all, fields(cert = %tls.cert.display()))]
async fn reload_certs(
    tls: TlsSettings,
    resolver: Arc<Reloading>,
    provider: Arc<CryptoProvider>,
    mut hangup: tokio::signal::unix::Signal,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut seen = fingerprint(&tls);
    let mut tick = tokio::time::interval(CERT_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let trigger = tokio::select! {
            _ = hangup.recv() => "SIGHUP",
            _ = tick.tick() => "file change",
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let now = fingerprint(&tls);
        if trigger == "file change" && now == seen {
            continue;
        }
        seen = now;
        match load_certified_key(&tls, &provider) {
            Ok(key) => {
                resolver.set(key);
                tracing::info!(trigger, "reloaded the TLS certificate");
            }
            Err(e) => {
                tracing::error!(trigger, cause = %e, "TLS certificate reload failed; still serving the previous certificate");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Server {
        addr: SocketAddr,
        stop: watch::Sender<bool>,
        done: tokio::task::JoinHandle<Result<(), ServeError>>,
    }

    async fn start(app: Router, limits: Limits) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = watch::channel(false);
        let done = tokio::spawn(serve(listener, app, None, limits, rx));
        Server { addr, stop, done }
    }

    fn app() -> Router {
        Router::new()
            .route(
                "/peer",
                get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
            )
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    "done"
                }),
            )
    }

    /// Reads until EOF or error; true if the server closed within `within`.
    async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 1024];
        let read_all = async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(within, read_all).await.is_ok()
    }

    #[tokio::test]
    async fn requests_carry_the_peer_address_and_time_out_as_json() {
        let limits = Limits {
            request_timeout: Duration::from_millis(100),
            ..Limits::default()
        };
        let s = start(app(), limits).await;
        let http = reqwest::Client::new();
        let peer = http
            .get(format!("http://{}/peer", s.addr))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(peer.starts_with("127.0.0.1:"), "{peer}");
        let r = http
            .get(format!("http://{}/slow", s.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 408);
        let v: crate::views::ErrorBody = r.json().await.unwrap();
        assert!(v.error.contains("100 ms"), "{v:?}");
        assert_eq!(v.detail, None);
    }

    #[tokio::test]
    async fn slow_headers_and_idle_connections_are_closed() {
        let headers = start(
            app(),
            Limits {
                header_read_timeout: Duration::from_millis(200),
                ..Limits::default()
            },
        )
        .await;
        let mut half = TcpStream::connect(headers.addr).await.unwrap();
        half.write_all(b"GET /peer HT").await.unwrap();
        assert!(closed_within(&mut half, Duration::from_secs(5)).await);

        let idle = start(
            app(),
            Limits {
                idle_timeout: Duration::from_millis(200),
                ..Limits::default()
            },
        )
        .await;
        let mut silent = TcpStream::connect(idle.addr).await.unwrap();
        assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
        // A kept-alive connection that went quiet after a request, too.
        let mut quiet = TcpStream::connect(idle.addr).await.unwrap();
        quiet
            .write_all(b"GET /peer HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(closed_within(&mut quiet, Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn over_the_cap_an_idle_connection_makes_room_and_a_busy_one_does_not() {
        let limits = Limits {
            max_connections: 1,
            ..Limits::default()
        };
        let s = start(app(), limits).await;
        // Busy: a slow request in flight keeps its slot.
        let mut holder = TcpStream::connect(s.addr).await.unwrap();
        holder
            .write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let url = format!("http://{}/peer", s.addr);
        let mut waiting = tokio::spawn(async move { reqwest::get(url).await.map(|r| r.status()) });
        assert!(
            tokio::time::timeout(Duration::from_millis(250), &mut waiting)
                .await
                .is_err(),
            "served over the cap while the only connection was busy"
        );
        // The slow request still gets its whole answer...
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), holder.read(&mut buf))
            .await
            .expect("answer")
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("done"));
        // ...and once idle, the holder is closed for the waiting client.
        let status = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("served once the holder was idle")
            .unwrap()
            .unwrap();
        assert_eq!(status, 200);
        assert!(closed_within(&mut holder, Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn one_address_cannot_take_every_slot() {
        let limits = Limits {
            max_connections_per_ip: 2,
            ..Limits::default()
        };
        let s = start(app(), limits).await;
        let _a = TcpStream::connect(s.addr).await.unwrap();
        let _b = TcpStream::connect(s.addr).await.unwrap();
        let mut third = TcpStream::connect(s.addr).await.unwrap();
        assert!(closed_within(&mut third, Duration::from_secs(5)).await);
        // Another address is still served.
        let other = tokio::net::TcpSocket::new_v4().unwrap();
        other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut conn = other.connect(s.addr).await.unwrap();
        conn.write_all(b"GET /peer HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).await.unwrap();
        assert!(text.contains("127.0.0.2:"), "{text}");
    }

    #[tokio::test]
    async fn http2_and_silent_connections_owe_a_request_head_in_time() {
        let limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let s = start(app(), limits).await;
        // An HTTP/2 preface, a byte at a time, slower than the timeout allows.
        let mut dribbler = TcpStream::connect(s.addr).await.unwrap();
        let started = Instant::now();
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let mut closed = false;
        for b in preface.iter().cycle().take(200) {
            if dribbler.write_all(&[*b]).await.is_err() {
                closed = true;
                break;
            }
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::from_millis(50), dribbler.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed = true;
                    break;
                }
                _ => {}
            }
        }
        assert!(closed, "a dribbling HTTP/2 client was never closed");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        // A connection that says nothing at all owes its head too.
        let mut silent = TcpStream::connect(s.addr).await.unwrap();
        let started = Instant::now();
        assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
        assert!(started.elapsed() < Duration::from_secs(2));
        // A real HTTP/2 client is served.
        let h2 = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap();
        let r = h2
            .get(format!("http://{}/peer", s.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.status(), 200);
    }

    #[tokio::test]
    async fn shutdown_lets_in_flight_requests_finish() {
        let entered = Arc::new(tokio::sync::Notify::new());
        let signal = entered.clone();
        let app = Router::new().route(
            "/slow",
            get(move || async move {
                signal.notify_one();
                tokio::time::sleep(Duration::from_millis(300)).await;
                "done"
            }),
        );
        let s = start(app, Limits::default()).await;
        let url = format!("http://{}/slow", s.addr);
        let in_flight = tokio::spawn(async move { reqwest::get(url).await.map(|r| r.status()) });
        entered.notified().await;
        let _ = s.stop.send(true);
        let served = tokio::time::timeout(Duration::from_secs(5), in_flight)
            .await
            .expect("in-flight request finished")
            .unwrap();
        assert_eq!(served.unwrap(), 200);
        tokio::time::timeout(Duration::from_secs(6), s.done)
            .await
            .expect("serve returned")
            .unwrap()
            .unwrap();
        assert!(TcpStream::connect(s.addr).await.is_err(), "still accepting");
    }

    #[test]
    fn bad_tls_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let tls = TlsSettings {
            cert: cert.clone(),
            key: key.clone(),
        };
        let e = check_tls(&tls).unwrap_err().to_string();
        assert!(e.starts_with("read ") && e.contains("cert.pem"), "{e}");
        std::fs::write(&cert, "not a certificate\n").unwrap();
        std::fs::write(&key, "not a key\n").unwrap();
        let e = check_tls(&tls).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
    }
}
