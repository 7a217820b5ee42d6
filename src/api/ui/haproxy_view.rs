//! The page's haproxy columns: what each balancer's haproxy says about each
//! member (from its `show stat`, carried in `node_view`), beside what the
//! registry says, and where the two disagree.
//!
//! Members are matched by the built-in template's names: backend
//! `be_<service>`, server `<member>`. A custom template that names them
//! otherwise shows every member as missing from haproxy.

use std::fmt::Write as _;

use super::{ago, badge, esc};
use crate::consensus::Role;
use crate::model::MemberState;
use crate::render::haproxy::backend_name;
use crate::render::stat::{Backend, Server, Snapshot, MAX_SERVERS};
use crate::views::NodeView;

/// What one node can tell about its haproxy.
pub enum View {
    /// The node did not answer.
    NoAnswer,
    Witness,
    /// A balancer without an admin socket (or a clbd from before this view).
    NoSocket,
    /// Its haproxy did not answer `show stat`.
    Failed {
        at_ms: u64,
        error: String,
    },
    Seen(Snapshot),
}

impl View {
    /// From a node's `node_view` (`None`: it did not answer).
    pub fn of(status: Option<&NodeView>) -> View {
        let Some(status) = status else {
            return View::NoAnswer;
        };
        if status.role == Some(Role::Witness) {
            return View::Witness;
        }
        let Some(s) = &status.haproxy else {
            return View::NoSocket;
        };
        match &s.error {
            Some(error) => View::Failed {
                at_ms: s.at_ms,
                error: error.clone(),
            },
            None => View::Seen((**s).clone()),
        }
    }

    /// Whether this node gets a column in the services' tables: balancers,
    /// and nodes that did not say what they are.
    pub fn has_column(&self) -> bool {
        !matches!(self, View::Witness)
    }

    fn backend(&self, service: &str) -> Option<&Backend> {
        match self {
            View::Seen(s) => s.backends.get(&backend_name(service)),
            _ => None,
        }
    }

    /// Servers haproxy has in `service`'s backend.
    pub fn servers(&self, service: &str) -> impl Iterator<Item = &String> {
        self.backend(service)
            .into_iter()
            .flat_map(|b| b.servers.keys())
    }
}

/// How a haproxy status reads: (css class, short word for the legend).
pub fn status_class(status: &str) -> &'static str {
    let first = status.split_whitespace().next().unwrap_or("");
    match first {
        // `UP 2/3`: checks failing, not down yet.
        "UP" if status != "UP" => "going",
        "UP" => "up",
        "DOWN" => "down",
        "MAINT" => "maint",
        "DRAIN" | "NOLB" => "drain",
        "no" => "nocheck",
        _ => "warn",
    }
}

/// Why haproxy's status contradicts the registry's state, if it does.
fn disagreement(state: MemberState, status: &str) -> Option<String> {
    let class = status_class(status);
    let fine = match state {
        MemberState::Active => matches!(class, "up" | "going" | "nocheck"),
        // A drained member whose checks fail is down in haproxy: no contradiction.
        MemberState::Drain => matches!(class, "drain" | "down"),
        MemberState::Maint => class == "maint",
    };
    (!fine).then(|| format!("registry: {state}; haproxy: {status}"))
}

/// One line on a node's haproxy for the nodes table.
pub fn summary(view: &View, now_ms: u64) -> String {
    match view {
        View::NoAnswer => "<span class=\"muted\">no answer</span>".into(),
        View::Witness => "<span class=\"muted\">none (witness)</span>".into(),
        View::NoSocket => {
            "<span class=\"muted\">no view (no <code>--haproxy-socket</code>)</span>".into()
        }
        View::Failed { at_ms, error } => format!(
            "{} <span class=\"err\">{}</span> <span class=\"muted\">{}</span>",
            badge("bad", "not answering"),
            esc(error),
            esc(&ago(now_ms, Some(*at_ms).filter(|&a| a > 0))),
        ),
        View::Seen(s) => {
            let mut counts = std::collections::BTreeMap::<&str, usize>::new();
            for sv in s.backends.values().flat_map(|b| b.servers.values()) {
                *counts.entry(status_class(&sv.status)).or_default() += 1;
            }
            let total: usize = counts.values().sum();
            let mut out = format!("{total} servers");
            for (class, n) in &counts {
                let _ = write!(out, " {}", badge(class, &format!("{n} {}", word(class))));
            }
            if s.truncated {
                let _ = write!(
                    out,
                    " <span class=\"muted\">(first {MAX_SERVERS} only)</span>"
                );
            }
            let _ = write!(
                out,
                " <span class=\"muted\">{}</span>",
                esc(&ago(now_ms, Some(s.at_ms)))
            );
            out
        }
    }
}

fn word(class: &str) -> &'static str {
    match class {
        "up" => "UP",
        "going" => "failing checks",
        "down" => "DOWN",
        "maint" => "MAINT",
        "drain" => "DRAIN",
        "nocheck" => "no check",
        _ => "other",
    }
}

/// The column header for node `id`.
pub fn header(id: u64, view: &View, now_ms: u64) -> String {
    let note = match view {
        View::Seen(s) => ago(now_ms, Some(s.at_ms)),
        View::Failed { .. } => "not answering".into(),
        View::NoAnswer => "no answer".into(),
        View::NoSocket => "no view".into(),
        View::Witness => String::new(),
    };
    format!(
        "<th>haproxy on node {id}<br><span class=\"muted\">{}</span></th>",
        esc(&note)
    )
}

/// One cell: `member` of `service` as node `id`'s haproxy sees it, against
/// the registry's `state` (`None`: haproxy has a server the registry lacks).
pub fn cell(
    service: &str,
    member: &str,
    state: Option<MemberState>,
    id: u64,
    view: &View,
) -> String {
    let cell_id = format!("hap-{service}-{member}-{id}");
    let muted = |text: &str| {
        format!(
            "<td id=\"{}\" data-status=\"none\" class=\"muted\">{}</td>",
            esc(&cell_id),
            esc(text)
        )
    };
    let snapshot = match view {
        View::Seen(s) => s,
        View::Witness => return muted("witness"),
        View::NoAnswer => return muted("no answer"),
        View::NoSocket => return muted("no view"),
        View::Failed { .. } => return muted("haproxy not answering"),
    };
    let Some(backend) = view.backend(service) else {
        return absent(
            &cell_id,
            state,
            &format!("haproxy has no backend {}", backend_name(service)),
        );
    };
    let Some(server) = backend.servers.get(member) else {
        if snapshot.truncated {
            return muted(&format!("not shown (over {MAX_SERVERS} servers)"));
        }
        return absent(&cell_id, state, "haproxy has no such server");
    };
    let disagree = match state {
        Some(st) => disagreement(st, &server.status),
        // Servers the registry removed stay in maint until the next reload.
        None => (status_class(&server.status) != "maint")
            .then(|| format!("not in the registry; haproxy: {}", server.status)),
    };
    server_cell(&cell_id, server, disagree)
}

fn server_cell(cell_id: &str, s: &Server, disagree: Option<String>) -> String {
    let class = status_class(&s.status);
    let errors = s.econ + s.eresp;
    let mut title = format!(
        "{} sessions now, {} in all; connection errors {}, response errors {}; failed checks {}",
        s.scur, s.stot, s.econ, s.eresp, s.chkfail
    );
    if let Some(c) = &s.check {
        let _ = write!(title, "; last check {c}");
        if let Some(d) = &s.check_detail {
            let _ = write!(title, ": {d}");
        }
    }
    if let Some(t) = s.lastchg_s {
        let _ = write!(title, "; status for {t} s");
    }
    let (td_class, mark) = match &disagree {
        Some(why) => {
            let _ = write!(title, ". Disagrees with the registry ({why})");
            (
                " class=\"disagree\"",
                format!(
                    " <span class=\"err\" title=\"{}\">≠ registry</span>",
                    esc(why)
                ),
            )
        }
        None => ("", String::new()),
    };
    let err_class = if errors > 0 { "err" } else { "muted" };
    let check = s
        .check
        .as_deref()
        .map(|c| format!(" · <code>{}</code>", esc(c)))
        .unwrap_or_default();
    format!(
        "<td id=\"{}\" data-status=\"{}\"{td_class} title=\"{}\">{}{mark}<br>\
         <span class=\"muted\">{} sess</span> · <span class=\"{err_class}\">{errors} err</span>{check}</td>",
        esc(cell_id),
        esc(&s.status),
        esc(&title),
        badge(class, &s.status),
        s.scur,
    )
}

/// A member the registry has and haproxy does not: a disagreement, unless
/// the registry has nothing either.
fn absent(cell_id: &str, state: Option<MemberState>, why: &str) -> String {
    let class = if state.is_some() {
        " class=\"disagree\""
    } else {
        ""
    };
    format!(
        "<td id=\"{}\" data-status=\"absent\"{class}>{} <span class=\"muted\">{}</span></td>",
        esc(cell_id),
        badge("bad", "absent"),
        esc(why)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_as_haproxy_means_them() {
        for (status, class) in [
            ("UP", "up"),
            ("UP 2/3", "going"),
            ("DOWN", "down"),
            ("DOWN 1/2", "down"),
            ("MAINT", "maint"),
            ("MAINT (resolution)", "maint"),
            ("DRAIN", "drain"),
            ("NOLB", "drain"),
            ("no check", "nocheck"),
            ("", "warn"),
        ] {
            assert_eq!(status_class(status), class, "{status}");
        }
    }

    #[test]
    fn disagreements_are_where_haproxy_contradicts_the_registry() {
        use MemberState::*;
        for (state, status, disagrees) in [
            (Active, "UP", false),
            (Active, "no check", false),
            (Active, "DOWN", true),
            (Active, "MAINT", true),
            (Drain, "DRAIN", false),
            (Drain, "DOWN", false),
            (Drain, "UP", true),
            (Maint, "MAINT", false),
            (Maint, "UP", true),
        ] {
            assert_eq!(
                disagreement(state, status).is_some(),
                disagrees,
                "{state} vs {status}"
            );
        }
    }

    fn seen(servers: &[(&str, &str)]) -> View {
        let mut b = Backend::default();
        for (name, status) in servers {
            b.servers.insert(
                name.to_string(),
                Server {
                    status: status.to_string(),
                    econ: 2,
                    eresp: 1,
                    ..Default::default()
                },
            );
        }
        View::Seen(Snapshot {
            at_ms: 1,
            backends: [("be_web".to_string(), b)].into(),
            ..Default::default()
        })
    }

    #[test]
    fn cells_say_status_errors_and_disagreement() {
        let v = seen(&[("a", "UP"), ("b", "DOWN"), ("old", "MAINT"), ("x<y", "UP")]);
        let a = cell("web", "a", Some(MemberState::Active), 1, &v);
        assert!(a.contains("id=\"hap-web-a-1\" data-status=\"UP\""), "{a}");
        assert!(a.contains("3 err") && !a.contains("disagree"), "{a}");
        let b = cell("web", "b", Some(MemberState::Active), 1, &v);
        assert!(
            b.contains("class=\"disagree\"") && b.contains("registry: active; haproxy: DOWN"),
            "{b}"
        );
        // Removed from the registry, kept in maint until a reload: expected.
        assert!(!cell("web", "old", None, 1, &v).contains("disagree"));
        let gone = cell("web", "c", Some(MemberState::Active), 1, &v);
        assert!(
            gone.contains("data-status=\"absent\"") && gone.contains("disagree"),
            "{gone}"
        );
        let no_backend = cell("api", "a", Some(MemberState::Active), 1, &v);
        assert!(no_backend.contains("no backend be_api"), "{no_backend}");
        assert!(cell("web", "a", Some(MemberState::Active), 3, &View::Witness).contains("witness"));
        let odd = cell("web", "x<y", None, 1, &v);
        assert!(!odd.contains("x<y") && odd.contains("x&lt;y"), "{odd}");
    }
}
