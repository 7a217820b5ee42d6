//! Who is calling: bearer tokens from the token file (admin), the 2010
//! legacy password (`register:*`), and replicated tokens with scopes; plus a
//! per-source limit on failed authentication.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header;
use axum::http::request::Parts;

use super::{ApiError, AppState};
use crate::auth::{constant_time_eq, sha256_hex, token_id, Need, Scope};
use crate::model::Registry;

/// Secrets from files, each with the scope it grants.
/// Secrets from files, each with the scope it grants; replaced whole on SIGHUP.
#[derive(Debug, Default)]
pub struct Tokens {
    secrets: std::sync::RwLock<Vec<(Vec<u8>, Scope, &'static str)>>,
}

/// Lines of a token file: blank lines and `#` comments skipped.
pub fn token_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

impl Tokens {
    /// `admin` is the token file; `legacy` the 2010 password file, if any.
    pub fn new(admin: &str, legacy: Option<&str>) -> Tokens {
        let mut secrets: Vec<(Vec<u8>, Scope, &'static str)> = token_lines(admin)
            .map(|l| (l.as_bytes().to_vec(), Scope::Admin, "bootstrap"))
            .collect();
        let any = Scope::Register {
            service: "*".into(),
            members: None,
        };
        for l in legacy.into_iter().flat_map(token_lines) {
            secrets.push((l.as_bytes().to_vec(), any.clone(), "legacy"));
        }
        Tokens {
            secrets: std::sync::RwLock::new(secrets),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.read().map(|s| s.is_empty()).unwrap_or(true)
    }

    /// Takes the secrets of `other` (a re-read of the files).
    pub fn replace(&self, other: Tokens) {
        let new = other
            .secrets
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        *self.secrets.write().unwrap_or_else(|p| p.into_inner()) = new;
    }

    /// The scope and id of `presented`, checking every file secret without
    /// stopping early, then the replicated tokens.
    fn resolve(
        &self,
        presented: &str,
        registry: &Registry,
        now_ms: u64,
    ) -> Result<(String, Scope), &'static str> {
        let mut found = None;
        let secrets = self.secrets.read().unwrap_or_else(|p| p.into_inner());
        for (secret, scope, id) in secrets.iter() {
            if constant_time_eq(secret, presented.as_bytes()) {
                found = Some((id.to_string(), scope.clone()));
            }
        }
        drop(secrets);
        if let Some(f) = found {
            return Ok(f);
        }
        let id = token_id(presented).ok_or("unknown token")?;
        let token = registry.tokens.get(id).ok_or("unknown or revoked token")?;
        if !constant_time_eq(
            token.hash.as_bytes(),
            sha256_hex(presented.as_bytes()).as_bytes(),
        ) {
            return Err("unknown token");
        }
        if token.expires_at_ms.is_some_and(|exp| now_ms >= exp) {
            return Err("token expired");
        }
        Ok((id.to_string(), token.scope.clone()))
    }
}

/// Failed authentications per source address, in fixed windows.
#[derive(Debug)]
pub struct FailureLimit {
    max_failures: u32,
    window: Duration,
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl FailureLimit {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        Self {
            max_failures,
            window,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(seconds to wait)` while `ip` is over its limit.
    fn blocked(&self, ip: IpAddr) -> Option<u64> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let (start, n) = seen.get(&ip)?;
        let left = self.window.checked_sub(start.elapsed())?;
        (*n >= self.max_failures).then(|| left.as_secs().max(1))
    }

    fn failed(&self, ip: IpAddr) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded memory: forget finished windows when the map grows.
        if seen.len() > 10_000 {
            let window = self.window;
            seen.retain(|_, (start, _)| start.elapsed() < window);
        }
        let entry = seen.entry(ip).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= self.window {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Token id, `bootstrap` or `legacy`: what the audit history records.
    pub id: String,
    pub scope: Scope,
}

impl Principal {
    /// 403 unless the caller's scope allows `need`.
    pub fn require(&self, need: Need<'_>) -> Result<(), ApiError> {
        if self.scope.allows(need) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "scope {} does not allow this request",
                self.scope
            )))
        }
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        if let Some(wait) = state.auth_failures.blocked(ip) {
            return Err(ApiError::TooManyRequests {
                retry_after_s: wait,
            });
        }
        let presented = match bearer(&parts.headers) {
            Ok(p) => p,
            Err(e) => return Err(e),
        };
        let registry = state.consensus.applied().registry.clone();
        let result = match presented {
            Some(p) => state.tokens.resolve(p, &registry, super::now_ms()),
            None => Err("missing bearer token"),
        };
        match result {
            Ok((id, scope)) => Ok(Principal { id, scope }),
            Err(why) => {
                state.auth_failures.failed(ip);
                tracing::info!(%ip, why, "authentication failed");
                Err(ApiError::Unauthorized(why))
            }
        }
    }
}

/// The bearer token of a request, if any. Two `Authorization` headers are
/// a 400 (which one a proxy and we would pick could differ); the scheme is
/// matched case-insensitively (RFC 7235).
fn bearer(headers: &axum::http::HeaderMap) -> Result<Option<&str>, ApiError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::BadRequest {
            message: "more than one Authorization header".into(),
            status: axum::http::StatusCode::BAD_REQUEST,
        });
    }
    let Ok(text) = value.to_str() else {
        return Ok(None);
    };
    let Some((scheme, token)) = text.trim().split_once(' ') else {
        return Ok(None);
    };
    Ok(scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim()))
}
