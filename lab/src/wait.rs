//! Waiting for a condition with a deadline, never for a fixed time: a fast
//! machine goes on at once, a slow one gets the whole deadline.

use std::future::Future;
use std::time::{Duration, Instant};

/// A wait that reached its deadline; names what was awaited. An error
/// type rather than a `String` so `?` carries it into `anyhow`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedOut {
    pub what: String,
    pub within: Duration,
}

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "timed out after {:?} waiting for {}",
            self.within, self.what
        )
    }
}

impl std::error::Error for TimedOut {}

/// How often the condition is tried: far below every wait we bound, and
/// cheap (a local HTTP request or a file read).
pub const EVERY: Duration = Duration::from_millis(20);

/// Tries `f` every [`EVERY`] until it returns `Some`; at the deadline an
/// error naming `what`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, f: F) -> Result<T, TimedOut>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_every(within, EVERY, what, f).await
}

/// [`eventually`] trying every `every` (a benchmark measuring latency
/// polls finer).
pub async fn eventually_every<T, F, Fut>(
    within: Duration,
    every: Duration,
    what: &str,
    mut f: F,
) -> Result<T, TimedOut>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(TimedOut {
                what: what.to_string(),
                within,
            });
        }
        tokio::time::sleep(every).await;
    }
}

/// [`eventually`] for code without a runtime (threads in a namespace).
pub fn poll<T>(within: Duration, what: &str, f: impl FnMut() -> Option<T>) -> Result<T, TimedOut> {
    poll_every(within, EVERY, what, f)
}

/// [`poll`] trying every `every`.
pub fn poll_every<T>(
    within: Duration,
    every: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, TimedOut> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(TimedOut {
                what: what.to_string(),
                within,
            });
        }
        std::thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn eventually_fails_at_its_deadline_naming_what() {
        let t = Instant::now();
        let r: Result<(), TimedOut> =
            eventually(Duration::from_millis(100), "nothing", || async { None }).await;
        let took = t.elapsed();
        assert_eq!(
            r.unwrap_err().to_string(),
            "timed out after 100ms waiting for nothing"
        );
        assert!(took >= Duration::from_millis(100), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[tokio::test]
    async fn eventually_returns_the_first_some() {
        let mut n = 0;
        let v = eventually(Duration::from_secs(5), "three tries", || {
            n += 1;
            let now = n;
            async move { (now >= 3).then_some(now) }
        })
        .await;
        assert_eq!(v.unwrap(), 3);
    }

    #[test]
    fn poll_fails_at_its_deadline() {
        let t = Instant::now();
        let r: Result<(), TimedOut> = poll(Duration::from_millis(50), "never", || None);
        assert_eq!(r.unwrap_err().what, "never");
        assert!(t.elapsed() >= Duration::from_millis(50));
    }
}
