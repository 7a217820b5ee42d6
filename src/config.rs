//! `clbd` settings from flags, `CLB_*` env and `--config clbd.toml` (flags and
//! env win over the file), validated into a [`Config`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::api::serve::{Limits, TlsSettings};
use crate::consensus::network::PeerTls;
use crate::consensus::{Bootstrap, NodeId, RaftSettings};
// Role lives in consensus, below api, which reports it; this path stays.
pub use crate::consensus::Role;
use crate::failover::{FailoverConfig, HealthCheck, Hook};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config file {path}: {source}")]
    ReadFile {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    ParseFile {
        path: String,
        source: toml::de::Error,
    },
    #[error("--{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
}

fn invalid(flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        reason: reason.into(),
    }
}

/// Every setting, all optional: the same struct is parsed from flags/env and
/// from the TOML file, then merged field by field.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// This node's id, unique in the cluster [default: 1]
    #[arg(long, env = "CLB_NODE_ID")]
    pub node_id: Option<NodeId>,
    /// Address for the client API, /ui, /healthz and /metrics [default: 0.0.0.0:8090]
    #[arg(long, env = "CLB_LISTEN")]
    pub listen: Option<String>,
    /// Address for peer RPCs (Raft, forwarded writes), apart from clients [default: --listen's IP
    /// with this node's port in --peers, else --listen's port + 1]
    #[arg(long, env = "CLB_PEER_LISTEN")]
    pub peer_listen: Option<String>,
    /// Peer address other nodes use to reach this one [default: from --peers or --peer-listen]
    #[arg(long, env = "CLB_ADVERTISE")]
    pub advertise: Option<String>,
    /// Where the Raft log and registry live [default: ./clb-data]
    #[arg(long, env = "CLB_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Initial cluster, identical on every node, by peer address: 1=HOST:PORT,2=HOST:PORT,3=HOST:PORT
    #[arg(long, env = "CLB_PEERS")]
    pub peers: Option<String>,
    /// Start empty and wait to be added with `clb cluster add`
    #[arg(long, env = "CLB_JOIN", num_args = 0..=1, default_missing_value = "true")]
    pub join: Option<bool>,
    /// balancer or witness [default: balancer]
    #[arg(long, env = "CLB_ROLE")]
    pub role: Option<String>,
    /// File with accepted API tokens, one per line [default: DATA_DIR/token, created]
    #[arg(long, env = "CLB_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Largest share of a service's members that may leave rotation per window, 0 to 1 [default: 0.5]
    #[arg(long, env = "CLB_GUARDRAIL_SHARE")]
    pub guardrail_share: Option<f64>,
    /// The guardrail's window [default: 60]
    #[arg(long, env = "CLB_GUARDRAIL_WINDOW_S")]
    pub guardrail_window_s: Option<u64>,
    /// Rebuild the registry and tokens from a `clb snapshot save` file when the cluster is empty
    #[arg(long, env = "CLB_RESTORE")]
    pub restore: Option<PathBuf>,
    /// File whose first line is the cluster secret every peer RPC must carry; the same on every node
    /// (`clb gen-secret > FILE`) [default: a single node generates DATA_DIR/cluster-secret]
    #[arg(long, env = "CLB_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Let a multi-node cluster run without a cluster secret: anyone who reaches the peer port
    /// can then rewrite the registry. Logs a warning at every start
    #[arg(long, env = "CLB_INSECURE_PEERS", num_args = 0..=1, default_missing_value = "true")]
    pub insecure_peers: Option<bool>,
    /// File with the 2010 shared password(s): accepted with scope register:* only
    #[arg(long, env = "CLB_LEGACY_PASSWORD_FILE")]
    pub legacy_password_file: Option<PathBuf>,
    /// Failed authentications one source address may make per minute before 429 [default: 20]
    #[arg(long, env = "CLB_AUTH_FAILURES_PER_MINUTE")]
    pub auth_failures_per_minute: Option<u32>,
    /// Directory with haproxy.cfg.j2 overriding the built-in template
    #[arg(long, env = "CLB_TEMPLATE_DIR")]
    pub template_dir: Option<PathBuf>,
    /// Where the rendered haproxy config goes [default: /etc/haproxy/haproxy.cfg; DATA_DIR/haproxy.cfg with --haproxy supervise or auto]
    #[arg(short = 'o', long, env = "CLB_OUTPUT")]
    pub output: Option<PathBuf>,
    /// external: haproxy runs on its own (systemd) and clbd drives it through --haproxy-socket, --haproxy-master-socket or --reload-cmd; supervise: clbd starts haproxy as its child (sockets in DATA_DIR unless given), restarts it if it dies and stops it on shutdown; auto: supervise when haproxy is installed, else only write DATA_DIR/haproxy.cfg [default: external]
    #[arg(long, env = "CLB_HAPROXY")]
    pub haproxy: Option<String>,
    /// Command that reloads haproxy after a structural change
    #[arg(long, env = "CLB_RELOAD_CMD")]
    pub reload_cmd: Option<String>,
    /// haproxy admin socket for runtime API changes
    #[arg(long, env = "CLB_HAPROXY_SOCKET")]
    pub haproxy_socket: Option<PathBuf>,
    /// Group that may use the admin socket: the built-in template renders it mode 660 with this group instead of 600 (clbd as its own user beside a haproxy run as root)
    #[arg(long, env = "CLB_HAPROXY_SOCKET_GROUP")]
    pub haproxy_socket_group: Option<String>,
    /// The virtual/elastic IP the leader holds
    #[arg(long, env = "CLB_VIP")]
    pub vip: Option<String>,
    /// `linux-vip:IFACE` (the VIP on that interface), or a command run as `CMD claim|release VIP NODE_ID TERM`
    #[arg(long, env = "CLB_VIP_HOOK")]
    pub vip_hook: Option<String>,
    /// Raft heartbeat interval [default: from --timers; 15 for default]
    #[arg(long, env = "CLB_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Lower bound of the randomized election timeout [default: from --timers; 60 for default]
    #[arg(long, env = "CLB_ELECTION_TIMEOUT_MIN_MS")]
    pub election_timeout_min_ms: Option<u64>,
    /// Upper bound of the randomized election timeout [default: from --timers; 75 for default]
    #[arg(long, env = "CLB_ELECTION_TIMEOUT_MAX_MS")]
    pub election_timeout_max_ms: Option<u64>,
    /// How long a write waits for a leader before answering 503 [default: 5000]
    #[arg(long, env = "CLB_FORWARD_TIMEOUT_MS")]
    pub forward_timeout_ms: Option<u64>,
    /// Command that checks a rendered file; `{}` is its path [default: haproxy -c -q -f {}]
    /// (without haproxy installed, files are written unvalidated and never applied)
    #[arg(long, env = "CLB_VALIDATE_CMD")]
    pub validate_cmd: Option<String>,
    /// haproxy master CLI socket, used to reload when no --reload-cmd is given
    #[arg(long, env = "CLB_HAPROXY_MASTER_SOCKET")]
    pub haproxy_master_socket: Option<PathBuf>,
    /// Port of haproxy's stats page on 127.0.0.1; 0 turns it off [default: 8404]
    #[arg(long, env = "CLB_STATS_PORT")]
    pub stats_port: Option<u16>,
    /// Address haproxy frontends bind to; `*` so the VIP works wherever it lands [default: *]
    #[arg(long, env = "CLB_BIND_ADDRESS")]
    pub bind_address: Option<String>,
    /// Minimum time between two haproxy reloads [default: 1000]
    #[arg(long, env = "CLB_RELOAD_MIN_INTERVAL_MS")]
    pub reload_min_interval_ms: Option<u64>,
    /// How long the renderer waits for a burst of changes to end [default: 5]
    #[arg(long, env = "CLB_RENDER_COALESCE_MS")]
    pub render_coalesce_ms: Option<u64>,
    /// How long the config file may trail member changes haproxy already runs through the admin socket; 0 writes it with every change [default: 2000]
    #[arg(long, env = "CLB_FILE_LAG_MS")]
    pub file_lag_ms: Option<u64>,
    /// `[service_defaults]` (file only): how services are created on first registration
    #[arg(skip)]
    pub service_defaults: Option<crate::model::ServiceDefaults>,
    /// Auto-create services on first registration (well-known names and [service_defaults] ports) [default: true]
    #[arg(long, env = "CLB_AUTO_CREATE_SERVICES", num_args = 0..=1, default_missing_value = "true")]
    pub auto_create_services: Option<bool>,
    /// Timer preset: default (15/60-75 ms), fast (10/40-50), relaxed (25/110-150) or extreme (4/15-20); explicit timer flags win [default: default]
    #[arg(long, env = "CLB_TIMERS")]
    pub timers: Option<String>,
    /// How long a quorum ack lets the leader hold the VIP; below --election-timeout-max-ms [default: 3/4 of it]
    #[arg(long, env = "CLB_LEASE_MS")]
    pub lease_ms: Option<u64>,
    /// Interface passed to the VIP hook as CLB_INTERFACE [default: the linux-vip one]
    #[arg(long, env = "CLB_VIP_INTERFACE")]
    pub vip_interface: Option<String>,
    /// A VIP hook run taking longer is killed and retried [default: 5000]
    #[arg(long, env = "CLB_VIP_HOOK_TIMEOUT_MS")]
    pub vip_hook_timeout_ms: Option<u64>,
    /// linux-vip and bgp mode: before a planned release or withdrawal, hold new connections back (nft) and wait up to this for open requests; 0 turns it off [default: 2000]
    #[arg(long, env = "CLB_DRAIN_MS")]
    pub drain_ms: Option<u64>,
    /// arp: the leader holds the VIP (--vip-hook); bgp: every fit balancer announces it through BIRD [default: arp]
    #[arg(long, env = "CLB_VIP_MODE")]
    pub vip_mode: Option<String>,
    /// bgp mode: the router's address, BIRD's BGP neighbour
    #[arg(long, env = "CLB_BGP_NEIGHBOR")]
    pub bgp_neighbor: Option<String>,
    /// bgp mode: this balancer's AS number [default: 65001]
    #[arg(long, env = "CLB_BGP_ASN")]
    pub bgp_asn: Option<u32>,
    /// bgp mode: the router's AS number [default: 65000]
    #[arg(long, env = "CLB_BGP_PEER_ASN")]
    pub bgp_peer_asn: Option<u32>,
    /// bgp mode: BIRD's control socket [default: /run/bird/bird.ctl]
    #[arg(long, env = "CLB_BIRD_SOCKET")]
    pub bird_socket: Option<PathBuf>,
    /// bgp mode: the file clbd writes for BIRD's config to include [default: /etc/bird/clb.conf]
    #[arg(long, env = "CLB_BIRD_INCLUDE")]
    pub bird_include: Option<PathBuf>,
    /// bgp mode: BFD interval towards the router, detection after 3 missed; 0 turns BFD off [default: 100]
    #[arg(long, env = "CLB_BGP_BFD_MS")]
    pub bgp_bfd_ms: Option<u64>,
    /// bgp mode: withdraw when a committed change is not live in haproxy here this long after it was seen [default: 2000]
    #[arg(long, env = "CLB_BGP_MAX_LAG_MS")]
    pub bgp_max_lag_ms: Option<u64>,
    /// Command that must succeed for this balancer to lead (run through sh -c)
    #[arg(long, env = "CLB_HEALTH_CMD")]
    pub health_cmd: Option<String>,
    /// How often --health-cmd runs [default: 1000]
    #[arg(long, env = "CLB_HEALTH_INTERVAL_MS")]
    pub health_interval_ms: Option<u64>,
    /// Consecutive --health-cmd failures that make this node unhealthy [default: 3]
    #[arg(long, env = "CLB_HEALTH_FAILURES")]
    pub health_failures: Option<u32>,
    /// PEM certificate chain: serve the API and peer RPCs over HTTPS (with --tls-key)
    #[arg(long, env = "CLB_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, RSA or EC) of --tls-cert
    #[arg(long, env = "CLB_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) peers' certificates are checked against [default: the bundled web roots]
    #[arg(long, env = "CLB_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client connections served at once; when full, an idle one is closed for a new one [default: 1024]
    #[arg(long, env = "CLB_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Client connections one source address may hold; more are closed at once [default: 128]
    #[arg(long, env = "CLB_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// How long a connection may take to send a complete request head, from its first byte
    /// (or from connecting), HTTP/1 and HTTP/2 alike [default: 10000]
    #[arg(long, env = "CLB_HEADER_READ_TIMEOUT_MS")]
    pub header_read_timeout_ms: Option<u64>,
    /// A request running longer is answered 408 [default: 30000]
    #[arg(long, env = "CLB_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// A connection with no traffic either way for this long is closed [default: 60000]
    #[arg(long, env = "CLB_IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
}

macro_rules! merge {
    ($a:ident, $b:ident, $($f:ident),* $(,)?) => {
        Settings { $($f: $a.$f.or($b.$f)),* }
    };
}

impl Settings {
    /// Fields set in `self` win; the rest come from `file`.
    pub fn or(self, file: Settings) -> Settings {
        merge!(
            self,
            file,
            node_id,
            listen,
            peer_listen,
            advertise,
            data_dir,
            peers,
            join,
            role,
            token_file,
            restore,
            guardrail_share,
            guardrail_window_s,
            cluster_secret_file,
            insecure_peers,
            legacy_password_file,
            auth_failures_per_minute,
            template_dir,
            output,
            haproxy,
            reload_cmd,
            haproxy_socket,
            haproxy_socket_group,
            vip,
            vip_hook,
            heartbeat_ms,
            election_timeout_min_ms,
            election_timeout_max_ms,
            forward_timeout_ms,
            validate_cmd,
            haproxy_master_socket,
            stats_port,
            bind_address,
            reload_min_interval_ms,
            render_coalesce_ms,
            file_lag_ms,
            service_defaults,
            auto_create_services,
            timers,
            lease_ms,
            vip_interface,
            vip_hook_timeout_ms,
            drain_ms,
            vip_mode,
            bgp_neighbor,
            bgp_asn,
            bgp_peer_asn,
            bird_socket,
            bird_include,
            bgp_bfd_ms,
            bgp_max_lag_ms,
            health_cmd,
            health_interval_ms,
            health_failures,
            tls_cert,
            tls_key,
            tls_ca,
            max_connections,
            max_connections_per_ip,
            header_read_timeout_ms,
            request_timeout_ms,
            idle_timeout_ms,
        )
    }

    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::ParseFile {
            path: path.display().to_string(),
            source,
        })
    }
}

/// Validated daemon configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_id: NodeId,
    /// The client listener.
    pub listen: SocketAddr,
    /// The peer listener.
    pub peer_listen: SocketAddr,
    /// `None`: derived from the bound peer listener.
    pub advertise: Option<String>,
    pub data_dir: PathBuf,
    /// `None` for a single-node cluster, which needs the bound address first.
    pub peers: Option<BTreeMap<NodeId, String>>,
    pub join: bool,
    pub role: Role,
    pub token_file: Option<PathBuf>,
    pub restore: Option<PathBuf>,
    pub legacy_password_file: Option<PathBuf>,
    pub auth_failures_per_minute: u32,
    pub template_dir: Option<PathBuf>,
    pub output: PathBuf,
    pub reload_cmd: Option<String>,
    pub haproxy_socket: Option<PathBuf>,
    /// A group name (validated): the admin socket is rendered 660 for it.
    pub haproxy_socket_group: Option<String>,
    /// `Some` with `--haproxy supervise`: clbd runs haproxy.
    pub supervise: Option<crate::render::supervise::Supervise>,
    pub vip: Option<String>,
    pub raft: RaftSettings,
    /// `None` when auto-creation is off.
    pub service_defaults: Option<crate::model::ServiceDefaults>,
    /// VIP, hooks, lease and health gate (validated).
    pub failover: FailoverConfig,
    /// `None`: the default (`haproxy -c`), used when haproxy is installed.
    pub validate_cmd: Option<String>,
    pub haproxy_master_socket: Option<PathBuf>,
    /// `None`: no stats page.
    pub stats_port: Option<u16>,
    /// `*` or an IP literal (IPv6 bracketed in the config).
    pub bind_address: String,
    pub reload_min_interval: Duration,
    pub render_coalesce: Duration,
    pub file_lag: Duration,
    /// `Some`: the API and peer RPCs are served over HTTPS.
    pub tls: Option<TlsSettings>,
    /// Connection cap and slow-client timeouts of the client listener.
    pub limits: Limits,
    /// Where the cluster secret comes from.
    pub peer_auth: PeerAuth,
    /// `--vip-mode bgp` on a balancer: announce the VIP through BIRD.
    pub bgp: Option<crate::bgp::BgpConfig>,
}

/// How peers authenticate each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAuth {
    /// The secret from `--cluster-secret-file`.
    Secret(String),
    /// A single node: DATA_DIR/cluster-secret, generated on first start.
    Generated,
    /// `--insecure-peers`: peer RPCs are not authenticated.
    Insecure,
}

/// `--data-dir` when none is given.
const DEFAULT_DATA_DIR: &str = "clb-data";

/// `--haproxy supervise`: fills in the sockets and output clbd then owns,
/// and refuses what cannot work with one line. `auto` supervises when
/// haproxy is installed (`installed`) and otherwise only writes the config
/// into the data dir: the README's first command works on any machine.
fn supervise_defaults(
    mut s: Settings,
    installed: Option<PathBuf>,
) -> Result<(Settings, Option<crate::render::supervise::Supervise>), ConfigError> {
    let auto = match s.haproxy.as_deref().unwrap_or("external") {
        "external" => return Ok((s, None)),
        "supervise" => false,
        "auto" => true,
        other => {
            return Err(invalid(
                "haproxy",
                format!("{other:?} is not external, supervise or auto"),
            ))
        }
    };
    if s.role.as_deref() == Some("witness") {
        return Err(invalid(
            "haproxy",
            "a witness runs no haproxy; drop --haproxy",
        ));
    }
    if s.reload_cmd.is_some() {
        return Err(invalid(
            "reload-cmd",
            "clbd reloads the haproxy it supervises through its master socket; drop --reload-cmd",
        ));
    }
    let data_dir = s
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let output = s
        .output
        .take()
        .unwrap_or_else(|| data_dir.join("haproxy.cfg"));
    let program = match (installed, auto) {
        (Some(p), _) => p,
        (None, true) => {
            s.output = Some(output);
            return Ok((s, None));
        }
        (None, false) => return Err(invalid(
            "haproxy",
            "supervise needs haproxy installed (apt-get install haproxy), or use --haproxy auto",
        )),
    };
    let (admin, master) = crate::render::supervise::default_sockets(&data_dir);
    // haproxy reads a relative socket path as host:port ("missing port
    // specification"): hand it absolute paths.
    let absolute = |p: PathBuf| {
        std::path::absolute(&p).map_err(|e| invalid("data-dir", format!("{}: {e}", p.display())))
    };
    let admin = absolute(s.haproxy_socket.take().unwrap_or(admin))?;
    let master = absolute(s.haproxy_master_socket.take().unwrap_or(master))?;
    let config = absolute(output)?;
    s.haproxy_socket = Some(admin);
    s.haproxy_master_socket = Some(master.clone());
    s.output = Some(config.clone());
    Ok((
        s,
        Some(crate::render::supervise::Supervise {
            program,
            config,
            master_socket: master,
        }),
    ))
}

impl Config {
    pub fn from_settings(s: Settings) -> Result<Config, ConfigError> {
        let (s, supervise) = supervise_defaults(s, crate::render::supervise::find_haproxy())?;
        let failover_settings = s.clone();
        let tls = tls_settings(&s)?;
        let guardrail = crate::consensus::leader::Guardrail {
            share: match s.guardrail_share.unwrap_or(0.5) {
                x if (0.0..=1.0).contains(&x) => x,
                x => {
                    return Err(invalid(
                        "guardrail-share",
                        format!("{x} is not between 0 and 1"),
                    ))
                }
            },
            window: Duration::from_secs(s.guardrail_window_s.unwrap_or(60).max(1)),
        };
        let secret_file = s
            .cluster_secret_file
            .as_deref()
            .map(read_secret)
            .transpose()?;
        let limits = limits(&s)?;
        let node_id = s.node_id.unwrap_or(1);
        if node_id == 0 {
            return Err(invalid("node-id", "must be at least 1"));
        }
        let listen_text = s.listen.unwrap_or_else(|| "0.0.0.0:8090".into());
        let listen: SocketAddr = listen_text
            .parse()
            .map_err(|_| invalid("listen", format!("{listen_text:?} is not IP:PORT")))?;
        let peers = s.peers.as_deref().map(parse_peers).transpose()?;
        if let Some(peers) = &peers {
            if !peers.contains_key(&node_id) {
                return Err(invalid(
                    "peers",
                    format!("does not name this node (--node-id {node_id})"),
                ));
            }
        }
        let join = s.join.unwrap_or(false);
        if join && peers.is_some() {
            return Err(invalid("join", "cannot be combined with --peers"));
        }
        let peer_listen = match &s.peer_listen {
            Some(text) => text
                .parse::<SocketAddr>()
                .map_err(|_| invalid("peer-listen", format!("{text:?} is not IP:PORT")))?,
            // The port other nodes were told (--peers), else the next one.
            None => {
                let told = peers
                    .as_ref()
                    .and_then(|p| p.get(&node_id))
                    .and_then(|a| a.rsplit_once(':'))
                    .and_then(|(_, port)| port.parse::<u16>().ok());
                let port = match (told, listen.port()) {
                    (Some(p), _) => p,
                    (None, 0) => 0,
                    (None, p) => p.checked_add(1).ok_or_else(|| {
                        invalid(
                            "peer-listen",
                            "--listen uses port 65535; give one explicitly",
                        )
                    })?,
                };
                SocketAddr::new(listen.ip(), port)
            }
        };
        if peer_listen == listen && listen.port() != 0 {
            return Err(invalid(
                "peer-listen",
                format!("{peer_listen} is also --listen; peers need a port of their own"),
            ));
        }
        // A node that shares a cluster must share a secret with it; only a
        // lone node can make its own (and hand it to the nodes it adds).
        let insecure = s.insecure_peers.unwrap_or(false);
        let peer_auth = match (secret_file, insecure) {
            (Some(_), true) => {
                return Err(invalid(
                    "insecure-peers",
                    "cannot be combined with --cluster-secret-file",
                ))
            }
            (Some(secret), false) => PeerAuth::Secret(secret),
            (None, true) => PeerAuth::Insecure,
            (None, false) if peers.is_some() || join => {
                return Err(invalid(
                    "cluster-secret-file",
                    "a cluster of several nodes needs a shared peer secret: create one with \
                     `clb gen-secret > FILE`, give the same FILE to every node (or copy a \
                     single node's DATA_DIR/cluster-secret), or pass --insecure-peers",
                ))
            }
            (None, false) => PeerAuth::Generated,
        };
        let role = match s.role.as_deref().unwrap_or("balancer") {
            "balancer" => Role::Balancer,
            "witness" => Role::Witness,
            other => {
                return Err(invalid(
                    "role",
                    format!("{other:?} is not balancer or witness"),
                ))
            }
        };
        let preset = Timers::parse(s.timers.as_deref().unwrap_or("default"))?;
        let heartbeat_ms = s.heartbeat_ms.unwrap_or(preset.heartbeat_ms);
        let min = s
            .election_timeout_min_ms
            .unwrap_or(preset.election_timeout_min_ms);
        let max = s
            .election_timeout_max_ms
            .unwrap_or(preset.election_timeout_max_ms);
        if heartbeat_ms == 0 || heartbeat_ms >= min {
            return Err(invalid(
                "heartbeat-ms",
                format!("{heartbeat_ms} must be above 0 and below --election-timeout-min-ms {min}"),
            ));
        }
        if max <= min {
            return Err(invalid(
                "election-timeout-max-ms",
                format!("{max} must be above --election-timeout-min-ms {min}"),
            ));
        }
        if let Some(adv) = &s.advertise {
            check_host_port("advertise", adv)?;
        }
        let failover = failover_config(&failover_settings, role, heartbeat_ms, max)?;
        let bgp = bgp_config(
            &failover_settings,
            role,
            &s.data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            max,
        )?;
        Ok(Config {
            node_id,
            listen,
            peer_listen,
            advertise: s.advertise,
            data_dir: s
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            peers,
            join,
            role,
            token_file: s.token_file,
            restore: s.restore.clone(),
            legacy_password_file: s.legacy_password_file,
            auth_failures_per_minute: s.auth_failures_per_minute.unwrap_or(20).max(1),
            template_dir: s.template_dir,
            output: s
                .output
                .unwrap_or_else(|| PathBuf::from("/etc/haproxy/haproxy.cfg")),
            reload_cmd: s.reload_cmd,
            haproxy_socket: s.haproxy_socket,
            haproxy_socket_group: match s.haproxy_socket_group {
                Some(g) if !is_group_name(&g) => {
                    return Err(invalid(
                        "haproxy-socket-group",
                        format!("{g:?} is not a group name (at most 32 of a-z, 0-9, _ and -, starting with a letter or _)"),
                    ))
                }
                g => g,
            },
            supervise,
            vip: s.vip,
            raft: RaftSettings {
                heartbeat_ms,
                election_timeout_min_ms: min,
                election_timeout_max_ms: max,
                elect: role == Role::Balancer,
                forward_timeout: Duration::from_millis(s.forward_timeout_ms.unwrap_or(5_000)),
                peer_tls: tls.as_ref().map(|_| PeerTls {
                    ca: s.tls_ca.clone(),
                }),
                cluster_secret: match &peer_auth {
                    PeerAuth::Secret(secret) => Some(secret.clone()),
                    // Filled in at start, from the data dir.
                    PeerAuth::Generated | PeerAuth::Insecure => None,
                },
                guardrail,
            },
            service_defaults: s
                .auto_create_services
                .unwrap_or(true)
                .then(|| s.service_defaults.clone().unwrap_or_default()),
            failover,
            validate_cmd: s.validate_cmd,
            haproxy_master_socket: s.haproxy_master_socket,
            stats_port: Some(s.stats_port.unwrap_or(8404)).filter(|&p| p != 0),
            bind_address: match s.bind_address.as_deref() {
                None | Some("*") => "*".into(),
                Some(a) => match a.parse::<std::net::IpAddr>() {
                    Ok(ip) if ip.is_ipv6() => format!("[{ip}]"),
                    Ok(ip) => ip.to_string(),
                    Err(_) => {
                        return Err(invalid(
                            "bind-address",
                            format!("{a:?} is not * or an IP address"),
                        ))
                    }
                },
            },
            reload_min_interval: Duration::from_millis(s.reload_min_interval_ms.unwrap_or(1_000)),
            render_coalesce: Duration::from_millis(s.render_coalesce_ms.unwrap_or(5)),
            file_lag: Duration::from_millis(s.file_lag_ms.unwrap_or(2_000)),
            tls,
            limits,
            peer_auth,
            bgp,
        })
    }

    /// How this node starts its cluster, now that the listener is bound.
    pub fn bootstrap(&self, bound: SocketAddr) -> Bootstrap {
        match (&self.peers, self.join) {
            (Some(peers), _) => Bootstrap::Peers(peers.clone()),
            (None, true) => Bootstrap::Join,
            (None, false) => Bootstrap::Single {
                addr: self.advertise_addr(bound),
            },
        }
    }

    /// The address peers should use for this node: `bound` is the peer listener.
    pub fn advertise_addr(&self, bound: SocketAddr) -> String {
        if let Some(a) = &self.advertise {
            return a.clone();
        }
        if let Some(a) = self.peers.as_ref().and_then(|p| p.get(&self.node_id)) {
            return a.clone();
        }
        let ip = if bound.ip().is_unspecified() {
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            bound.ip()
        };
        SocketAddr::new(ip, bound.port()).to_string()
    }
}

/// `--tls-cert` and `--tls-key` (both or neither), loaded once so a bad file
/// stops start-up; `--tls-ca` only with them.
fn tls_settings(s: &Settings) -> Result<Option<TlsSettings>, ConfigError> {
    let tls = match (&s.tls_cert, &s.tls_key) {
        (Some(cert), Some(key)) => TlsSettings {
            cert: cert.clone(),
            key: key.clone(),
        },
        (None, None) => {
            if s.tls_ca.is_some() {
                return Err(invalid("tls-ca", "needs --tls-cert and --tls-key"));
            }
            return Ok(None);
        }
        (Some(_), None) => return Err(invalid("tls-cert", "needs --tls-key")),
        (None, Some(_)) => return Err(invalid("tls-key", "needs --tls-cert")),
    };
    if let Err(e) = crate::api::serve::check_tls(&tls) {
        use crate::api::serve::ServeError;
        let key = tls.key.display().to_string();
        let flag = match &e {
            ServeError::NoKey { .. } => "tls-key",
            ServeError::ReadFile { path, .. } | ServeError::Pem { path, .. } if *path == key => {
                "tls-key"
            }
            _ => "tls-cert",
        };
        return Err(invalid(flag, e.to_string()));
    }
    if let Some(ca) = &s.tls_ca {
        crate::pem::load_ca(ca).map_err(|e| invalid("tls-ca", e.to_string()))?;
    }
    Ok(Some(tls))
}

fn limits(s: &Settings) -> Result<Limits, ConfigError> {
    let d = Limits::default();
    let ms = |flag: &'static str, v: Option<u64>, default: Duration| match v {
        None => Ok(default),
        Some(0) => Err(invalid(flag, "must be above 0")),
        Some(v) => Ok(Duration::from_millis(v)),
    };
    let max_connections = s.max_connections.unwrap_or(d.max_connections);
    if max_connections == 0 {
        return Err(invalid("max-connections", "must be at least 1"));
    }
    let max_connections_per_ip = s.max_connections_per_ip.unwrap_or(d.max_connections_per_ip);
    if max_connections_per_ip == 0 {
        return Err(invalid("max-connections-per-ip", "must be at least 1"));
    }
    Ok(Limits {
        max_connections,
        max_connections_per_ip,
        header_read_timeout: ms(
            "header-read-timeout-ms",
            s.header_read_timeout_ms,
            d.header_read_timeout,
        )?,
        request_timeout: ms(
            "request-timeout-ms",
            s.request_timeout_ms,
            d.request_timeout,
        )?,
        idle_timeout: ms("idle-timeout-ms", s.idle_timeout_ms, d.idle_timeout)?,
        tls_handshake_timeout: d.tls_handshake_timeout,
    })
}

/// Named timer presets; see docs/failover.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
}

impl Timers {
    pub fn parse(name: &str) -> Result<Timers, ConfigError> {
        let (heartbeat_ms, election_timeout_min_ms, election_timeout_max_ms) = match name {
            // A survivor campaigns election_timeout_max + rand(0, max - min)
            // after the last heartbeat (elect.rs). fast (lease 37 ms) fails
            // over in ~65 ms but re-claimed the VIP in some 10-minute runs
            // under full write load on a 2-core lab (a 45 ms CPU stall of all
            // nodes at once); the default leaves a 56 ms lease, relaxed more
            // room for a slow or jittery network (docs/failover.md, Measured).
            "default" => (15, 60, 75),
            "fast" => (10, 40, 50),
            "relaxed" => (25, 110, 150),
            "extreme" => (4, 15, 20),
            other => {
                return Err(invalid(
                    "timers",
                    format!("{other:?} is not default, fast, relaxed or extreme"),
                ))
            }
        };
        Ok(Timers {
            heartbeat_ms,
            election_timeout_min_ms,
            election_timeout_max_ms,
        })
    }
}

/// The VIP, hook, lease and health settings; refuses bad input with a
/// one-line reason naming the flag.
fn failover_config(
    s: &Settings,
    role: Role,
    heartbeat_ms: u64,
    election_max_ms: u64,
) -> Result<FailoverConfig, ConfigError> {
    let vip = s
        .vip
        .as_deref()
        .map(|v| {
            v.trim()
                .parse::<std::net::IpAddr>()
                .map_err(|_| invalid("vip", format!("{v:?} is not an IPv4 or IPv6 address")))
        })
        .transpose()?;
    let hook = s
        .vip_hook
        .as_deref()
        .map(|h| Hook::parse(h).map_err(|reason| invalid("vip-hook", reason)))
        .transpose()?;
    // In bgp mode every fit balancer announces the VIP (bgp/); the leader
    // claims nothing.
    let vip = match vip_mode(s)? {
        VipMode::Bgp if hook.is_some() => {
            return Err(invalid(
                "vip-hook",
                "is for --vip-mode arp; in bgp mode BIRD announces the VIP",
            ))
        }
        VipMode::Bgp => None,
        VipMode::Arp => vip,
    };
    if vip.is_some() && hook.is_none() && role == Role::Balancer {
        return Err(invalid("vip", "needs --vip-hook to say how to claim it"));
    }
    if hook.is_some() && vip.is_none() {
        return Err(invalid("vip-hook", "needs --vip"));
    }
    // Voters refuse votes for election-timeout-max after each heartbeat
    // (openraft's own leader lease), so the VIP lease must end before that;
    // 3/4 leaves a quarter as margin for clock-rate drift and for the release
    // hook to finish (docs/failover.md).
    let lease_ms = s.lease_ms.unwrap_or(election_max_ms * 3 / 4);
    if lease_ms >= election_max_ms {
        return Err(invalid(
            "lease-ms",
            format!("{lease_ms} must be below --election-timeout-max-ms {election_max_ms}"),
        ));
    }
    if lease_ms < 2 * heartbeat_ms {
        return Err(invalid(
            "lease-ms",
            format!(
                "{lease_ms} must be at least twice --heartbeat-ms {heartbeat_ms}, or the VIP flaps"
            ),
        ));
    }
    let hook_timeout_ms = s.vip_hook_timeout_ms.unwrap_or(5_000);
    if hook_timeout_ms == 0 {
        return Err(invalid("vip-hook-timeout-ms", "must be above 0"));
    }
    let health = match &s.health_cmd {
        None => None,
        Some(cmd) if cmd.trim().is_empty() => return Err(invalid("health-cmd", "is empty")),
        Some(cmd) => {
            let failures = s.health_failures.unwrap_or(3);
            if failures == 0 {
                return Err(invalid("health-failures", "must be at least 1"));
            }
            let interval_ms = s.health_interval_ms.unwrap_or(1_000);
            if interval_ms == 0 {
                return Err(invalid("health-interval-ms", "must be above 0"));
            }
            Some(HealthCheck {
                cmd: cmd.clone(),
                interval: Duration::from_millis(interval_ms),
                failures,
            })
        }
    };
    // A planned release drains first where the address is on this host;
    // without nft that cannot hold new connections back, so say so now
    // rather than reset requests at the first restart.
    let drain_ms = s.drain_ms.unwrap_or(2_000);
    let linux_vip = matches!(hook, Some(Hook::LinuxVip { .. }));
    if drain_ms > 0
        && linux_vip
        && role == Role::Balancer
        && crate::failover::drain::nft_path().is_none()
    {
        return Err(invalid(
            "drain-ms",
            "needs nft to hold new connections back (apt-get install nftables), or set --drain-ms 0",
        ));
    }
    let drain = (drain_ms > 0 && linux_vip).then(|| crate::failover::drain::DrainConfig {
        max: Duration::from_millis(drain_ms),
        socket: s.haproxy_socket.clone(),
    });
    Ok(FailoverConfig {
        drain,
        vip,
        hook,
        interface: s.vip_interface.clone(),
        lease: Duration::from_millis(lease_ms),
        hook_timeout: Duration::from_millis(hook_timeout_ms),
        health,
        witness: role == Role::Witness,
        handover_wait: Duration::from_millis((election_max_ms * 4).max(1_000)),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VipMode {
    Arp,
    Bgp,
}

fn vip_mode(s: &Settings) -> Result<VipMode, ConfigError> {
    match s.vip_mode.as_deref().map(str::trim) {
        None | Some("arp") => Ok(VipMode::Arp),
        Some("bgp") => Ok(VipMode::Bgp),
        Some(m) => Err(invalid("vip-mode", format!("{m:?} is not arp or bgp"))),
    }
}

/// `--vip-mode bgp` settings; `None` in arp mode and on a witness (which
/// never carries traffic). Refuses bgp flags without bgp mode, so a typo in
/// the mode is not a silent arp balancer.
fn bgp_config(
    s: &Settings,
    role: Role,
    data_dir: &Path,
    election_max_ms: u64,
) -> Result<Option<crate::bgp::BgpConfig>, ConfigError> {
    let bgp_flags = [
        ("bgp-neighbor", s.bgp_neighbor.is_some()),
        ("bgp-asn", s.bgp_asn.is_some()),
        ("bgp-peer-asn", s.bgp_peer_asn.is_some()),
        ("bird-socket", s.bird_socket.is_some()),
        ("bird-include", s.bird_include.is_some()),
        ("bgp-bfd-ms", s.bgp_bfd_ms.is_some()),
        ("bgp-max-lag-ms", s.bgp_max_lag_ms.is_some()),
    ];
    if vip_mode(s)? == VipMode::Arp {
        if let Some((flag, _)) = bgp_flags.iter().find(|(_, set)| *set) {
            return Err(invalid(flag, "needs --vip-mode bgp"));
        }
        return Ok(None);
    }
    if role == Role::Witness {
        return Ok(None);
    }
    let vip = match s.vip.as_deref() {
        None => {
            return Err(invalid(
                "vip-mode",
                "bgp needs --vip, the address to announce",
            ))
        }
        Some(v) => v
            .trim()
            .parse::<std::net::IpAddr>()
            .map_err(|_| invalid("vip", format!("{v:?} is not an IPv4 or IPv6 address")))?,
    };
    let neighbor = match s.bgp_neighbor.as_deref() {
        None => {
            return Err(invalid(
                "vip-mode",
                "bgp needs --bgp-neighbor, the router's address",
            ))
        }
        Some(n) => n.trim().parse::<std::net::IpAddr>().map_err(|_| {
            invalid(
                "bgp-neighbor",
                format!("{n:?} is not an IPv4 or IPv6 address"),
            )
        })?,
    };
    // BIRD would need extended next hops to carry one family over the
    // other's session; clb keeps them apart.
    if vip.is_ipv4() != neighbor.is_ipv4() {
        return Err(invalid(
            "bgp-neighbor",
            format!("{neighbor} and the VIP {vip} are of different address families: an IPv6 VIP needs an IPv6 neighbour"),
        ));
    }
    let asn = s.bgp_asn.unwrap_or(65001);
    let peer_asn = s.bgp_peer_asn.unwrap_or(65000);
    if asn == 0 || peer_asn == 0 {
        return Err(invalid("bgp-asn", "AS numbers start at 1"));
    }
    let Some(haproxy_socket) = s.haproxy_socket.clone() else {
        return Err(invalid(
            "vip-mode",
            "bgp needs --haproxy-socket (or --haproxy supervise): a balancer announces only while its haproxy answers",
        ));
    };
    let drain_ms = s.drain_ms.unwrap_or(2_000);
    if drain_ms > 0 && crate::failover::drain::nft_path().is_none() {
        return Err(invalid(
            "drain-ms",
            "needs nft to hold new connections back before a withdrawal (apt-get install nftables), or set --drain-ms 0",
        ));
    }
    let max_lag_ms = s.bgp_max_lag_ms.unwrap_or(2_000);
    if max_lag_ms < 100 {
        return Err(invalid(
            "bgp-max-lag-ms",
            format!(
                "{max_lag_ms} is below 100: a balancer under writes would withdraw at every render"
            ),
        ));
    }
    let bfd_ms = s.bgp_bfd_ms.unwrap_or(100);
    if bfd_ms > 0 && bfd_ms < 10 {
        return Err(invalid(
            "bgp-bfd-ms",
            format!("{bfd_ms} is below BIRD's 10 ms"),
        ));
    }
    Ok(Some(crate::bgp::BgpConfig {
        include: crate::bgp::bird::Include {
            protocol: "clb_vip".into(),
            vip,
            neighbor,
            asn,
            peer_asn,
            bfd_interval_ms: bfd_ms,
        },
        socket: s
            .bird_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from("/run/bird/bird.ctl")),
        include_file: s
            .bird_include
            .clone()
            .unwrap_or_else(|| PathBuf::from("/etc/bird/clb.conf")),
        max_lag: Duration::from_millis(max_lag_ms),
        leader_silence: Duration::from_millis(max_lag_ms + 4 * election_max_ms),
        drain: (drain_ms > 0).then(|| crate::failover::drain::DrainConfig {
            max: Duration::from_millis(drain_ms),
            socket: Some(haproxy_socket.clone()),
        }),
        haproxy_socket,
        drained_file: data_dir.join("bgp-drained"),
    }))
}

/// The first non-empty line of a secret file; at least 16 characters.
fn read_secret(path: &Path) -> Result<String, ConfigError> {
    let flag = "cluster-secret-file";
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(flag, format!("{}: {e}", path.display())))?;
    let secret = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    if secret.len() < 16 {
        return Err(invalid(
            flag,
            format!(
                "{}: the secret must be at least 16 characters",
                path.display()
            ),
        ));
    }
    Ok(secret.to_string())
}

/// `1=HOST:PORT,2=HOST:PORT`.
pub fn parse_peers(text: &str) -> Result<BTreeMap<NodeId, String>, ConfigError> {
    let mut peers = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| invalid("peers", format!("{part:?} is not ID=HOST:PORT")))?;
        let id: NodeId = id
            .trim()
            .parse()
            .ok()
            .filter(|&id| id > 0)
            .ok_or_else(|| invalid("peers", format!("{id:?} is not a node id (1 or more)")))?;
        check_host_port("peers", addr)?;
        if peers.insert(id, addr.trim().to_string()).is_some() {
            return Err(invalid("peers", format!("node {id} is listed twice")));
        }
    }
    if peers.is_empty() {
        return Err(invalid("peers", "is empty"));
    }
    Ok(peers)
}

fn check_host_port(flag: &'static str, addr: &str) -> Result<(), ConfigError> {
    crate::model::validate_host_port("addr", addr.trim())
        .map_err(|e| invalid(flag, format!("{addr:?}: {}", e.reason)))
}

/// A POSIX-portable group name: it is rendered into haproxy's config, so
/// nothing else may get through.
fn is_group_name(g: &str) -> bool {
    let mut chars = g.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && g.len() <= 32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_reject_garbage() {
        let p = parse_peers("1=127.0.0.1:1, 2=node-b:2,3=[::1]:3").unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[&3], "[::1]:3");
        for bad in [
            "",
            "1",
            "x=a:1",
            "0=a:1",
            "1=a",
            "1=a:0",
            "1=a:1,1=b:2",
            "1=a b:1",
        ] {
            assert!(parse_peers(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn flags_win_over_file() {
        let flags = Settings {
            node_id: Some(2),
            ..Default::default()
        };
        let file: Settings = toml::from_str("node_id = 1\nlisten = \"127.0.0.1:9\"").unwrap();
        let merged = flags.or(file);
        assert_eq!(merged.node_id, Some(2));
        assert_eq!(merged.listen.as_deref(), Some("127.0.0.1:9"));
    }

    #[test]
    fn failover_flags_are_validated() {
        let bad = |s: Settings| Config::from_settings(s).unwrap_err().to_string();
        let vip = |v: &str, h: &str| Settings {
            vip: Some(v.into()),
            vip_hook: Some(h.into()),
            ..Default::default()
        };
        assert!(bad(vip("10.0.0.300", "true")).starts_with("--vip:"));
        assert!(bad(vip("10.0.0.3", "linux-vip:nosuchif0")).contains("no network interface"));
        assert!(bad(Settings {
            vip: Some("10.0.0.3".into()),
            ..Default::default()
        })
        .starts_with("--vip:"));
        assert!(bad(Settings {
            lease_ms: Some(300),
            ..Default::default()
        })
        .starts_with("--lease-ms"));
        assert!(bad(Settings {
            timers: Some("ludicrous".into()),
            ..Default::default()
        })
        .starts_with("--timers"));
        // Where nft is missing, linux-vip refuses to start unless drains
        // are off.
        let lo = if crate::failover::drain::nft_path().is_none() {
            assert!(bad(vip("fd00::5", "linux-vip:lo")).starts_with("--drain-ms"));
            Settings {
                drain_ms: Some(0),
                ..vip("fd00::5", "linux-vip:lo")
            }
        } else {
            vip("fd00::5", "linux-vip:lo")
        };
        let c = Config::from_settings(lo.clone()).unwrap();
        assert_eq!(c.failover.lease, Duration::from_millis(56));
        // linux-vip drains 2 s by default; 0 turns it off; exec hooks never.
        if lo.drain_ms.is_none() {
            assert_eq!(
                c.failover.drain.as_ref().map(|d| d.max),
                Some(Duration::from_secs(2))
            );
        }
        let off = Config::from_settings(Settings {
            drain_ms: Some(0),
            ..vip("fd00::5", "linux-vip:lo")
        })
        .unwrap();
        assert!(off.failover.drain.is_none());
        let exec = Config::from_settings(vip("10.0.0.3", "true")).unwrap();
        assert!(exec.failover.drain.is_none());
        assert_eq!(
            c.failover.hook.as_ref().and_then(|h| h.interface()),
            Some("lo")
        );
        // A preset sets the timers; an explicit flag still wins.
        let c = Config::from_settings(Settings {
            timers: Some("fast".into()),
            heartbeat_ms: Some(10),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.raft.heartbeat_ms, 10);
        assert_eq!(c.raft.election_timeout_min_ms, 40);
        assert_eq!(c.failover.lease, Duration::from_millis(37));
        for preset in ["default", "relaxed", "fast", "extreme"] {
            Config::from_settings(Settings {
                timers: Some(preset.into()),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("{preset}: {e}"));
        }
    }

    #[test]
    fn bgp_mode_flags_are_validated() {
        let bad = |s: Settings| Config::from_settings(s).unwrap_err().to_string();
        let bgp = || Settings {
            vip: Some("192.0.2.10".into()),
            vip_mode: Some("bgp".into()),
            bgp_neighbor: Some("10.0.0.1".into()),
            haproxy_socket: Some("/run/haproxy/admin.sock".into()),
            data_dir: Some("/var/lib/clb".into()),
            // Independent of nft on the machine running the test.
            drain_ms: Some(0),
            ..Default::default()
        };
        assert_eq!(
            bad(Settings {
                vip_mode: Some("ospf".into()),
                ..bgp()
            }),
            "--vip-mode: \"ospf\" is not arp or bgp"
        );
        assert!(bad(Settings {
            vip_mode: None,
            vip: None,
            ..bgp()
        })
        .starts_with("--bgp-neighbor: needs --vip-mode bgp"));
        assert!(bad(Settings {
            bgp_neighbor: None,
            ..bgp()
        })
        .contains("needs --bgp-neighbor"));
        assert!(bad(Settings { vip: None, ..bgp() }).contains("needs --vip"));
        assert!(bad(Settings {
            vip_hook: Some("true".into()),
            ..bgp()
        })
        .starts_with("--vip-hook: is for --vip-mode arp"));
        assert!(bad(Settings {
            haproxy_socket: None,
            haproxy: Some("external".into()),
            ..bgp()
        })
        .contains("needs --haproxy-socket"));
        assert!(bad(Settings {
            bgp_neighbor: Some("router".into()),
            ..bgp()
        })
        .starts_with("--bgp-neighbor:"));
        assert!(bad(Settings {
            bgp_max_lag_ms: Some(50),
            ..bgp()
        })
        .starts_with("--bgp-max-lag-ms"));
        assert!(bad(Settings {
            vip: Some("2001:db8::10".into()),
            ..bgp()
        })
        .contains("different address families"));
        let c = Config::from_settings(bgp()).unwrap();
        let b = c.bgp.expect("bgp settings");
        // The leader claims nothing in bgp mode.
        assert!(c.failover.vip.is_none());
        assert_eq!(b.include.asn, 65001);
        assert_eq!(b.include.peer_asn, 65000);
        assert_eq!(b.socket, PathBuf::from("/run/bird/bird.ctl"));
        assert_eq!(b.include_file, PathBuf::from("/etc/bird/clb.conf"));
        assert_eq!(b.drained_file, PathBuf::from("/var/lib/clb/bgp-drained"));
        // Lag plus four maximum election timeouts of the default preset.
        assert_eq!(
            b.leader_silence,
            Duration::from_millis(2_000 + 4 * c.raft.election_timeout_max_ms)
        );
        // A witness never announces.
        let w = Config::from_settings(Settings {
            role: Some("witness".into()),
            ..bgp()
        })
        .unwrap();
        assert!(w.bgp.is_none());
    }

    #[test]
    fn haproxy_auto_supervises_only_where_haproxy_is_installed() {
        let s = |mode: &str| Settings {
            haproxy: Some(mode.into()),
            data_dir: Some("/d".into()),
            ..Default::default()
        };
        let (got, sup) = supervise_defaults(s("auto"), None).unwrap();
        assert!(sup.is_none());
        assert_eq!(got.output, Some(PathBuf::from("/d/haproxy.cfg")));
        let err = supervise_defaults(s("supervise"), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("--haproxy: supervise needs haproxy installed"),
            "{err}"
        );
        let (got, sup) = supervise_defaults(s("auto"), Some("/usr/sbin/haproxy".into())).unwrap();
        let sup = sup.expect("supervised");
        assert_eq!(sup.master_socket, PathBuf::from("/d/haproxy-master.sock"));
        assert_eq!(got.haproxy_socket, Some(PathBuf::from("/d/haproxy.sock")));
        let (got, sup) = supervise_defaults(s("external"), None).unwrap();
        assert!(sup.is_none() && got.output.is_none());
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        assert!(toml::from_str::<Settings>("nodeid = 1").is_err());
    }

    #[test]
    fn validation_names_the_flag() {
        let bad = |s: Settings| Config::from_settings(s).unwrap_err().to_string();
        assert!(bad(Settings {
            role: Some("boss".into()),
            ..Default::default()
        })
        .starts_with("--role"));
        assert!(bad(Settings {
            peers: Some("2=a:1".into()),
            ..Default::default()
        })
        .contains("does not name this node"));
        assert!(bad(Settings {
            heartbeat_ms: Some(500),
            ..Default::default()
        })
        .starts_with("--heartbeat-ms"));
        assert!(bad(Settings {
            listen: Some("nope".into()),
            ..Default::default()
        })
        .starts_with("--listen"));
        // Rendered into haproxy.cfg: nothing but a group name gets through.
        for g in [
            "clb\n    stats socket /tmp/x level admin",
            "a b",
            "-x",
            "Clb",
            "",
        ] {
            assert!(
                bad(Settings {
                    haproxy_socket_group: Some(g.into()),
                    ..Default::default()
                })
                .starts_with("--haproxy-socket-group"),
                "{g:?}"
            );
        }
        let ok = Config::from_settings(Settings {
            haproxy_socket_group: Some("clb".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(ok.haproxy_socket_group.as_deref(), Some("clb"));
    }
}
