//! Floods cannot starve the cluster: 1,100 silent client connections and
//! 300 HTTP/2-preface dribblers against a follower's client listener, more
//! than its connection cap. `/healthz` still answers within a second, a
//! write through that follower still reaches the leader (peers have their
//! own listener), the dribblers are closed at the header timeout, and the
//! node's memory stays bounded. Every flood task stops by itself.

#[path = "cluster/harness.rs"]
mod harness;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use harness::{ClusterExt, NodeExt};
use lab::Cluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const SILENT: usize = 1_100;
const DRIBBLERS: usize = 300;
/// Connections per source address: under the default per-address cap, so
/// the cap on the whole listener is what the flood meets.
const PER_SOURCE: usize = 100;
const HEADER_TIMEOUT_MS: u64 = 3_000;
/// No flood task lives longer than this.
const FLOOD_MAX: Duration = Duration::from_secs(15);

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Every connection is a descriptor on both ends.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// A connection from 127.0.0.`source`.
async fn connect_from(source: u8, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, source)),
        0,
    ))?;
    s.connect(to).await
}

/// True once the server closed `s` (EOF or reset), polled without blocking long.
async fn is_closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_and_dribbling_clients_starves_nothing() {
    raise_fd_limit();
    let c = Cluster::start_with(
        3,
        &["--header-read-timeout-ms", &HEADER_TIMEOUT_MS.to_string()],
    )
    .await;
    let leader = c.leader(Duration::from_secs(10)).await;
    let f = c.node(c.followers(leader)[0]);
    let target: SocketAddr = f.addr.parse().unwrap();
    let pid = f.pid().unwrap();
    let idle_rss = rss_kib(pid);

    // 1,100 silent connections from 11 addresses.
    let mut silent = Vec::with_capacity(SILENT);
    for i in 0..SILENT {
        let source = 2 + (i / PER_SOURCE) as u8;
        if let Ok(s) = connect_from(source, target).await {
            silent.push(s);
        }
    }
    // 300 dribblers: an HTTP/2 preface a byte every 200 ms, from 3 more.
    let flood_start = Instant::now();
    let mut dribblers = tokio::task::JoinSet::new();
    for i in 0..DRIBBLERS {
        let source = 20 + (i / PER_SOURCE) as u8;
        dribblers.spawn(async move {
            let started = Instant::now();
            let Ok(mut s) = connect_from(source, target).await else {
                return None;
            };
            let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
            for b in preface.iter().cycle() {
                if started.elapsed() > FLOOD_MAX {
                    return None;
                }
                if s.write_all(&[*b]).await.is_err() || is_closed(&mut s).await {
                    return Some(started.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            None
        });
    }

    // While it lasts: /healthz from another address answers within 1 s...
    let t = Instant::now();
    let health = tokio::time::timeout(Duration::from_secs(1), f.healthy()).await;
    assert!(
        matches!(health, Ok(true)),
        "/healthz under the flood: {health:?} after {:?}",
        t.elapsed()
    );
    eprintln!("/healthz under the flood: {:?}", t.elapsed());
    // ...a write through the flooded follower reaches the leader...
    let t = Instant::now();
    f.client()
        .register("http", "during-flood", "10.0.0.1", None, None, None)
        .await
        .expect("a write through the flooded follower");
    eprintln!("write through the flooded follower: {:?}", t.elapsed());
    // ...and memory stays bounded.
    let flood_rss = rss_kib(pid);
    eprintln!("RSS idle {idle_rss} KiB, under the flood {flood_rss} KiB");
    assert!(
        flood_rss.saturating_sub(idle_rss) < 64 * 1024,
        "RSS grew from {idle_rss} to {flood_rss} KiB"
    );

    // Every dribbler is closed at the header timeout, not before it and not
    // much after (a busy machine gets a margin).
    let mut closed = Vec::new();
    while let Some(r) = dribblers.join_next().await {
        closed.push(r.unwrap());
    }
    let never = closed.iter().filter(|c| c.is_none()).count();
    assert_eq!(never, 0, "{never} dribblers were never closed");
    let latest = closed.iter().flatten().max().copied().unwrap();
    assert!(
        latest < Duration::from_millis(HEADER_TIMEOUT_MS + 3_000),
        "a dribbler lived {latest:?}"
    );
    eprintln!(
        "dribblers closed by {latest:?} (header timeout {HEADER_TIMEOUT_MS} ms), flood took {:?}",
        flood_start.elapsed()
    );
    // And so is every silent connection (evicted for others, or timed out).
    let deadline = Instant::now() + Duration::from_millis(HEADER_TIMEOUT_MS + 3_000);
    loop {
        let mut open = 0;
        for s in &mut silent {
            if !is_closed(s).await {
                open += 1;
            }
        }
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} silent connections still open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
