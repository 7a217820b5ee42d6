//! Typed HTTP client for the API, used by the CLI and the tests. Tries each
//! server in turn until one answers.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::views::{
    AddNodeBody, Audit, AuditQuery, Backup, ClusterView, ErrorBody, ErrorDetail, FailoverView,
    Healthz, NodeView, OneServiceView, RegisterBody, ServiceBody, ServicesView, StateBody,
    TokenBody, TokenCreated, Tokens, Written,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error status.
    #[error("{status}: {message}")]
    Api {
        status: u16,
        message: String,
        detail: Option<ErrorDetail>,
    },
    /// No server answered.
    #[error("no server reachable: {0}")]
    Unreachable(String),
    #[error("bad answer from {server}: {reason}")]
    Decode { server: String, reason: String },
    #[error("{0}")]
    Usage(String),
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    servers: Vec<String>,
    token: Option<String>,
    http: reqwest::Client,
}

/// How the client reaches servers beyond plain HTTP on loopback.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// PEM CA certificate(s) trusted for `https://` servers instead of the
    /// bundled web roots.
    pub ca: Option<PathBuf>,
    /// Allow sending a token over plain HTTP to a non-loopback server.
    pub insecure: bool,
}

impl ClientOptions {
    /// `CLB_CA` and `CLB_INSECURE` (for the 2010 commands, which take no flags).
    pub fn from_env() -> ClientOptions {
        let insecure = std::env::var("CLB_INSECURE")
            .map(|v| !matches!(v.trim(), "" | "0" | "false" | "no" | "off"))
            .unwrap_or(false);
        ClientOptions {
            ca: std::env::var_os("CLB_CA").map(PathBuf::from),
            insecure,
        }
    }
}

/// True for a plain `http://` URL whose host is not loopback: a token sent
/// there crosses the network readable by anyone on the path.
fn plain_remote(base: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(base) else {
        return true;
    };
    if url.scheme() != "http" {
        return false;
    }
    let host = url.host_str().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<IpAddr>() {
        Ok(ip) => !ip.is_loopback(),
        Err(_) => !host.eq_ignore_ascii_case("localhost"),
    }
}

/// An error with its causes: reqwest's own text hides why a TLS handshake
/// failed ("invalid peer certificate: UnknownIssuer").
fn describe(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// `host:port` or a URL → base URL without a trailing slash.
fn base_url(server: &str) -> String {
    let s = server.trim().trim_end_matches('/');
    if s.starts_with("http://") || s.starts_with("https://") {
        s.to_string()
    } else {
        format!("http://{s}")
    }
}

impl Client {
    /// `servers` is a comma-separated list, tried in turn; plain HTTP with a
    /// token only to loopback, HTTPS against the bundled web roots.
    pub fn new(servers: &str, token: Option<String>) -> Result<Client, ClientError> {
        Self::with_options(servers, token, ClientOptions::default())
    }

    /// Like [`Client::new`], trusting `options.ca` for HTTPS and, with
    /// `options.insecure`, sending the token over plain HTTP anywhere.
    pub fn with_options(
        servers: &str,
        token: Option<String>,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        let servers: Vec<String> = servers
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(base_url)
            .collect();
        if servers.is_empty() {
            return Err(ClientError::Usage("no server given".into()));
        }
        if token.is_some() && !options.insecure {
            if let Some(s) = servers.iter().find(|s| plain_remote(s)) {
                return Err(ClientError::Usage(format!(
                    "refusing to send the token over plain HTTP to {s}: use https:// or --insecure"
                )));
            }
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30));
        if let Some(ca) = &options.ca {
            let certs =
                crate::pem::load_ca(ca).map_err(|e| ClientError::Usage(format!("--ca: {e}")))?;
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::Usage(e.to_string()))?;
        Ok(Client {
            servers,
            token,
            http,
        })
    }

    /// Sends one request to the first server that answers and returns the
    /// body of its success. A node without a leader (503) passes the request
    /// on to the next server; other errors become [`ClientError::Api`].
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<(&str, String), ClientError> {
        let mut failures = Vec::new();
        for server in &self.servers {
            let mut req = self.http.request(method.clone(), format!("{server}{path}"));
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    failures.push(format!("{server}: {}", describe(&e)));
                    continue;
                }
            };
            let status = resp.status();
            let text = resp.text().await.map_err(|e| ClientError::Decode {
                server: server.clone(),
                reason: e.to_string(),
            })?;
            if status.is_success() {
                return Ok((server, text));
            }
            let answer: ErrorBody =
                serde_json::from_str(&text).map_err(|e| ClientError::Decode {
                    server: server.clone(),
                    reason: format!("{e}: {}", text.chars().take(200).collect::<String>()),
                })?;
            // A node with no leader answers 503; another node may do better.
            if status == StatusCode::SERVICE_UNAVAILABLE
                && server != self.servers.last().unwrap_or(server)
            {
                failures.push(format!("{server}: {:?}", answer.error));
                continue;
            }
            return Err(ClientError::Api {
                status: status.as_u16(),
                message: answer.error,
                detail: answer.detail,
            });
        }
        Err(ClientError::Unreachable(failures.join("; ")))
    }

    /// Sends one JSON request to the first server that answers and decodes
    /// its answer: the typed methods below, and a way to reach a path they
    /// do not cover.
    pub async fn request<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, ClientError> {
        let (server, text) = self.send(method, path, body).await?;
        serde_json::from_str(&text).map_err(|e| ClientError::Decode {
            server: server.to_string(),
            reason: format!("{e}: {}", text.chars().take(200).collect::<String>()),
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.request(Method::GET, path, None::<&()>).await
    }

    /// A write without a body; its log index.
    async fn write(&self, method: Method, path: &str) -> Result<u64, ClientError> {
        let w: Written = self.request(method, path, None::<&()>).await?;
        Ok(w.index)
    }

    pub async fn register(
        &self,
        service: &str,
        member: &str,
        address: &str,
        port: Option<u16>,
        weight: Option<u16>,
        ttl_s: Option<u32>,
    ) -> Result<u64, ClientError> {
        let body = RegisterBody {
            address: address.to_string(),
            port: port.map(u32::from),
            weight: weight.map(u32::from),
            ttl_s,
        };
        let w: Written = self
            .request(Method::PUT, &member_path(service, member), Some(&body))
            .await?;
        Ok(w.index)
    }

    pub async fn unregister(&self, service: &str, member: &str) -> Result<u64, ClientError> {
        self.unregister_forced(service, member, false).await
    }

    /// `force` overrides the removal guardrail.
    pub async fn unregister_forced(
        &self,
        service: &str,
        member: &str,
        force: bool,
    ) -> Result<u64, ClientError> {
        let mut path = member_path(service, member);
        if force {
            path.push_str("?force=true");
        }
        self.write(Method::DELETE, &path).await
    }

    pub async fn set_state(
        &self,
        service: &str,
        member: &str,
        state: &str,
    ) -> Result<u64, ClientError> {
        self.set_state_forced(service, member, state, false).await
    }

    pub async fn set_state_forced(
        &self,
        service: &str,
        member: &str,
        state: &str,
        force: bool,
    ) -> Result<u64, ClientError> {
        let mut path = format!("{}/state", member_path(service, member));
        if force {
            path.push_str("?force=true");
        }
        let body = StateBody {
            state: state.to_string(),
        };
        let w: Written = self.request(Method::PUT, &path, Some(&body)).await?;
        Ok(w.index)
    }

    /// Renews a TTL member on the leader; `Ok(false)` when it is gone.
    pub async fn renew(&self, service: &str, member: &str) -> Result<bool, ClientError> {
        let path = format!("{}/renew", member_path(service, member));
        match self.send(Method::PUT, &path, None::<&()>).await {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(404) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub async fn define_service(
        &self,
        service: &str,
        def: &ServiceBody,
    ) -> Result<u64, ClientError> {
        let path = format!("/v1/services/{}", enc(service));
        let w: Written = self.request(Method::PUT, &path, Some(def)).await?;
        Ok(w.index)
    }

    /// Every service; `consistent`: after a read barrier on the leader.
    pub async fn services(&self, consistent: bool) -> Result<ServicesView, ClientError> {
        self.get(&with_consistent("/v1/services".into(), consistent))
            .await
    }

    /// One service.
    pub async fn service(
        &self,
        service: &str,
        consistent: bool,
    ) -> Result<OneServiceView, ClientError> {
        let path = format!("/v1/services/{}", enc(service));
        self.get(&with_consistent(path, consistent)).await
    }

    /// The config the node would render now (a dry run), as text.
    pub async fn render(&self) -> Result<String, ClientError> {
        Ok(self.send(Method::GET, "/v1/render", None::<&()>).await?.1)
    }

    pub async fn cluster(&self) -> Result<ClusterView, ClientError> {
        self.get("/v1/cluster").await
    }

    /// The answering node's own state.
    pub async fn node(&self) -> Result<NodeView, ClientError> {
        self.get("/v1/node").await
    }

    /// `/healthz`: answers 503 while Raft has stopped on that node.
    pub async fn healthz(&self) -> Result<Healthz, ClientError> {
        self.get("/healthz").await
    }

    pub async fn add_node(&self, id: u64, addr: &str, learner: bool) -> Result<u64, ClientError> {
        let body = AddNodeBody {
            id,
            addr: addr.to_string(),
            learner,
        };
        let w: Written = self
            .request(Method::POST, "/v1/cluster/nodes", Some(&body))
            .await?;
        Ok(w.index)
    }

    pub async fn remove_node(&self, id: u64) -> Result<u64, ClientError> {
        self.write(Method::DELETE, &format!("/v1/cluster/nodes/{id}"))
            .await
    }

    /// The leader steps down; where leadership and the VIP went.
    pub async fn failover(&self) -> Result<FailoverView, ClientError> {
        self.request(Method::POST, "/v1/cluster/failover", None::<&()>)
            .await
    }

    /// `clb drain-node` (`drained`) / `clb ready-node`: returns once node
    /// `id` withdrew (or announces again, if fit).
    pub async fn drain_node(
        &self,
        id: crate::consensus::NodeId,
        drained: bool,
    ) -> Result<crate::bgp::BgpStatus, ClientError> {
        let verb = if drained { "drain" } else { "ready" };
        self.request(
            Method::POST,
            &format!("/v1/cluster/nodes/{id}/{verb}"),
            None::<&()>,
        )
        .await
    }

    /// A linearizable backup (`clb snapshot save`).
    pub async fn snapshot(&self) -> Result<Backup, ClientError> {
        self.get("/v1/snapshot").await
    }

    /// Accepted writes, oldest first.
    pub async fn audit(&self, q: &AuditQuery) -> Result<Audit, ClientError> {
        let mut params = Vec::new();
        if let Some(s) = &q.service {
            params.push(format!("service={}", enc(s)));
        }
        if let Some(t) = q.since {
            params.push(format!("since={t}"));
        }
        if let Some(l) = q.limit {
            params.push(format!("limit={l}"));
        }
        let mut path = "/v1/audit".to_string();
        if !params.is_empty() {
            path = format!("{path}?{}", params.join("&"));
        }
        self.get(&path).await
    }

    pub async fn tokens(&self) -> Result<Tokens, ClientError> {
        self.get("/v1/tokens").await
    }

    pub async fn create_token(&self, body: &TokenBody) -> Result<TokenCreated, ClientError> {
        self.request(Method::POST, "/v1/tokens", Some(body)).await
    }

    pub async fn revoke_token(&self, id: &str) -> Result<u64, ClientError> {
        self.write(Method::DELETE, &format!("/v1/tokens/{}", enc(id)))
            .await
    }
}

fn with_consistent(mut path: String, consistent: bool) -> String {
    if consistent {
        path.push_str("?consistent=true");
    }
    path
}

fn member_path(service: &str, member: &str) -> String {
    format!("/v1/services/{}/members/{}", enc(service), enc(member))
}

/// Percent-encodes a path segment so a bad name reaches the server's
/// validation (and its 400) instead of changing the route.
fn enc(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_go_over_plain_http_only_to_loopback() {
        let token = || Some("t".to_string());
        for ok in [
            "127.0.0.1:8090",
            "http://localhost:1",
            "[::1]:8090",
            "https://10.0.0.1",
        ] {
            assert!(Client::new(ok, token()).is_ok(), "{ok}");
        }
        for bad in [
            "10.0.0.1:8090",
            "http://node-b:8090",
            "127.0.0.1:1,192.0.2.7:1",
        ] {
            let e = Client::new(bad, token()).unwrap_err();
            assert!(matches!(e, ClientError::Usage(_)), "{bad}");
            assert!(e.to_string().contains("--insecure"), "{e}");
        }
        // Without a token there is nothing to leak; with --insecure it is the user's call.
        assert!(Client::new("10.0.0.1:8090", None).is_ok());
        let insecure = ClientOptions {
            insecure: true,
            ..Default::default()
        };
        assert!(Client::with_options("10.0.0.1:8090", token(), insecure).is_ok());
    }

    #[test]
    fn a_missing_ca_file_is_a_usage_error() {
        let options = ClientOptions {
            ca: Some("/nonexistent/ca.pem".into()),
            insecure: false,
        };
        let e = Client::with_options("https://127.0.0.1:1", None, options).unwrap_err();
        assert!(matches!(e, ClientError::Usage(_)), "{e}");
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    }
}
