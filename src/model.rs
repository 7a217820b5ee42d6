//! The replicated registry: services, their members, the commands that change
//! them, and the validation every value passes before it may reach a command.
//!
//! Pure: no Raft, no HTTP, no files. `Registry::apply` is the only way state
//! changes, and it is deterministic so every node computes the same registry.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

// In a leaf so that `auth`, below this module, can validate names too.
pub use crate::names::{validate_name, InvalidField, MAX_NAME_LEN};

use crate::auth::{Need, Scope};

/// haproxy's own weight range.
pub const MAX_WEIGHT: u16 = 256;
/// Weight a member gets when the request does not name one.
pub const DEFAULT_WEIGHT: u16 = 100;

/// An IP literal or a DNS hostname (RFC 1123 labels, at most 253 characters).
pub fn validate_address(address: &str) -> Result<(), InvalidField> {
    if address.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let field = "address";
    if address.is_empty() || address.len() > 253 {
        return Err(InvalidField::new(
            field,
            "must be an IP address or a hostname of 1 to 253 characters",
        ));
    }
    let host = address.strip_suffix('.').unwrap_or(address);
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(InvalidField::new(
                field,
                format!("{address:?} is neither an IP address nor a valid hostname"),
            ));
        }
    }
    // An all-numeric dotted name would be read as a (bad) IPv4 address by haproxy.
    if host
        .split('.')
        .all(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(InvalidField::new(
            field,
            format!("{address:?} is not a valid IP address"),
        ));
    }
    Ok(())
}

/// `HOST:PORT` of a node (`[v6]:PORT` for IPv6), as `--peers` and
/// `clb cluster add` take it.
pub fn validate_host_port(field: &'static str, addr: &str) -> Result<(), InvalidField> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| InvalidField::new(field, format!("{addr:?} is not HOST:PORT")))?;
    validate_address(host.trim_start_matches('[').trim_end_matches(']'))
        .map_err(|f| InvalidField { field, ..f })?;
    validate_port(field, port.parse().unwrap_or(0)).map(|_| ())
}

pub fn validate_port(field: &'static str, port: u32) -> Result<u16, InvalidField> {
    match u16::try_from(port) {
        Ok(p) if p >= 1 => Ok(p),
        _ => Err(InvalidField::new(field, "must be 1 to 65535")),
    }
}

pub fn validate_weight(weight: u32) -> Result<u16, InvalidField> {
    match u16::try_from(weight) {
        Ok(w) if w <= MAX_WEIGHT => Ok(w),
        _ => Err(InvalidField::new(
            "weight",
            format!("must be 0 to {MAX_WEIGHT}"),
        )),
    }
}

/// What haproxy does with a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Receives traffic.
    #[default]
    Active,
    /// Keeps existing sessions, gets no new ones (haproxy `drain`).
    Drain,
    /// Out of rotation (haproxy `maint` / `disabled`).
    Maint,
}

impl fmt::Display for MemberState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MemberState::Active => "active",
            MemberState::Drain => "drain",
            MemberState::Maint => "maint",
        })
    }
}

impl std::str::FromStr for MemberState {
    type Err = InvalidField;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" | "ready" => Ok(MemberState::Active),
            "drain" => Ok(MemberState::Drain),
            "maint" => Ok(MemberState::Maint),
            _ => Err(InvalidField::new("state", "must be active, drain or maint")),
        }
    }
}

/// One backend server of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub address: String,
    pub port: u16,
    pub weight: u16,
    pub state: MemberState,
    /// Milliseconds since the Unix epoch, stamped by the node that took the request.
    pub registered_at_ms: u64,
    /// Renewal deadline; `None` means the member stays until unregistered.
    pub ttl_s: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Http,
    Tcp,
}

/// Balance algorithms; all of them are dynamic in haproxy 2.6, so members can
/// be added through the runtime API without a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    #[default]
    Roundrobin,
    Leastconn,
    First,
    Random,
}

/// How haproxy checks a member. Externally tagged (`"tcp"`,
/// `{"http": {"path": "/health"}}`) because the peer transport's bincode
/// cannot decode internally tagged enums.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Check {
    None,
    #[default]
    Tcp,
    Http {
        path: String,
    },
}

/// The allow-listed haproxy server options a service may set for its
/// members. Typed, so nothing but numbers and fixed keywords reaches haproxy.cfg.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ServerOptions {
    /// Per-server connection limit (`maxconn`), 1 to 1,000,000.
    #[serde(default)]
    pub maxconn: Option<u32>,
    /// Ramp-up after a server comes back (`slowstart`), 1 to 3,600 s.
    #[serde(default)]
    pub slowstart_s: Option<u32>,
    /// Health check interval (`inter`), 100 ms to 1 h [default: 2,000].
    #[serde(default)]
    pub check_inter_ms: Option<u32>,
    /// Failed checks before down (`fall`), 1 to 100 [default: 3].
    #[serde(default)]
    pub fall: Option<u32>,
    /// Passed checks before up (`rise`), 1 to 100 [default: 2].
    #[serde(default)]
    pub rise: Option<u32>,
    /// Send the PROXY protocol v2 header (`send-proxy-v2`).
    #[serde(default)]
    pub send_proxy: bool,
}

impl ServerOptions {
    fn validate(&self) -> Result<(), InvalidField> {
        let ranges = [
            ("server.maxconn", self.maxconn, 1, 1_000_000),
            ("server.slowstart_s", self.slowstart_s, 1, 3_600),
            ("server.check_inter_ms", self.check_inter_ms, 100, 3_600_000),
            ("server.fall", self.fall, 1, 100),
            ("server.rise", self.rise, 1, 100),
        ];
        for (field, value, min, max) in ranges {
            if let Some(v) = value {
                if !(min..=max).contains(&v) {
                    return Err(InvalidField::new(field, format!("must be {min} to {max}")));
                }
            }
        }
        Ok(())
    }
}

/// A service's replicated definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDef {
    /// Port the balancer's frontend listens on.
    pub port: u16,
    /// Port a member gets when it registers without one (the 2010 form).
    pub member_port: u16,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub balance: Balance,
    #[serde(default)]
    pub check: Check,
    #[serde(default)]
    pub server: ServerOptions,
}

impl ServiceDef {
    /// A definition for `name` when it is a well-known service, so the 2010
    /// flow `clb_register PASS node http` works with no set-up.
    pub fn well_known(name: &str) -> Option<Self> {
        let (port, mode) = match name {
            "http" | "www" | "web" => (80, Mode::Http),
            "https" => (443, Mode::Tcp),
            "smtp" => (25, Mode::Tcp),
            "imap" => (143, Mode::Tcp),
            "mysql" => (3306, Mode::Tcp),
            "postgres" | "postgresql" => (5432, Mode::Tcp),
            "redis" => (6379, Mode::Tcp),
            _ => return None,
        };
        Some(ServiceDef {
            port,
            member_port: port,
            mode,
            balance: Balance::Roundrobin,
            check: Check::Tcp,
            server: ServerOptions::default(),
        })
    }

    pub fn validate(&self) -> Result<(), InvalidField> {
        validate_port("port", self.port.into())?;
        validate_port("member_port", self.member_port.into())?;
        self.server.validate()?;
        if let Check::Http { path } = &self.check {
            validate_check_path(path)?;
        }
        if self.mode == Mode::Tcp && matches!(self.check, Check::Http { .. }) {
            return Err(InvalidField::new("check", "an http check needs mode http"));
        }
        Ok(())
    }
}

/// An HTTP check path goes into haproxy.cfg verbatim, so only URL path
/// characters are allowed.
fn validate_check_path(path: &str) -> Result<(), InvalidField> {
    let ok = path.starts_with('/')
        && !path.split(['/', '?']).any(|seg| seg == "..")
        && path.len() <= 256
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-~%?=&".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(InvalidField::new(
            "check.path",
            "must start with /, have no .. segment, and use only A-Z a-z 0-9 / . _ - ~ % ? = &, at most 256 characters",
        ))
    }
}

/// `[service_defaults]` of clbd.toml: how a service is created when a member
/// registers for one that does not exist yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ServiceDefaults {
    /// Overrides the well-known mode (http for `http`, tcp for the others).
    pub mode: Option<Mode>,
    pub balance: Option<Balance>,
    pub check: Option<Check>,
    #[serde(default)]
    pub server: ServerOptions,
    /// Frontend (and member) ports for names that are not well known.
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
}

impl ServiceDefaults {
    /// The definition `name` gets on first registration, if it can get one.
    pub fn definition(&self, name: &str) -> Option<ServiceDef> {
        let mut def = match (self.ports.get(name), ServiceDef::well_known(name)) {
            (Some(&port), known) => ServiceDef {
                port,
                member_port: port,
                ..known.unwrap_or(ServiceDef {
                    port,
                    member_port: port,
                    mode: Mode::Http,
                    balance: Balance::Roundrobin,
                    check: Check::Tcp,
                    server: ServerOptions::default(),
                })
            },
            (None, Some(known)) => known,
            (None, None) => return None,
        };
        if let Some(m) = self.mode {
            def.mode = m;
        }
        if let Some(b) = self.balance {
            def.balance = b;
        }
        if let Some(c) = &self.check {
            def.check = c.clone();
        }
        def.server = self.server.clone();
        def.validate().ok().map(|()| def)
    }
}

/// A service's members by name. A persistent B-tree: a clone shares every
/// node, so the applied registry that readers hold costs nothing to keep, and
/// an update copies only the O(log n) nodes on its path instead of the whole
/// service (which made every write O(members)).
pub type Members = imbl::OrdMap<String, Member>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub def: ServiceDef,
    pub members: Members,
}

/// What a member asks for when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberSpec {
    pub address: String,
    /// `None`: the service's `member_port`.
    pub port: Option<u16>,
    pub weight: Option<u16>,
    pub ttl_s: Option<u32>,
}

impl MemberSpec {
    pub fn validate(&self) -> Result<(), InvalidField> {
        validate_address(&self.address)?;
        if let Some(p) = self.port {
            validate_port("port", p.into())?;
        }
        if let Some(w) = self.weight {
            validate_weight(w.into())?;
        }
        if self.ttl_s == Some(0) {
            return Err(InvalidField::new("ttl_s", "must be at least 1"));
        }
        Ok(())
    }
}

/// A change to the registry. Everything in it was validated and stamped by the
/// node that took the request, so applying it needs no clock and no config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Idempotent upsert. `create` defines the service if it does not exist.
    Register {
        service: String,
        member: String,
        spec: MemberSpec,
        create: Option<ServiceDef>,
        at_ms: u64,
    },
    Unregister {
        service: String,
        member: String,
    },
    SetMemberState {
        service: String,
        member: String,
        state: MemberState,
    },
    DefineService {
        service: String,
        def: ServiceDef,
    },
    CreateToken {
        id: String,
        token: crate::auth::Token,
    },
    RevokeToken {
        id: String,
    },
    /// Replaces an empty registry (services and tokens) with a backup, as one
    /// entry: a second restore, or one into a non-empty cluster, is refused.
    /// No longer proposed: one entry of megabytes is a value sled keeps
    /// outside its fsynced log (see [`Command::RestoreChunk`]). Kept so
    /// older logs decode and apply alike.
    Restore {
        registry: Box<Registry>,
    },
    /// Proposals the leader batched into one log entry, applied in order,
    /// each with its own response. Before the restore commands, so older log
    /// entries still decode (bincode numbers variants in order).
    Batch(Vec<Proposal>),
    /// Part `seq` of backup `id` (`clbd --restore`), staged beside the empty
    /// registry until [`Command::RestoreCommit`]: a backup in one entry was
    /// one value too large for sled to keep durable. Parts are staged in
    /// order from 0; part 0 of another backup starts over; a part already
    /// staged answers `Done` again, so every node may propose the same parts.
    RestoreChunk {
        id: u64,
        seq: u32,
        part: Box<Registry>,
    },
    /// Replaces the empty registry with backup `id`, once exactly `chunks`
    /// parts of it are staged; all or nothing.
    RestoreCommit {
        id: u64,
        chunks: u32,
    },
}

/// Most services, members and tokens one [`Command::RestoreChunk`] may hold,
/// which bounds the size of its log entry.
pub const RESTORE_PART_ITEMS: usize = 1_000;

/// A backup being restored in parts (see [`Command::RestoreChunk`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedRestore {
    pub id: u64,
    /// Parts staged so far: `0..parts`.
    pub parts: u32,
    /// The union of the staged parts.
    pub registry: Registry,
}

/// A command as the Raft log carries it: who asked, and when (stamped by the
/// node that took the request), for the audit history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub cmd: Command,
    /// Token id, `bootstrap` (token file), `legacy` (2010 password) or `ttl`.
    pub by: String,
    pub at_ms: u64,
    /// The caller overrode the removal guardrail.
    pub force: bool,
}

/// One accepted write in the replicated history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub index: u64,
    pub at_ms: u64,
    pub by: String,
    pub action: String,
    pub service: Option<String>,
    pub member: Option<String>,
    /// A short description of what changed.
    pub detail: String,
}

impl Proposal {
    pub fn audit(&self, index: u64) -> AuditEntry {
        let (action, service, member, detail) = match &self.cmd {
            Command::Register {
                service,
                member,
                spec,
                ..
            } => (
                "register",
                Some(service),
                Some(member),
                format!(
                    "{}:{}",
                    spec.address,
                    spec.port.map_or("-".into(), |p| p.to_string())
                ),
            ),
            Command::Unregister { service, member } => {
                ("unregister", Some(service), Some(member), String::new())
            }
            Command::SetMemberState {
                service,
                member,
                state,
            } => ("set-state", Some(service), Some(member), state.to_string()),
            Command::DefineService { service, def } => (
                "define-service",
                Some(service),
                None,
                format!("port {}", def.port),
            ),
            Command::CreateToken { id, token } => (
                "create-token",
                None,
                None,
                format!("{id} {} {}", token.name, token.scope),
            ),
            Command::RevokeToken { id } => ("revoke-token", None, None, id.clone()),
            Command::Batch(proposals) => (
                "batch",
                None,
                None,
                format!("{} proposals", proposals.len()),
            ),
            Command::Restore { registry } => (
                "restore",
                None,
                None,
                format!(
                    "{} services, {} members, {} tokens",
                    registry.services.len(),
                    registry.member_count(),
                    registry.tokens.len()
                ),
            ),
            Command::RestoreChunk { id, seq, part } => (
                "restore-part",
                None,
                None,
                format!(
                    "part {seq} of backup {id:016x}: {} members",
                    part.member_count()
                ),
            ),
            Command::RestoreCommit { id, chunks } => (
                "restore",
                None,
                None,
                format!("backup {id:016x} in {chunks} parts"),
            ),
        };
        AuditEntry {
            index,
            at_ms: self.at_ms,
            by: self.by.clone(),
            action: action.into(),
            service: service.cloned(),
            member: member.cloned(),
            detail,
        }
    }
}

impl Command {
    /// Validates every value the command carries.
    pub fn validate(&self) -> Result<(), InvalidField> {
        match self {
            Command::Register {
                service,
                member,
                spec,
                create,
                ..
            } => {
                validate_name("service", service)?;
                validate_name("member", member)?;
                spec.validate()?;
                if let Some(def) = create {
                    def.validate()?;
                }
            }
            Command::Unregister { service, member }
            | Command::SetMemberState {
                service, member, ..
            } => {
                validate_name("service", service)?;
                validate_name("member", member)?;
            }
            Command::DefineService { service, def } => {
                validate_name("service", service)?;
                def.validate()?;
            }
            Command::CreateToken { id, token } => {
                validate_name("id", id)?;
                validate_token(token)?;
            }
            Command::RevokeToken { id } => validate_name("id", id)?,
            Command::Restore { registry } => validate_registry(registry)?,
            Command::RestoreChunk { part, .. } => {
                // Counted first: what follows is linear in the part.
                let items = part.services.len() + part.member_count() + part.tokens.len();
                if items > RESTORE_PART_ITEMS {
                    return Err(InvalidField::new(
                        "part",
                        format!("{items} items; at most {RESTORE_PART_ITEMS}"),
                    ));
                }
                validate_registry(part)?;
            }
            Command::RestoreCommit { chunks, .. } => {
                if *chunks == 0 {
                    return Err(InvalidField::new("chunks", "must be at least 1"));
                }
            }
            Command::Batch(proposals) => {
                for p in proposals {
                    if matches!(p.cmd, Command::Batch(_)) {
                        return Err(InvalidField::new("batch", "batches do not nest"));
                    }
                    p.cmd.validate()?;
                }
            }
        }
        Ok(())
    }

    /// Whether a caller with `scope` may have this command written: the
    /// check the leader repeats for every command, whichever node took the
    /// request. (Here, not in `auth`: auth sits below model.)
    pub fn allowed_by(&self, scope: &Scope) -> bool {
        match self {
            Command::Register {
                service, member, ..
            }
            | Command::Unregister { service, member }
            | Command::SetMemberState {
                service, member, ..
            } => scope.allows(Need::Member { service, member }),
            Command::DefineService { .. }
            | Command::CreateToken { .. }
            | Command::RevokeToken { .. }
            | Command::Restore { .. }
            | Command::RestoreChunk { .. }
            | Command::RestoreCommit { .. } => scope.allows(Need::Admin),
            // The leader builds batches; nobody may send one.
            Command::Batch(_) => false,
        }
    }
}

/// A token record: its free-text fields are short and printable, and its
/// hash is a SHA-256 in hex (the scope was checked when it was decoded).
fn validate_token(token: &crate::auth::Token) -> Result<(), InvalidField> {
    let text = |field: &'static str, v: &str| {
        if v.len() > 63 || v.chars().any(char::is_control) {
            Err(InvalidField::new(
                field,
                "at most 63 characters, no control characters",
            ))
        } else {
            Ok(())
        }
    };
    text("name", &token.name)?;
    text("created_by", &token.created_by)?;
    let hex = token.hash.len() == 64
        && token
            .hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex {
        return Err(InvalidField::new("hash", "must be 64 lowercase hex digits"));
    }
    Ok(())
}

/// Every value a backup carries, as the commands that create them check it.
fn validate_registry(registry: &Registry) -> Result<(), InvalidField> {
    for (name, svc) in &registry.services {
        validate_name("service", name)?;
        svc.def.validate()?;
        for (member, m) in &svc.members {
            validate_name("member", member)?;
            MemberSpec {
                address: m.address.clone(),
                port: Some(m.port),
                weight: Some(m.weight),
                ttl_s: m.ttl_s,
            }
            .validate()?;
        }
    }
    for (id, token) in &registry.tokens {
        validate_name("id", id)?;
        validate_token(token)?;
    }
    Ok(())
}

/// The outcome of applying one log entry; replicated answers must be data, not
/// `Err`, because every node applies the same entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Done,
    NotFound {
        what: String,
    },
    Rejected {
        reason: String,
    },
    /// One response per proposal of a [`Command::Batch`], in order.
    Batch(Vec<Response>),
}

/// The whole replicated registry. Services sit behind `Arc` so publishing a
/// new version clones only the service that changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    pub services: BTreeMap<String, Arc<Service>>,
    /// API tokens by id; replicated so a create or revoke holds on every node.
    #[serde(default)]
    pub tokens: BTreeMap<String, crate::auth::Token>,
    /// A backup being staged, only while services and tokens are empty.
    /// Replicated state, but not part of the registry's JSON (backups, the
    /// API); snapshots carry it on their own.
    #[serde(skip)]
    pub restoring: Option<Arc<StagedRestore>>,
}

impl Registry {
    pub fn member(&self, service: &str, member: &str) -> Option<&Member> {
        self.services.get(service)?.members.get(member)
    }

    pub fn member_count(&self) -> usize {
        self.services.values().map(|s| s.members.len()).sum()
    }

    /// No services and no tokens: what a backup restores into.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.tokens.is_empty()
    }

    /// Why `cmd` would change nothing, if it would: the same answer `apply`
    /// gives, without applying. The leader asks this before proposing, so a
    /// refused request writes nothing to the log.
    pub fn refusal(&self, cmd: &Command) -> Option<Response> {
        match cmd {
            Command::Register {
                service, create, ..
            } => (create.is_none() && !self.services.contains_key(service)).then(|| {
                Response::NotFound {
                    what: format!("service {service}"),
                }
            }),
            Command::Unregister { service, member }
            | Command::SetMemberState {
                service, member, ..
            } => self
                .member(service, member)
                .is_none()
                .then(|| not_found_member(service, member)),
            Command::DefineService { service, def } => self
                .services
                .iter()
                // Two frontends on one port would make haproxy refuse the whole config.
                .find(|(name, s)| *name != service && s.def.port == def.port)
                .map(|(other, _)| Response::Rejected {
                    reason: format!("port {} is already used by service {other}", def.port),
                }),
            Command::CreateToken { id, .. } => {
                self.tokens.contains_key(id).then(|| Response::Rejected {
                    reason: format!("token id {id} exists"),
                })
            }
            Command::RevokeToken { id } => {
                (!self.tokens.contains_key(id)).then(|| Response::NotFound {
                    what: format!("token {id}"),
                })
            }
            // Each proposal is judged when it is applied.
            Command::Batch(_) => None,
            Command::Restore { .. } => (!self.is_empty()).then(not_empty),
            Command::RestoreChunk { id, seq, part } => {
                if !self.is_empty() {
                    return Some(not_empty());
                }
                let staged = self.restoring.as_deref().filter(|s| s.id == *id);
                match staged {
                    // Proposed again (by another node, or after a lost answer).
                    Some(s) if *seq < s.parts => Some(Response::Done),
                    Some(s) if *seq > s.parts => Some(Response::Rejected {
                        reason: format!(
                            "part {seq} of backup {id:016x} is out of order: {} parts are staged",
                            s.parts
                        ),
                    }),
                    Some(s) => s.registry.conflict(part),
                    None if *seq == 0 => None,
                    None => Some(Response::Rejected {
                        reason: format!("backup {id:016x} is not staged; its part 0 comes first"),
                    }),
                }
            }
            Command::RestoreCommit { id, chunks } => {
                if !self.is_empty() {
                    return Some(not_empty());
                }
                match self.restoring.as_deref().filter(|s| s.id == *id) {
                    Some(s) if s.parts == *chunks => None,
                    Some(s) => Some(Response::Rejected {
                        reason: format!(
                            "backup {id:016x} has {} of its {chunks} parts staged",
                            s.parts
                        ),
                    }),
                    None => Some(Response::Rejected {
                        reason: format!("backup {id:016x} is not staged"),
                    }),
                }
            }
        }
    }

    /// A part that would give a staged service another definition.
    fn conflict(&self, part: &Registry) -> Option<Response> {
        part.services.iter().find_map(|(name, svc)| {
            let staged = self.services.get(name)?;
            (staged.def != svc.def).then(|| Response::Rejected {
                reason: format!("the backup defines service {name} twice, differently"),
            })
        })
    }

    /// Adds a part's services, members and tokens to this one.
    fn merge(&mut self, part: &Registry) {
        for (name, svc) in &part.services {
            match self.services.get_mut(name) {
                Some(staged) => {
                    let staged = Arc::make_mut(staged);
                    for (member, m) in &svc.members {
                        staged.members.insert(member.clone(), m.clone());
                    }
                }
                None => {
                    self.services.insert(name.clone(), svc.clone());
                }
            }
        }
        self.tokens
            .extend(part.tokens.iter().map(|(id, t)| (id.clone(), t.clone())));
    }

    /// Applies one command. A refused command changes nothing and says why.
    pub fn apply(&mut self, cmd: &Command) -> Response {
        // Every node refuses an invalid command, and the same way: nothing
        // unvalidated reaches a registry or a rendered file, whatever path
        // the command took into the log. A batch checks each of its parts.
        if !matches!(cmd, Command::Batch(_)) {
            if let Err(e) = cmd.validate() {
                return Response::Rejected {
                    reason: format!("invalid command: {e}"),
                };
            }
        }
        if let Some(refused) = self.refusal(cmd) {
            return refused;
        }
        let response = self.apply_unrefused(cmd);
        // A backup restores only into an empty registry: once anything else
        // is in it, the staged parts can never be committed.
        if !self.is_empty() {
            self.restoring = None;
        }
        response
    }

    fn apply_unrefused(&mut self, cmd: &Command) -> Response {
        match cmd {
            Command::Register {
                service,
                member,
                spec,
                create,
                at_ms,
            } => {
                if let (false, Some(def)) = (self.services.contains_key(service), create) {
                    self.services.insert(
                        service.clone(),
                        Arc::new(Service {
                            def: def.clone(),
                            members: Members::new(),
                        }),
                    );
                }
                // refusal() made sure the service exists by now.
                let Some(svc) = self.services.get_mut(service) else {
                    return Response::NotFound {
                        what: format!("service {service}"),
                    };
                };
                let svc = Arc::make_mut(svc);
                let port = spec.port.unwrap_or(svc.def.member_port);
                let weight = spec.weight.unwrap_or(DEFAULT_WEIGHT);
                match svc.members.get_mut(member) {
                    // Re-registration keeps the operator's state and the first registration time.
                    Some(m) => {
                        m.address.clone_from(&spec.address);
                        m.port = port;
                        m.weight = weight;
                        m.ttl_s = spec.ttl_s;
                    }
                    None => {
                        svc.members.insert(
                            member.clone(),
                            Member {
                                address: spec.address.clone(),
                                port,
                                weight,
                                state: MemberState::Active,
                                registered_at_ms: *at_ms,
                                ttl_s: spec.ttl_s,
                            },
                        );
                    }
                }
            }
            Command::Unregister { service, member } => {
                if let Some(svc) = self.services.get_mut(service) {
                    Arc::make_mut(svc).members.remove(member);
                }
            }
            Command::SetMemberState {
                service,
                member,
                state,
            } => {
                if let Some(svc) = self.services.get_mut(service) {
                    if let Some(m) = Arc::make_mut(svc).members.get_mut(member) {
                        m.state = *state;
                    }
                }
            }
            Command::CreateToken { id, token } => {
                self.tokens.insert(id.clone(), token.clone());
            }
            Command::RevokeToken { id } => {
                self.tokens.remove(id);
            }
            Command::Restore { registry } => {
                *self = (**registry).clone();
            }
            Command::RestoreChunk { id, part, .. } => {
                // refusal() let through part 0, or the next part of this backup.
                let slot = match &mut self.restoring {
                    Some(s) if s.id == *id => s,
                    other => other.insert(Arc::new(StagedRestore {
                        id: *id,
                        parts: 0,
                        registry: Registry::default(),
                    })),
                };
                let staged = Arc::make_mut(slot);
                staged.registry.merge(part);
                staged.parts += 1;
            }
            Command::RestoreCommit { .. } => {
                if let Some(staged) = self.restoring.take() {
                    *self = Arc::unwrap_or_clone(staged).registry;
                }
            }
            Command::Batch(proposals) => {
                let each = proposals.iter().map(|p| match &p.cmd {
                    Command::Batch(_) => Response::Rejected {
                        reason: "invalid command: batches do not nest".into(),
                    },
                    cmd => self.apply(cmd),
                });
                return Response::Batch(each.collect());
            }
            Command::DefineService { service, def } => match self.services.get_mut(service) {
                Some(s) => Arc::make_mut(s).def = def.clone(),
                None => {
                    self.services.insert(
                        service.clone(),
                        Arc::new(Service {
                            def: def.clone(),
                            members: Members::new(),
                        }),
                    );
                }
            },
        }
        Response::Done
    }
}

fn not_empty() -> Response {
    Response::Rejected {
        reason: "the registry is not empty; a backup restores only into an empty cluster".into(),
    }
}

fn not_found_member(service: &str, member: &str) -> Response {
    Response::NotFound {
        what: format!("member {member} of service {service}"),
    }
}

/// The registry keys commands may have changed: what the store rewrites
/// after applying them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    pub services: BTreeSet<String>,
    pub members: BTreeSet<(String, String)>,
    pub tokens: BTreeSet<String>,
}

impl Touched {
    /// Every key of `registry`.
    pub fn registry(&mut self, registry: &Registry) {
        for (name, svc) in &registry.services {
            self.services.insert(name.clone());
            for member in svc.members.keys() {
                self.members.insert((name.clone(), member.clone()));
            }
        }
        self.tokens.extend(registry.tokens.keys().cloned());
    }

    pub fn extend(&mut self, other: Touched) {
        self.services.extend(other.services);
        self.members.extend(other.members);
        self.tokens.extend(other.tokens);
    }

    /// Keys in all.
    pub fn len(&self) -> usize {
        self.services.len() + self.members.len() + self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Command {
    /// Adds the keys this command may change to `live` (the registry) and
    /// `staged` (the backup being staged). Beside [`Registry::apply`] so a
    /// new command gets both arms; a test checks one against the other.
    pub fn touches(&self, live: &mut Touched, staged: &mut Touched) {
        match self {
            Command::Register {
                service, member, ..
            } => {
                // May create the service.
                live.services.insert(service.clone());
                live.members.insert((service.clone(), member.clone()));
            }
            Command::Unregister { service, member }
            | Command::SetMemberState {
                service, member, ..
            } => {
                live.members.insert((service.clone(), member.clone()));
            }
            Command::DefineService { service, .. } => {
                live.services.insert(service.clone());
            }
            Command::CreateToken { id, .. } | Command::RevokeToken { id } => {
                live.tokens.insert(id.clone());
            }
            // Everything it names is written (refused when not empty).
            Command::Restore { registry } => live.registry(registry),
            Command::RestoreChunk { part, .. } => staged.registry(part),
            // What it makes live was staged already.
            Command::RestoreCommit { .. } => {}
            Command::Batch(proposals) => {
                for p in proposals {
                    p.cmd.touches(live, staged);
                }
            }
        }
    }
}

/// A registration of `member` at `address`:8080 in `service` (created as
/// http), for the unit tests of this and other modules.
#[cfg(test)]
pub(crate) fn register_for_test(service: &str, member: &str, address: &str) -> Command {
    Command::Register {
        service: service.into(),
        member: member.into(),
        spec: MemberSpec {
            address: address.into(),
            port: Some(8080),
            weight: None,
            ttl_s: None,
        },
        create: ServiceDef::well_known("http"),
        at_ms: 7,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::register_for_test as reg;

    #[test]
    fn the_leader_checks_each_command_against_the_scope() {
        let unreg = |svc: &str| Command::Unregister {
            service: svc.into(),
            member: "web-1".into(),
        };
        let web: Scope = "register:web:web-*".parse().unwrap();
        assert!(unreg("web").allowed_by(&web));
        assert!(!unreg("db").allowed_by(&web));
        assert!(!Command::RevokeToken { id: "x".into() }.allowed_by(&web));
        assert!(Command::RevokeToken { id: "x".into() }.allowed_by(&Scope::Admin));
        assert!(!unreg("web").allowed_by(&Scope::Read));
        // Batches are the leader's own; no caller may send one.
        assert!(!Command::Batch(vec![]).allowed_by(&Scope::Admin));
    }

    #[test]
    fn names_accept_the_documented_set_only() {
        for ok in ["a", "web-1", "A.b_c-9", &"x".repeat(63)] {
            assert!(validate_name("member", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            ".a",
            "a b",
            "a\nb",
            "a#b",
            "a\"b",
            "a'b",
            "a/b",
            "../x",
            "a\0b",
            "wеb", // Cyrillic е
            &"x".repeat(64),
        ] {
            let err = validate_name("member", bad).unwrap_err();
            assert_eq!(err.field, "member", "{bad:?}");
        }
    }

    #[test]
    fn addresses_are_ip_literals_or_hostnames() {
        for ok in [
            "10.0.0.1",
            "::1",
            "fe80::1",
            "web-1.example.com",
            "localhost",
            "a.b.",
        ] {
            assert!(validate_address(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "10.0.0.256",
            "1.2.3",
            "a b",
            "a\nserver x 1.2.3.4:80",
            "a#b",
            "-a.com",
            "a-.com",
            "a..b",
            "[::1]",
            "10.0.0.1:80",
            &"a".repeat(254),
        ] {
            assert!(validate_address(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ports_and_weights_have_ranges() {
        assert!(validate_port("port", 0).is_err());
        assert_eq!(validate_port("port", 1), Ok(1));
        assert_eq!(validate_port("port", 65535), Ok(65535));
        assert!(validate_port("port", 65536).is_err());
        assert_eq!(validate_weight(0), Ok(0));
        assert_eq!(validate_weight(256), Ok(256));
        assert_eq!(validate_weight(257).unwrap_err().field, "weight");
    }

    #[test]
    fn check_paths_cannot_inject() {
        for bad in [
            "x",
            "/../etc",
            "/a/..?x",
            "/a b",
            "/a\nb",
            "/a#b",
            "/\"",
            &format!("/{}", "a".repeat(300)),
        ] {
            let def = ServiceDef {
                check: Check::Http { path: bad.into() },
                ..ServiceDef::well_known("http").unwrap()
            };
            assert_eq!(def.validate().unwrap_err().field, "check.path", "{bad:?}");
        }
    }

    #[test]
    fn server_options_have_ranges() {
        let mut def = ServiceDef::well_known("http").unwrap();
        def.server.maxconn = Some(0);
        assert_eq!(def.validate().unwrap_err().field, "server.maxconn");
        def.server.maxconn = Some(100);
        def.server.fall = Some(101);
        assert_eq!(def.validate().unwrap_err().field, "server.fall");
        def.server.fall = Some(5);
        assert!(def.validate().is_ok());
    }

    #[test]
    fn service_defaults_cover_well_known_and_configured_names() {
        let mut d = ServiceDefaults::default();
        assert_eq!(d.definition("http").unwrap().port, 80);
        assert!(d.definition("myapp").is_none());
        d.ports.insert("myapp".into(), 8080);
        d.balance = Some(Balance::Leastconn);
        let def = d.definition("myapp").unwrap();
        assert_eq!(
            (def.port, def.member_port, def.balance),
            (8080, 8080, Balance::Leastconn)
        );
        // An invalid combination creates nothing rather than a broken service.
        d.mode = Some(Mode::Tcp);
        d.check = Some(Check::Http { path: "/h".into() });
        assert!(d.definition("myapp").is_none());
    }

    #[test]
    fn register_creates_the_service_and_is_an_idempotent_upsert() {
        let mut r = Registry::default();
        assert_eq!(r.apply(&reg("http", "a", "10.0.0.1")), Response::Done);
        let first = r.clone();
        assert_eq!(r.apply(&reg("http", "a", "10.0.0.1")), Response::Done);
        assert_eq!(r, first);
        let m = r.member("http", "a").unwrap();
        assert_eq!(
            (m.port, m.weight, m.state),
            (8080, DEFAULT_WEIGHT, MemberState::Active)
        );
        assert_eq!(r.services["http"].def.port, 80);
    }

    #[test]
    fn register_without_port_takes_the_service_member_port() {
        let mut r = Registry::default();
        let mut cmd = reg("http", "a", "10.0.0.1");
        if let Command::Register { spec, .. } = &mut cmd {
            spec.port = None;
        }
        r.apply(&cmd);
        assert_eq!(r.member("http", "a").unwrap().port, 80);
    }

    #[test]
    fn register_for_unknown_service_without_create_is_not_found() {
        let mut r = Registry::default();
        let mut cmd = reg("custom", "a", "10.0.0.1");
        if let Command::Register { create, .. } = &mut cmd {
            *create = None;
        }
        assert!(matches!(r.apply(&cmd), Response::NotFound { .. }));
        assert_eq!(r, Registry::default());
    }

    #[test]
    fn reregistration_keeps_state_and_first_time() {
        let mut r = Registry::default();
        r.apply(&reg("http", "a", "10.0.0.1"));
        r.apply(&Command::SetMemberState {
            service: "http".into(),
            member: "a".into(),
            state: MemberState::Drain,
        });
        let mut again = reg("http", "a", "10.0.0.2");
        if let Command::Register { at_ms, .. } = &mut again {
            *at_ms = 99;
        }
        r.apply(&again);
        let m = r.member("http", "a").unwrap();
        assert_eq!(m.address, "10.0.0.2");
        assert_eq!(m.state, MemberState::Drain);
        assert_eq!(m.registered_at_ms, 7);
    }

    #[test]
    fn unregister_and_state_change_of_absent_member_change_nothing() {
        let mut r = Registry::default();
        r.apply(&reg("http", "a", "10.0.0.1"));
        let before = r.clone();
        let un = Command::Unregister {
            service: "http".into(),
            member: "b".into(),
        };
        assert!(matches!(r.apply(&un), Response::NotFound { .. }));
        let st = Command::SetMemberState {
            service: "nope".into(),
            member: "a".into(),
            state: MemberState::Maint,
        };
        assert!(matches!(r.apply(&st), Response::NotFound { .. }));
        assert_eq!(r, before);
    }

    #[test]
    fn unregister_removes_only_that_member() {
        let mut r = Registry::default();
        r.apply(&reg("http", "a", "10.0.0.1"));
        r.apply(&reg("http", "b", "10.0.0.2"));
        let un = Command::Unregister {
            service: "http".into(),
            member: "a".into(),
        };
        assert_eq!(r.apply(&un), Response::Done);
        assert!(r.member("http", "a").is_none());
        assert!(r.member("http", "b").is_some());
    }

    #[test]
    fn restore_replaces_an_empty_registry_once() {
        let mut backup = Registry::default();
        backup.apply(&reg("http", "a", "10.0.0.1"));
        let restore = Command::Restore {
            registry: Box::new(backup.clone()),
        };
        assert!(restore.validate().is_ok());
        let mut r = Registry::default();
        assert_eq!(r.apply(&restore), Response::Done);
        assert_eq!(r, backup);
        // A second restore (another node given the same file) is refused.
        assert!(matches!(r.apply(&restore), Response::Rejected { .. }));
        assert_eq!(r, backup);
    }

    #[test]
    fn a_restore_in_parts_stays_staged_until_its_commit() {
        let mut backup = Registry::default();
        for i in 0..3 {
            backup.apply(&reg("http", &format!("m{i}"), "10.0.0.1"));
        }
        let part = |members: &[&str]| {
            let mut r = backup.clone();
            let svc = Arc::make_mut(r.services.get_mut("http").unwrap());
            svc.members = svc
                .members
                .iter()
                .filter(|(name, _)| members.contains(&name.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            Box::new(r)
        };
        let chunk = |id, seq, p| Command::RestoreChunk { id, seq, part: p };
        let commit = |id, chunks| Command::RestoreCommit { id, chunks };
        let mut r = Registry::default();
        assert_eq!(r.apply(&chunk(7, 0, part(&["m0", "m1"]))), Response::Done);
        // Staged, not live.
        assert!(r.services.is_empty());
        assert_eq!(r.restoring.as_ref().unwrap().parts, 1);
        // Too early, out of order, unknown: refused, nothing changes.
        let staged = r.clone();
        for cmd in [
            commit(7, 2),
            chunk(7, 2, part(&["m2"])),
            chunk(8, 1, part(&["m2"])),
            commit(8, 1),
        ] {
            assert!(
                matches!(r.apply(&cmd), Response::Rejected { .. }),
                "{cmd:?}"
            );
            assert_eq!(r, staged);
        }
        // A part staged already (another node's proposal) is Done, once.
        assert_eq!(r.refusal(&chunk(7, 0, part(&["m0"]))), Some(Response::Done));
        assert_eq!(r.apply(&chunk(7, 0, part(&["m0"]))), Response::Done);
        assert_eq!(r, staged);
        assert_eq!(r.apply(&chunk(7, 1, part(&["m2"]))), Response::Done);
        assert_eq!(r.apply(&commit(7, 2)), Response::Done);
        assert_eq!(r, backup);
        assert!(r.restoring.is_none());
        // Once: the registry is not empty any more.
        assert!(matches!(r.apply(&commit(7, 2)), Response::Rejected { .. }));
        assert!(matches!(
            r.apply(&chunk(9, 0, part(&["m0"]))),
            Response::Rejected { .. }
        ));
        assert_eq!(r, backup);
    }

    #[test]
    fn a_staged_restore_gives_way() {
        let mut backup = Registry::default();
        backup.apply(&reg("http", "a", "10.0.0.1"));
        let chunk = |id, seq| Command::RestoreChunk {
            id,
            seq,
            part: Box::new(backup.clone()),
        };
        let mut r = Registry::default();
        r.apply(&chunk(1, 0));
        // Part 0 of another backup starts over.
        assert_eq!(r.apply(&chunk(2, 0)), Response::Done);
        assert_eq!(r.restoring.as_ref().map(|s| (s.id, s.parts)), Some((2, 1)));
        assert!(matches!(r.apply(&chunk(1, 1)), Response::Rejected { .. }));
        // Anything else in the registry ends the staging.
        assert_eq!(r.apply(&reg("http", "x", "10.0.0.9")), Response::Done);
        assert!(r.restoring.is_none());
        assert!(matches!(
            r.apply(&Command::RestoreCommit { id: 2, chunks: 1 }),
            Response::Rejected { .. }
        ));
        assert_eq!(r.member_count(), 1);
        // A part that redefines a staged service differently is refused.
        let mut r = Registry::default();
        r.apply(&chunk(3, 0));
        let mut other = backup.clone();
        Arc::make_mut(other.services.get_mut("http").unwrap())
            .def
            .port = 81;
        let redefine = Command::RestoreChunk {
            id: 3,
            seq: 1,
            part: Box::new(other),
        };
        assert!(matches!(r.apply(&redefine), Response::Rejected { .. }));
        assert_eq!(r.restoring.as_ref().unwrap().parts, 1);
    }

    #[test]
    fn restore_parts_are_validated_and_bounded() {
        let mut big = Registry::default();
        for i in 0..=RESTORE_PART_ITEMS {
            big.apply(&reg("http", &format!("m{i}"), "10.0.0.1"));
        }
        let too_big = Command::RestoreChunk {
            id: 1,
            seq: 0,
            part: Box::new(big),
        };
        assert_eq!(too_big.validate().unwrap_err().field, "part");
        let mut bad = Registry::default();
        bad.apply(&reg("http", "a", "10.0.0.1"));
        Arc::make_mut(bad.services.get_mut("http").unwrap())
            .members
            .get_mut("a")
            .unwrap()
            .address = "a b".into();
        let bad = Command::RestoreChunk {
            id: 1,
            seq: 0,
            part: Box::new(bad),
        };
        assert_eq!(bad.validate().unwrap_err().field, "address");
        let none = Command::RestoreCommit { id: 1, chunks: 0 };
        assert_eq!(none.validate().unwrap_err().field, "chunks");
    }

    /// The keys whose stored value differs between `a` and `b`.
    fn changed(a: &Registry, b: &Registry) -> Touched {
        let mut t = Touched::default();
        let names: BTreeSet<&String> = a.services.keys().chain(b.services.keys()).collect();
        for name in names {
            let (sa, sb) = (a.services.get(name), b.services.get(name));
            if sa.map(|s| &s.def) != sb.map(|s| &s.def) {
                t.services.insert(name.clone());
            }
            let empty = Members::new();
            let ma = sa.map_or(&empty, |s| &s.members);
            let mb = sb.map_or(&empty, |s| &s.members);
            for m in ma.keys().chain(mb.keys()) {
                if ma.get(m) != mb.get(m) {
                    t.members.insert((name.clone(), m.clone()));
                }
            }
        }
        for id in a.tokens.keys().chain(b.tokens.keys()) {
            if a.tokens.get(id) != b.tokens.get(id) {
                t.tokens.insert(id.clone());
            }
        }
        t
    }

    fn covers(touched: &Touched, changed: &Touched) -> bool {
        changed.services.is_subset(&touched.services)
            && changed.members.is_subset(&touched.members)
            && changed.tokens.is_subset(&touched.tokens)
    }

    /// The store rewrites only the keys `touches` names: every key `apply`
    /// changes must be among them, for every kind of command.
    #[test]
    fn touches_names_every_key_apply_changes() {
        let token = crate::auth::Token {
            name: "ci".into(),
            scope: Scope::Read,
            hash: "00".repeat(32),
            created_at_ms: 1,
            expires_at_ms: None,
            created_by: "test".into(),
        };
        let mut backup = Registry::default();
        backup.apply(&reg("db", "d1", "10.0.0.9"));
        let mut web_def = ServiceDef::well_known("http").unwrap();
        web_def.port = 8081;
        let cmds = vec![
            reg("http", "a", "10.0.0.1"),
            reg("http", "b", "10.0.0.2"),
            Command::SetMemberState {
                service: "http".into(),
                member: "a".into(),
                state: MemberState::Drain,
            },
            Command::DefineService {
                service: "web".into(),
                def: web_def,
            },
            Command::CreateToken {
                id: "t1".into(),
                token,
            },
            Command::Batch(vec![
                proposal(reg("http", "c", "10.0.0.3")),
                proposal(Command::RevokeToken { id: "t1".into() }),
            ]),
            Command::Unregister {
                service: "http".into(),
                member: "b".into(),
            },
        ];
        let mut r = Registry::default();
        for cmd in &cmds {
            let before = r.clone();
            let done = match r.apply(cmd) {
                Response::Batch(each) => each.iter().all(|e| *e == Response::Done),
                one => one == Response::Done,
            };
            assert!(done, "{cmd:?}");
            let (mut live, mut staged) = (Touched::default(), Touched::default());
            cmd.touches(&mut live, &mut staged);
            let diff = changed(&before, &r);
            assert!(!diff.is_empty(), "{cmd:?} changed nothing: a weak test");
            assert!(covers(&live, &diff), "{cmd:?}: {diff:?} not in {live:?}");
        }

        // A whole restore into an empty registry.
        let mut r = Registry::default();
        let restore = Command::Restore {
            registry: Box::new(backup.clone()),
        };
        assert_eq!(r.apply(&restore), Response::Done);
        let (mut live, mut staged) = (Touched::default(), Touched::default());
        restore.touches(&mut live, &mut staged);
        assert!(covers(&live, &changed(&Registry::default(), &r)));

        // In parts: each part's keys are staged; the commit makes live only
        // keys the parts staged.
        let mut r = Registry::default();
        let (mut live, mut staged) = (Touched::default(), Touched::default());
        let chunk = Command::RestoreChunk {
            id: 3,
            seq: 0,
            part: Box::new(backup.clone()),
        };
        assert_eq!(r.apply(&chunk), Response::Done);
        chunk.touches(&mut live, &mut staged);
        let staged_now = r.restoring.as_ref().unwrap().registry.clone();
        assert!(covers(&staged, &changed(&Registry::default(), &staged_now)));
        let commit = Command::RestoreCommit { id: 3, chunks: 1 };
        assert_eq!(r.apply(&commit), Response::Done);
        commit.touches(&mut live, &mut staged);
        assert!(live.is_empty());
        assert!(covers(&staged, &changed(&Registry::default(), &r)));
    }

    fn proposal(cmd: Command) -> Proposal {
        Proposal {
            cmd,
            by: "test".into(),
            at_ms: 1,
            force: false,
        }
    }

    #[test]
    fn a_batch_applies_in_order_with_a_response_each() {
        let mut r = Registry::default();
        let unregister = |member: &str| Command::Unregister {
            service: "http".into(),
            member: member.into(),
        };
        let batch = Command::Batch(vec![
            proposal(reg("http", "a", "10.0.0.1")),
            proposal(unregister("zz")),
            proposal(unregister("a")),
            proposal(reg("http", "b", "10.0.0.2")),
        ]);
        assert!(batch.validate().is_ok());
        let Response::Batch(each) = r.apply(&batch) else {
            panic!("a batch answers a batch");
        };
        assert_eq!(each.len(), 4);
        assert_eq!(each[0], Response::Done);
        assert!(matches!(each[1], Response::NotFound { .. }));
        assert_eq!((&each[2], &each[3]), (&Response::Done, &Response::Done));
        assert!(r.member("http", "a").is_none());
        assert!(r.member("http", "b").is_some());
        let nested = Command::Batch(vec![proposal(batch)]);
        assert_eq!(nested.validate().unwrap_err().field, "batch");
    }

    #[test]
    fn a_published_registry_does_not_see_later_applies() {
        let mut r = Registry::default();
        for i in 0..1_000 {
            r.apply(&reg("http", &format!("m{i}"), "10.0.0.1"));
        }
        let published = r.clone();
        r.apply(&reg("http", "new", "10.0.0.9"));
        r.apply(&Command::Unregister {
            service: "http".into(),
            member: "m1".into(),
        });
        assert!(published.member("http", "new").is_none());
        assert!(published.member("http", "m1").is_some());
        assert_eq!(published.services["http"].members.len(), 1_000);
        assert_eq!(r.services["http"].members.len(), 1_000);
        assert!(r.member("http", "new").is_some());
    }

    #[test]
    fn define_service_refuses_a_port_already_taken() {
        let mut r = Registry::default();
        let def = ServiceDef::well_known("http").unwrap();
        let a = Command::DefineService {
            service: "a".into(),
            def: def.clone(),
        };
        assert_eq!(r.apply(&a), Response::Done);
        // Redefining the same service on its own port is fine.
        assert_eq!(r.apply(&a), Response::Done);
        let before = r.clone();
        let b = Command::DefineService {
            service: "b".into(),
            def,
        };
        assert!(matches!(r.apply(&b), Response::Rejected { .. }));
        assert_eq!(r, before);
    }

    #[test]
    fn command_validation_names_the_field() {
        let mut cmd = reg("http", "a", "10.0.0.1 #");
        assert_eq!(cmd.validate().unwrap_err().field, "address");
        if let Command::Register { spec, .. } = &mut cmd {
            spec.address = "10.0.0.1".into();
            spec.weight = Some(300);
        }
        assert_eq!(cmd.validate().unwrap_err().field, "weight");
        let bad_svc = Command::Unregister {
            service: "a\nb".into(),
            member: "x".into(),
        };
        assert_eq!(bad_svc.validate().unwrap_err().field, "service");
    }

    #[test]
    fn apply_refuses_invalid_commands_on_every_node() {
        let mut r = Registry::default();
        // A newline in an address would inject a line into haproxy.cfg.
        let injected = reg("http", "a", "10.0.0.1\n    server evil 6.6.6.6:80");
        assert!(
            matches!(r.apply(&injected), Response::Rejected { reason } if reason.starts_with("invalid command"))
        );
        assert_eq!(r, Registry::default());
        // Inside a batch, only the invalid part is refused.
        let p = |cmd| Proposal {
            cmd,
            by: "t".into(),
            at_ms: 0,
            force: false,
        };
        let batch = Command::Batch(vec![p(reg("http", "ok", "10.0.0.2")), p(injected)]);
        let Response::Batch(each) = r.apply(&batch) else {
            panic!("batch answer")
        };
        assert_eq!(each[0], Response::Done);
        assert!(matches!(each[1], Response::Rejected { .. }));
        assert_eq!(r.member_count(), 1);
        // A token whose hash is not a SHA-256 is not stored.
        let token = crate::auth::Token {
            name: "x".into(),
            scope: crate::auth::Scope::Admin,
            hash: "not-a-hash".into(),
            created_at_ms: 0,
            expires_at_ms: None,
            created_by: "bootstrap".into(),
        };
        let create = Command::CreateToken {
            id: "abc".into(),
            token,
        };
        assert!(matches!(r.apply(&create), Response::Rejected { .. }));
        assert!(r.tokens.is_empty());
    }

    #[test]
    fn unknown_fields_are_refused_inside_checks_too() {
        let ok: Check = serde_json::from_str(r#"{"http": {"path": "/h"}}"#).unwrap();
        assert_eq!(ok, Check::Http { path: "/h".into() });
        let e = serde_json::from_str::<Check>(r#"{"http": {"path": "/h", "evil": "x"}}"#);
        assert!(e.unwrap_err().to_string().contains("unknown field"));
    }
}
