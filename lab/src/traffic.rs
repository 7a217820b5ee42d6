//! Traffic for drills and tests: HTTP backends that answer their name, a
//! client that records every request, a sampler of where an address is
//! configured, and the statistics of the gaps they show.
//!
//! The thread-based tools run inside a network namespace of a
//! [`crate::netns::Lab`] (or the caller's own with `ns` = `None` where
//! noted); [`HttpBackend`] runs on the caller's tokio runtime.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::netns::{enter_ns, has_addr, in_ns};

/// An HTTP server on 127.0.0.1 answering every request with `body` and
/// counting them; serves as long as the runtime it was started on. Bound
/// to port 0 and kept bound, so its port cannot race.
pub struct HttpBackend {
    pub port: u16,
    pub hits: Arc<AtomicU64>,
}

impl HttpBackend {
    pub async fn start(body: impl Into<String>) -> std::io::Result<HttpBackend> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let hits = Arc::new(AtomicU64::new(0));
        let (h, body) = (hits.clone(), body.into());
        let app = axum::Router::new().fallback(move || {
            let (h, body) = (h.clone(), body.clone());
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                body
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(HttpBackend { port, hits })
    }
}

/// Spawns a thread that calls `step` until it returns false, `stop` is set,
/// or `max` has passed.
fn bounded_loop(
    ns: Option<String>,
    stop: Arc<AtomicBool>,
    max: Duration,
    mut step: impl FnMut() -> bool + Send + 'static,
) {
    std::thread::spawn(move || {
        if let Some(ns) = ns {
            if let Err(e) = enter_ns(&ns) {
                eprintln!("netns: {e}");
                return;
            }
        }
        let deadline = Instant::now() + max;
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            if !step() {
                return;
            }
        }
    });
}

/// An HTTP backend answering `200 name` on `addr` inside `ns`, until `stop`
/// or `max`.
pub fn backend(
    ns: &str,
    addr: SocketAddr,
    name: &str,
    stop: Arc<AtomicBool>,
    max: Duration,
) -> Result<()> {
    let listener = in_ns(ns, || TcpListener::bind(addr))?.context("bind backend")?;
    listener.set_nonblocking(true)?;
    let name = name.to_string();
    bounded_loop(None, stop, max, move || {
        match listener.accept() {
            // A thread per connection: a half-open connection from a killed
            // balancer (its link cut, no FIN ever comes) must not hold up
            // the answers to the live one.
            Ok((s, _)) => {
                let name = name.clone();
                std::thread::spawn(move || answer(s, &name));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
        true
    });
    Ok(())
}

fn answer(mut s: TcpStream, name: &str) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 2048];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    if got.starts_with(b"GET /slow ") {
        std::thread::sleep(SLOW);
    }
    let _ = write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
        name.len()
    );
}

/// One client request: when it started and ended, and the backend that
/// answered (if it succeeded).
#[derive(Clone, Debug)]
pub struct Shot {
    pub start: Instant,
    pub at: Instant,
    pub served_by: Option<String>,
    /// Why it failed: the phase and the OS error (`connect: Connection
    /// refused (os error 111)`, `connect: timed out`, `read: ...`, `status: ...`).
    pub error: Option<String>,
}

/// How a [`client`] sends.
#[derive(Clone, Copy, Debug)]
pub struct ClientOpts {
    /// Concurrent workers; each waits `workers × interval` after a success,
    /// so the total rate is one request per `interval` while all goes well,
    /// and a failed connect is retried at once by the same worker.
    pub workers: u32,
    pub interval: Duration,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// `/`, or `/slow`: the backend answers after [`SLOW`], so a request
    /// is open on the balancer almost all the time.
    pub path: &'static str,
}

/// How long the backend takes to answer `GET /slow`.
pub const SLOW: Duration = Duration::from_millis(300);

/// Sends `GET /` to `target` from inside `ns` until `stop` or `max`.
pub fn client(
    ns: &str,
    target: SocketAddr,
    opts: ClientOpts,
    stop: Arc<AtomicBool>,
    max: Duration,
) -> Arc<Mutex<Vec<Shot>>> {
    let shots = Arc::new(Mutex::new(Vec::new()));
    for w in 0..opts.workers.max(1) {
        let out = shots.clone();
        let pause = opts.interval * opts.workers.max(1);
        // Stagger the workers so requests spread over the interval.
        let mut first = true;
        bounded_loop(Some(ns.to_string()), stop.clone(), max, move || {
            if first {
                first = false;
                std::thread::sleep(opts.interval * w);
            }
            let start = Instant::now();
            let answer = one_request(target, opts);
            let ok = answer.is_ok();
            if let Ok(mut s) = out.lock() {
                let (served_by, error) = match answer {
                    Ok(by) => (Some(by), None),
                    Err(e) => (None, Some(e)),
                };
                s.push(Shot {
                    start,
                    at: Instant::now(),
                    served_by,
                    error,
                });
            }
            // A fast failure (refused, unreachable) must not spin.
            std::thread::sleep(if ok { pause } else { opts.interval });
            true
        });
    }
    shots
}

/// One `GET /`: the backend's answer, or the phase that failed and why.
fn one_request(target: SocketAddr, opts: ClientOpts) -> std::result::Result<String, String> {
    fn phase(p: &'static str) -> impl Fn(std::io::Error) -> String {
        move |e| format!("{p}: {e}")
    }
    let mut s =
        TcpStream::connect_timeout(&target, opts.connect_timeout).map_err(phase("connect"))?;
    s.set_read_timeout(Some(opts.read_timeout))
        .map_err(phase("setup"))?;
    s.set_write_timeout(Some(opts.read_timeout))
        .map_err(phase("setup"))?;
    s.write_all(format!("GET {} HTTP/1.0\r\nHost: vip\r\n\r\n", opts.path).as_bytes())
        .map_err(phase("write"))?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(phase("read"))?;
    if !text.starts_with("HTTP/1.0 200") && !text.starts_with("HTTP/1.1 200") {
        let first = text.lines().next().unwrap_or("(nothing)");
        return Err(format!("status: {first}"));
    }
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.trim().to_string())
        .ok_or_else(|| "status: no body".to_string())
}

/// One sample of where an address is configured: `held[i]` for the i-th
/// namespace given to [`sampler`].
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    pub held: Vec<bool>,
}

impl Sample {
    pub fn holders(&self) -> usize {
        self.held.iter().filter(|h| **h).count()
    }
}

/// Checks every namespace in `namespaces` for `addr` every `period` until
/// `stop` or `max`.
pub fn sampler(
    namespaces: Vec<String>,
    addr: Ipv4Addr,
    period: Duration,
    stop: Arc<AtomicBool>,
    max: Duration,
) -> Arc<Mutex<Vec<Sample>>> {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let out = samples.clone();
    bounded_loop(None, stop, max, move || {
        let mut held = Vec::with_capacity(namespaces.len());
        for ns in &namespaces {
            if let Err(e) = enter_ns(ns) {
                eprintln!("netns sampler: {e}");
                return false;
            }
            held.push(has_addr(addr));
        }
        if let Ok(mut s) = out.lock() {
            s.push(Sample {
                at: Instant::now(),
                held,
            });
        }
        std::thread::sleep(period);
        true
    });
    samples
}

/// Longest time without a successful request in `[from, to]`, and how
/// many requests failed in it.
pub fn longest_gap(shots: &[Shot], from: Instant, to: Instant) -> (Duration, usize) {
    let mut last = from;
    let mut gap = Duration::ZERO;
    let mut failed = 0;
    for s in shots.iter().filter(|s| s.at >= from && s.at <= to) {
        if s.served_by.is_some() {
            gap = gap.max(s.at - last);
            last = s.at;
        } else {
            failed += 1;
        }
    }
    (gap.max(to.saturating_duration_since(last)), failed)
}

/// Successful requests that started after `since`, served by `by` when given.
pub fn served_since(shots: &Mutex<Vec<Shot>>, since: Instant, by: Option<&str>) -> usize {
    shots
        .lock()
        .map(|s| {
            s.iter()
                .filter(|s| s.start > since)
                .filter(|s| match (&s.served_by, by) {
                    (Some(got), Some(want)) => got == want,
                    (Some(_), None) => true,
                    (None, _) => false,
                })
                .count()
        })
        .unwrap_or(0)
}

/// The end of the first successful request that started after `since`.
pub fn first_success_after(shots: &Mutex<Vec<Shot>>, since: Instant) -> Option<Instant> {
    let s = shots.lock().ok()?;
    s.iter()
        .filter(|s| s.start > since && s.served_by.is_some())
        .map(|s| s.at)
        .min()
}
