//! haproxy.cfg from a minijinja template (strict undefined) and a context
//! built deterministically from the registry: same registry, same bytes.

use std::path::{Path, PathBuf};

use std::sync::Arc;

use minijinja::value::{Enumerator, Object, ObjectExt, ObjectRepr, Value};
use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;

use crate::model::{Check, Member, MemberState, Mode, Registry, Service};

/// The template shipped in the binary.
pub const BUILTIN: &str = include_str!("../../templates/haproxy.cfg.j2");
pub const TEMPLATE_NAME: &str = "haproxy.cfg.j2";

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("read template {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("template {name} line {line}: {detail}")]
    Syntax {
        name: String,
        line: usize,
        detail: String,
    },
    #[error("render {name} line {line}: {detail}")]
    Render {
        name: String,
        line: usize,
        detail: String,
    },
    /// The render task panicked or was cancelled.
    #[error("render task failed: {0}")]
    Task(String),
}

/// Node-local values the template may use besides the registry.
#[derive(Debug, Clone, Serialize, Default)]
pub struct NodeContext {
    pub node_id: u64,
    pub role: String,
    /// The leader at render time; the built-in template does not use it, so a
    /// failover does not change the config.
    pub leader: Option<u64>,
    pub vip: Option<String>,
    pub peers: Vec<Peer>,
    pub haproxy_socket: Option<String>,
    /// `Some`: the admin socket is mode 660 for this group, else 600.
    pub haproxy_socket_group: Option<String>,
    /// Address frontends bind to [default: `*`, every address, so the VIP works
    /// wherever it lands].
    pub bind_address: String,
    pub stats_bind: String,
    pub stats_port: Option<u16>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Peer {
    pub id: u64,
    pub addr: String,
}

#[derive(Serialize)]
struct Context<'a> {
    #[serde(flatten)]
    node: &'a NodeContext,
    services: Vec<ServiceCtx<'a>>,
}

#[derive(Serialize)]
struct ServiceCtx<'a> {
    name: &'a str,
    port: u16,
    member_port: u16,
    mode: &'static str,
    balance: &'static str,
    check: CheckCtx<'a>,
    /// Iterable of members (name, address, addr, port, weight, state, options).
    members: Value,
    /// The backend's `server` lines, preformatted (one `\n    server ...` each).
    server_lines: String,
}

#[derive(Serialize)]
struct CheckCtx<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    path: Option<&'a str>,
}

#[derive(Serialize)]
struct MemberCtx<'a> {
    name: &'a str,
    address: &'a str,
    /// `address`, bracketed when IPv6, ready for `addr:port`.
    addr: String,
    port: u16,
    weight: u16,
    state: String,
    /// Everything after `server NAME ADDR:PORT`, exactly what the runtime API
    /// adds, so a reload and a runtime change leave haproxy in the same state.
    options: String,
    /// 1-based position in the service: the id haproxy would give it.
    id: usize,
}

/// `ADDR` as haproxy wants it before `:PORT`.
pub fn server_addr(address: &str) -> String {
    if address.contains(':') {
        format!("[{address}]")
    } else {
        address.to_string()
    }
}

/// The server keywords for a member of `svc`.
pub fn server_options(svc: &Service, m: &Member) -> String {
    let mut out = String::with_capacity(64);
    write_server_options(&mut out, svc, m);
    out
}

/// Appends the server keywords for a member of `svc` to `out` (no allocation
/// per member: rendering 100k members is dominated by this).
fn write_server_options(out: &mut String, svc: &Service, m: &Member) {
    use std::fmt::Write;
    // Drain is weight 0 in a file: no new sessions, existing ones continue.
    let weight = if m.state == MemberState::Drain {
        0
    } else {
        m.weight
    };
    let o = &svc.def.server;
    let _ = write!(out, "weight {weight}");
    if let Some(n) = o.maxconn {
        let _ = write!(out, " maxconn {n}");
    }
    if let Some(s) = o.slowstart_s {
        let _ = write!(out, " slowstart {s}s");
    }
    if o.send_proxy {
        out.push_str(" send-proxy-v2");
    }
    if svc.def.check != Check::None {
        let _ = write!(
            out,
            " check inter {}ms fall {} rise {}",
            o.check_inter_ms.unwrap_or(2_000),
            o.fall.unwrap_or(3),
            o.rise.unwrap_or(2)
        );
    }
    if m.state == MemberState::Maint {
        out.push_str(" disabled");
    }
}

/// Every member's `server` line, each preceded by a newline and indented:
/// what the built-in template emits per backend.
fn server_lines(svc: &Service) -> String {
    let mut out = String::with_capacity(svc.members.len() * 104);
    for (i, (name, m)) in svc.members.iter().enumerate() {
        out.push_str("\n    server ");
        out.push_str(name);
        out.push(' ');
        if m.address.contains(':') {
            out.push('[');
            out.push_str(&m.address);
            out.push(']');
        } else {
            out.push_str(&m.address);
        }
        out.push(':');
        out.push_str(&m.port.to_string());
        out.push(' ');
        write_server_options(&mut out, svc, m);
        // The ids haproxy would number them with, made explicit: haproxy 2.6
        // searches the ids in use for each server without one, so checking
        // 100k servers took 164 s, 0.9 s with ids (docs/benchmarks.md).
        let _ = std::fmt::Write::write_fmt(&mut out, format_args!(" id {}", i + 1));
    }
    out
}

/// `svc.members` in the template: built only when a template iterates it,
/// so the built-in template (which uses `server_lines`) does not pay for it.
#[derive(Debug)]
struct Members(Arc<Service>);

impl Object for Members {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Iterable
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        self.mapped_enumerator(|this| {
            let svc = &this.0;
            Box::new(svc.members.iter().enumerate().map(move |(i, (name, m))| {
                Value::from_serialize(MemberCtx {
                    name,
                    address: &m.address,
                    addr: server_addr(&m.address),
                    port: m.port,
                    weight: m.weight,
                    state: m.state.to_string(),
                    options: server_options(svc, m),
                    id: i + 1,
                })
            }))
        })
    }
}

pub fn mode_str(mode: Mode) -> &'static str {
    match mode {
        Mode::Http => "http",
        Mode::Tcp => "tcp",
    }
}

pub fn balance_str(b: crate::model::Balance) -> &'static str {
    use crate::model::Balance::*;
    match b {
        Roundrobin => "roundrobin",
        Leastconn => "leastconn",
        First => "first",
        Random => "random",
    }
}

/// A compiled template.
pub struct Template {
    env: Environment<'static>,
    /// Where it came from, for error messages.
    pub origin: String,
}

impl Template {
    /// `DIR/haproxy.cfg.j2` when a template dir is given, else the built-in.
    pub fn load(dir: Option<&Path>) -> Result<Template, TemplateError> {
        match dir {
            Some(dir) => {
                let path: PathBuf = dir.join(TEMPLATE_NAME);
                let source =
                    std::fs::read_to_string(&path).map_err(|source| TemplateError::Read {
                        path: path.display().to_string(),
                        source,
                    })?;
                Self::compile(path.display().to_string(), source)
            }
            None => Self::compile(format!("built-in {TEMPLATE_NAME}"), BUILTIN.to_string()),
        }
    }

    pub fn compile(origin: String, source: String) -> Result<Template, TemplateError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_trim_blocks(false);
        env.set_keep_trailing_newline(true);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| TemplateError::Syntax {
                name: origin.clone(),
                line: e.line().unwrap_or(0),
                detail: e.detail().unwrap_or(&e.to_string()).to_string(),
            })?;
        Ok(Template { env, origin })
    }

    pub fn render(&self, registry: &Registry, node: &NodeContext) -> Result<String, TemplateError> {
        let services = registry
            .services
            .iter()
            .map(|(name, svc)| ServiceCtx {
                name,
                port: svc.def.port,
                member_port: svc.def.member_port,
                mode: mode_str(svc.def.mode),
                balance: balance_str(svc.def.balance),
                check: match &svc.def.check {
                    Check::None => CheckCtx {
                        kind: "none",
                        path: None,
                    },
                    Check::Tcp => CheckCtx {
                        kind: "tcp",
                        path: None,
                    },
                    Check::Http { path } => CheckCtx {
                        kind: "http",
                        path: Some(path),
                    },
                },
                members: Value::from_object(Members(svc.clone())),
                server_lines: server_lines(svc),
            })
            .collect();
        let ctx = Context { node, services };
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| self.render_error(e))?;
        tmpl.render(&ctx).map_err(|e| self.render_error(e))
    }

    fn render_error(&self, e: minijinja::Error) -> TemplateError {
        TemplateError::Render {
            name: self.origin.clone(),
            line: e.line().unwrap_or(0),
            detail: e.detail().unwrap_or(&e.to_string()).to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Command, MemberSpec, ServiceDef};

    fn registry() -> Registry {
        let mut r = Registry::default();
        for (svc, member, addr, port) in [
            ("http", "web2", "10.0.0.2", 8080),
            ("http", "web1", "10.0.0.1", 8080),
            ("mysql", "db1", "fd00::1", 3306),
        ] {
            r.apply(&Command::Register {
                service: svc.into(),
                member: member.into(),
                spec: MemberSpec {
                    address: addr.into(),
                    port: Some(port),
                    weight: None,
                    ttl_s: None,
                },
                create: ServiceDef::well_known(svc),
                at_ms: 1,
            });
        }
        r.apply(&Command::SetMemberState {
            service: "http".into(),
            member: "web2".into(),
            state: MemberState::Maint,
        });
        r
    }

    fn node() -> NodeContext {
        NodeContext {
            node_id: 1,
            role: "balancer".into(),
            bind_address: "*".into(),
            stats_bind: "127.0.0.1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn builtin_renders_services_and_members_in_order() {
        let t = Template::load(None).unwrap();
        let out = t.render(&registry(), &node()).unwrap();
        let web1 = out
            .find("server web1 10.0.0.1:8080 weight 100 check inter 2000ms")
            .unwrap();
        let web2 = out
            .find("server web2 10.0.0.2:8080 weight 100 check inter 2000ms fall 3 rise 2 disabled")
            .unwrap();
        assert!(web1 < web2, "members sorted by name");
        assert!(out.contains("server db1 [fd00::1]:3306"));
        assert!(out.contains("frontend fe_http\n    bind *:80\n    mode http"));
        assert!(out.contains("frontend fe_mysql\n    bind *:3306\n    mode tcp"));
        assert!(!out.contains("stats socket"), "no socket unless configured");
    }

    #[test]
    fn the_admin_socket_is_private_unless_a_group_is_named() {
        let t = Template::load(None).unwrap();
        let mut n = node();
        n.haproxy_socket = Some("/run/haproxy/admin.sock".into());
        let out = t.render(&registry(), &n).unwrap();
        assert!(out.contains("stats socket /run/haproxy/admin.sock mode 600 level admin"));
        n.haproxy_socket_group = Some("clb".into());
        let out = t.render(&registry(), &n).unwrap();
        assert!(out.contains("stats socket /run/haproxy/admin.sock mode 660 group clb level admin"));
    }

    #[test]
    fn rendering_is_deterministic() {
        let t = Template::load(None).unwrap();
        let a = t.render(&registry(), &node()).unwrap();
        // Same registry built in another order.
        let b = t.render(&registry().clone(), &node()).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn members_iterate_lazily_to_the_same_lines_as_server_lines() {
        let t = Template::compile(
            "t.j2".into(),
            "{% for svc in services %}{{ svc.members|length }}:{% for m in svc.members %}\n    server {{ m.name }} {{ m.addr }}:{{ m.port }} {{ m.options }} id {{ m.id }}{% endfor %}|{{ svc.server_lines }}|{% endfor %}".into(),
        )
        .unwrap();
        let out = t.render(&registry(), &node()).unwrap();
        for part in out.split_terminator('|').collect::<Vec<_>>().chunks(2) {
            let (count_and_loop, lines) = (part[0], part[1]);
            let (count, looped) = count_and_loop.split_once(':').unwrap();
            assert_eq!(looped, lines);
            assert_eq!(
                count.parse::<usize>().unwrap(),
                lines.matches("server ").count()
            );
        }
        assert!(out.contains("server db1 [fd00::1]:3306"));
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = Template::compile("t.j2".into(), "ok\n{% for x in %}\n".into())
            .err()
            .unwrap();
        assert!(
            matches!(err, TemplateError::Syntax { line: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn undefined_variables_are_errors() {
        let t = Template::compile("t.j2".into(), "a\n{{ nope }}\n".into()).unwrap();
        let err = t.render(&registry(), &node()).unwrap_err();
        assert!(
            matches!(err, TemplateError::Render { line: 2, .. }),
            "{err}"
        );
    }
}
