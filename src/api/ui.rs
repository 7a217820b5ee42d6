//! `GET /ui`: a server-rendered status page (no JavaScript; it refreshes
//! itself every 5 s). It shows what `GET /v1/cluster` collects from every node
//! plus this node's applied registry: each balancer's haproxy view of each
//! member beside the registry's state, and a timeline of VIP holders, leader
//! changes and renders.
//!
//! Auth: `Authorization: Bearer TOKEN` (scripts), or the `clb_ui` cookie that
//! the page's own sign-in form sets (`POST /ui` with `token=...`; browsers).
//! The cookie is `HttpOnly; SameSite=Strict; Path=/ui` (plus `Secure` when the
//! form was posted over HTTPS) and lasts for the browser session. Either way
//! the token needs `read` scope, is checked by [`Principal`] (so failed
//! attempts count towards the per-address limit) and never appears in a page.

mod haproxy_view;
mod timeline;

use std::fmt::Write as _;

use axum::extract::rejection::FormRejection;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Form;
use serde::Deserialize;

use super::{ApiError, AppState, Principal};
use crate::auth::Need;
use crate::model::{MemberState, Registry};
use crate::views::{ClusterView, NodeStatus};

const COOKIE: &str = "clb_ui";

/// `GET /ui`: the status page, or the sign-in form without valid credentials.
pub async fn page(State(state): State<AppState>, mut parts: Parts) -> Response {
    let from_cookie = !parts.headers.contains_key(header::AUTHORIZATION);
    if from_cookie {
        let Some(token) = cookie_token(&parts) else {
            return sign_in(StatusCode::UNAUTHORIZED, None, false);
        };
        match HeaderValue::from_str(&format!("Bearer {token}")) {
            Ok(v) => parts.headers.insert(header::AUTHORIZATION, v),
            Err(_) => return sign_in(StatusCode::UNAUTHORIZED, Some("token not accepted"), true),
        };
    }
    let principal = Principal::from_request_parts(&mut parts, &state)
        .await
        .and_then(|p| p.require(Need::Read));
    if let Err(e) = principal {
        return refused(&e, from_cookie);
    }
    let view = super::collect_cluster(&state).await;
    let registry = state.consensus.applied().registry.clone();
    html(
        StatusCode::OK,
        &status_page(&view, &registry, super::now_ms()),
        None,
    )
}

#[derive(Debug, Deserialize)]
pub struct SignInForm {
    token: Option<String>,
    sign_out: Option<String>,
}

/// `POST /ui`: checks the token from the form and keeps it in a cookie, or
/// signs out.
pub async fn sign_in_post(
    State(state): State<AppState>,
    mut parts: Parts,
    form: Result<Form<SignInForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return sign_in(
            StatusCode::BAD_REQUEST,
            Some("expected a form with a token"),
            false,
        );
    };
    if form.sign_out.is_some() {
        return see_ui(format!(
            "{COOKIE}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"
        ));
    }
    let token = form.token.unwrap_or_default();
    let token = token.trim();
    let Ok(bearer) = HeaderValue::from_str(&format!("Bearer {token}")) else {
        return sign_in(StatusCode::UNAUTHORIZED, Some("token not accepted"), false);
    };
    parts.headers.insert(header::AUTHORIZATION, bearer);
    let checked = Principal::from_request_parts(&mut parts, &state)
        .await
        .and_then(|p| p.require(Need::Read));
    if let Err(e) = checked {
        return refused(&e, false);
    }
    // Browsers send Origin with a form POST; it says whether this is HTTPS.
    let https = parts
        .headers
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .is_some_and(|o| o.starts_with("https://"));
    let secure = if https { "; Secure" } else { "" };
    see_ui(format!(
        "{COOKIE}={}; Path=/ui; HttpOnly; SameSite=Strict{secure}",
        pct_encode(token)
    ))
}

/// 303 to `/ui` with a cookie change.
fn see_ui(cookie: String) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    let h = resp.headers_mut();
    h.insert(header::LOCATION, HeaderValue::from_static("/ui"));
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        h.insert(header::SET_COOKIE, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The sign-in form for a refused token; a refused cookie is cleared.
fn refused(e: &ApiError, clear_cookie: bool) -> Response {
    let status = match e {
        ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
        ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::UNAUTHORIZED,
    };
    sign_in(status, Some(&e.to_string()), clear_cookie)
}

fn sign_in(status: StatusCode, message: Option<&str>, clear_cookie: bool) -> Response {
    let mut body = String::new();
    body.push_str(&head("clb — sign in", false));
    body.push_str("<main class=\"signin\"><h1>clb status</h1>");
    if let Some(m) = message {
        let _ = write!(body, "<p class=\"bad\" id=\"error\">{}</p>", esc(m));
    }
    body.push_str(
        "<form method=\"post\" action=\"/ui\">\
         <label for=\"token\">API token (read scope or more)</label>\
         <input type=\"password\" id=\"token\" name=\"token\" autocomplete=\"current-password\" required autofocus>\
         <button type=\"submit\">Sign in</button></form>\
         <p class=\"muted\">The token is kept in an HttpOnly cookie for this browser session. \
         Scripts can send <code>Authorization: Bearer TOKEN</code> instead.</p></main></body></html>\n",
    );
    let clear =
        clear_cookie.then(|| format!("{COOKIE}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"));
    html(status, &body, clear)
}

fn html(status: StatusCode, body: &str, set_cookie: Option<String>) -> Response {
    let mut resp = (status, body.to_string()).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Some(v) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert(header::SET_COOKIE, v);
    }
    resp
}

/// The `clb_ui` cookie's token, if the request carries one.
fn cookie_token(parts: &Parts) -> Option<String> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .find(|v| !v.is_empty())
        .and_then(pct_decode)
}

/// Cookie values cannot carry `;`, `,`, spaces or quotes: percent-encode
/// everything but unreserved characters.
fn pct_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn pct_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A value that may be missing, escaped; `—` for none.
fn text(v: Option<impl std::fmt::Display>) -> String {
    v.map_or("—".into(), |v| esc(&v.to_string()))
}

fn ago(now_ms: u64, at_ms: Option<u64>) -> String {
    let Some(at) = at_ms else {
        return "never".into();
    };
    let s = now_ms.saturating_sub(at) / 1_000;
    match s {
        0..=119 => format!("{s} s ago"),
        120..=7_199 => format!("{} min ago", s / 60),
        _ => format!("{} h ago", s / 3_600),
    }
}

fn head(title: &str, refresh: bool) -> String {
    let refresh = if refresh {
        "<meta http-equiv=\"refresh\" content=\"5\">"
    } else {
        ""
    };
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">{refresh}\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head><body>\n",
        esc(title)
    )
}

const STYLE: &str = "\
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;background:#f6f8fa;color:#1f2328}\
header{background:#24292f;color:#fff;padding:12px 24px;display:flex;gap:24px;align-items:baseline;flex-wrap:wrap}\
header h1{font-size:20px;margin:0}header span{color:#d0d7de}header b{color:#fff}\
main{padding:16px 24px}section{background:#fff;border:1px solid #d0d7de;border-radius:6px;margin:0 0 16px;padding:12px 16px}\
h2{font-size:16px;margin:0 0 8px}h3{font-size:14px;margin:12px 0 6px}\
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:4px 10px;border-bottom:1px solid #eaeef2;vertical-align:top}\
th{background:#f6f8fa;font-weight:600}code{font-family:ui-monospace,monospace;font-size:13px}\
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;color:#fff}\
.active,.ok,.leader{background:#1a7f37}.drain,.warn,.candidate{background:#bf8700}.maint{background:#6e7781}\
.bad,.unreachable{background:#cf222e;color:#fff}.follower,.learner{background:#0969da}.witness,.none{background:#8250df}\
p.bad{padding:6px 10px;border-radius:6px}.err{color:#cf222e}.muted{color:#656d76}\
.vip{font-size:16px}.signin{max-width:420px;margin:60px auto;background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:24px}\
.signin input{display:block;width:100%;box-sizing:border-box;margin:6px 0 12px;padding:6px}\
footer{padding:0 24px 16px;color:#656d76;display:flex;gap:16px;align-items:center}\
footer button{font-size:12px}\
.up{background:#1a7f37}.down{background:#cf222e}.going{background:#bf8700}.nocheck{background:#6e7781}\
td.disagree{background:#ffebe9;box-shadow:inset 3px 0 0 #cf222e}\
.tl-row,.tl-axis{display:flex;align-items:center;gap:8px;margin:2px 0}.tl-label{flex:0 0 64px;font-weight:600}\
.tl-track{position:relative;flex:1;height:26px;background:#f6f8fa;border:1px solid #d0d7de;border-radius:4px}\
.tl-ticks{position:relative;flex:1;height:18px;font-size:12px;color:#656d76}.tl-ticks span{position:absolute;transform:translateX(-50%)}\
.tl-ticks span:first-child{transform:none}.tl-ticks span:last-child{transform:translateX(-100%)}\
.tl-vip{position:absolute;top:3px;height:11px;background:#1a7f37;border-radius:2px}\
.tl-lead{position:absolute;top:17px;height:5px;background:#0969da;border-radius:2px}\
.tl-mark{position:absolute;top:0;bottom:0;width:3px;margin-left:-1px}.tl-reload{background:#8250df}\
.tl-runtime{background:#8c959f;top:18px}.tl-fail{background:#cf222e}.tl-elect{background:#0969da;width:2px;opacity:.7}\
.tl-none{position:absolute;left:8px;top:4px}.tl-key{display:inline-block;position:static;width:14px;height:10px;margin:0 4px 0 12px;vertical-align:middle}\
table.events{margin-top:10px}tr.err td{color:#cf222e}";

fn badge(class: &str, label: &str) -> String {
    format!("<span class=\"badge {}\">{}</span>", esc(class), esc(label))
}

/// A node's health as (label, css class, detail) from its own status.
fn health(status: Option<&NodeStatus>) -> (&'static str, &'static str, String) {
    let st = match status {
        Some(NodeStatus::Up(st)) => st,
        Some(NodeStatus::Unreachable { error }) => {
            return ("unreachable", "unreachable", esc(error))
        }
        None => return ("unreachable", "unreachable", "no status".into()),
    };
    if !st.healthy {
        return ("unhealthy", "bad", esc(&st.health_reason));
    }
    if let Some(e) = st.render.as_ref().and_then(|r| r.last_error.as_deref()) {
        return ("haproxy error", "warn", esc(e));
    }
    ("ok", "ok", esc(&st.health_reason))
}

/// `--vip-mode bgp`: which balancers announce the VIP, and why not; only
/// when some node runs bgp mode.
fn bgp_section(out: &mut String, view: &ClusterView) {
    let rows: Vec<_> = view
        .node_status
        .iter()
        .filter_map(|(id, st)| Some((*id, st.up()?.bgp.as_ref()?)))
        .collect();
    if rows.is_empty() {
        return;
    }
    out.push_str(
        "<section id=\"bgp\"><h2>BGP announcements</h2><table><thead><tr><th>node</th>\
         <th>VIP route</th><th>why</th><th>BGP session</th><th>BFD</th><th>connections</th></tr></thead><tbody>\n",
    );
    for (id, b) in rows {
        let (class, label) = match (b.announced, b.drained) {
            (true, _) => ("ok", "announced"),
            (false, true) => ("drain", "drained"),
            (false, false) => ("bad", "withdrawn"),
        };
        let session_class = if b.session_up { "up" } else { "down" };
        let bfd_class = match b.bfd.as_str() {
            "Up" => "up",
            "" => "nocheck",
            _ => "down",
        };
        let _ = writeln!(
            out,
            "<tr id=\"bgp-{id}\"><td><b>node {id}</b></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} <span class=\"muted\">({} in all)</span></td></tr>",
            badge(class, label),
            esc(&b.reason),
            badge(session_class, if b.session.is_empty() { "unknown" } else { &b.session }),
            badge(bfd_class, if b.bfd.is_empty() { "off" } else { &b.bfd }),
            b.connections,
            b.connections_total,
        );
    }
    out.push_str("</tbody></table></section>\n");
}

/// A one-word setting by the name the API gives it (`http`, `roundrobin`).
fn word(v: &impl serde::Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

fn state_class(state: MemberState) -> &'static str {
    match state {
        MemberState::Active => "active",
        MemberState::Drain => "drain",
        MemberState::Maint => "maint",
    }
}

/// The whole page: `view` is what `/v1/cluster` answers, `registry` the
/// applied registry of this node.
fn status_page(view: &ClusterView, registry: &Registry, now_ms: u64) -> String {
    let mut out = head("clb status", true);
    let me = view.node_id;
    let holder = view.vip_holder;
    let vip = view.vip.vip.as_deref();
    let _ = write!(
        out,
        "<header><h1>clb</h1><span>cluster <b>{}</b></span><span>leader <b id=\"leader\">{}</b></span>\
         <span>term <b>{}</b></span><span>applied index <b>{}</b></span><span>served by node <b>{me}</b></span></header>\n<main>\n",
        esc(&view.cluster_id),
        view.leader.map_or("none".into(), |l| format!("node {l}")),
        view.term,
        view.applied_index,
    );

    // Who holds the VIP.
    out.push_str("<section id=\"vip\"><h2>Virtual IP</h2><p class=\"vip\">");
    match (vip, holder) {
        (None, _) => out.push_str("No VIP configured (<code>--vip</code>)."),
        (Some(v), Some(h)) => {
            let _ = write!(
                out,
                "<code>{}</code> is held by <b id=\"vip-holder\">node {h}</b> {}",
                esc(v),
                badge("ok", "held")
            );
        }
        (Some(v), None) => {
            let _ = write!(
                out,
                "<code>{}</code> is <b id=\"vip-holder\">held by no node</b> {}",
                esc(v),
                badge("bad", "no holder")
            );
        }
    }
    out.push_str("</p>");
    if let Some(err) = &view.vip.last_error {
        let _ = write!(
            out,
            "<p class=\"muted\">last hook failure on node {me}: {} (term {}) <span class=\"err\">{}</span></p>",
            err.action.as_str(),
            err.term,
            text(err.error.as_deref()),
        );
    }
    out.push_str("</section>\n");

    // Nodes: Raft, health, render and haproxy state.
    out.push_str(
        "<section id=\"nodes\"><h2>Nodes</h2><table><thead><tr><th>node</th><th>address</th>\
         <th>raft</th><th>role</th><th>health</th><th>applied index</th><th>haproxy config</th>\
         <th>last apply</th><th>last error</th><th>haproxy's view</th></tr></thead><tbody>\n",
    );
    let node_ids: Vec<u64> = view.nodes.keys().copied().collect();
    for (&id, addr) in &view.nodes {
        let status = view.node_status.get(&id);
        let st = view.node(id);
        let raft = st.map_or("unknown", |s| s.state.as_str());
        let membership = if view.voters.contains(&id) {
            "voter"
        } else {
            "learner"
        };
        let (h_label, h_class, h_detail) = health(status);
        let role = st.and_then(|s| s.role).map_or("—", |r| r.as_str());
        let vip_mark = if holder == Some(id) {
            format!(" {}", badge("ok", "VIP"))
        } else {
            String::new()
        };
        let here = if id == me {
            " <span class=\"muted\">(this node)</span>"
        } else {
            ""
        };
        let _ = write!(
            out,
            "<tr id=\"node-{id}\"><td><b>node {id}</b>{vip_mark}{here}</td><td><code>{}</code></td>\
             <td>{} <span class=\"muted\">{membership}</span></td><td>{}</td><td>{} <span class=\"muted\">{h_detail}</span></td>\
             <td>{}</td>",
            esc(addr),
            badge(raft, raft),
            esc(role),
            badge(h_class, h_label),
            text(st.map(|s| s.applied_index)),
        );
        match st.map(|s| &s.render) {
            None => out.push_str("<td colspan=\"3\" class=\"muted\">no answer</td>"),
            Some(None) => {
                out.push_str("<td colspan=\"3\" class=\"muted\">renders nothing (witness)</td>")
            }
            Some(Some(render)) => {
                let validated = if !render.validating {
                    " <span class=\"muted\">(unvalidated: no haproxy)</span>"
                } else {
                    ""
                };
                let _ = write!(
                    out,
                    "<td>rendered {} · running {}{validated}</td><td>{} <span class=\"muted\">{}</span></td><td class=\"err\">{}</td>",
                    render.rendered_index,
                    render.applied_index,
                    text(render.last_apply.map(|a| a.as_str())),
                    esc(&ago(now_ms, render.last_apply_at_ms)),
                    render.last_error.as_deref().map(esc).unwrap_or_default(),
                );
            }
        }
        let _ = writeln!(
            out,
            "<td id=\"haproxy-{id}\">{}</td></tr>",
            haproxy_view::summary(&haproxy_view::View::of(st), now_ms)
        );
    }
    out.push_str("</tbody></table></section>\n");
    bgp_section(&mut out, view);

    let events: Vec<timeline::NodeEvents> = node_ids
        .iter()
        .map(|&id| timeline::node_events(id, view.node(id)))
        .collect();
    out.push_str(&timeline::section(&events, now_ms));

    // haproxy's view per balancer, for the services' tables.
    let views: Vec<(u64, haproxy_view::View)> = node_ids
        .iter()
        .map(|&id| (id, haproxy_view::View::of(view.node(id))))
        .filter(|(_, v)| v.has_column())
        .collect();

    // Services and members.
    let _ = writeln!(
        out,
        "<section id=\"services\"><h2>Services <span class=\"muted\">({} members)</span></h2>",
        registry.member_count()
    );
    if registry.services.is_empty() {
        out.push_str("<p class=\"muted\">No services registered yet.</p>");
    } else if views.is_empty() {
        out.push_str("<p class=\"muted\">No balancer reports haproxy's view.</p>");
    } else {
        out.push_str(
            "<p class=\"muted\">Beside each member's registry state: its status in each balancer's haproxy \
             (from <code>show stat</code>), current sessions and errors; \
             <span class=\"err\">≠ registry</span> marks where haproxy contradicts the registry.</p>",
        );
    }
    for (name, svc) in &registry.services {
        let d = &svc.def;
        let _ = write!(
            out,
            "<h3 id=\"service-{0}\">{0} <span class=\"muted\">frontend :{1} · {2} · {3} · members :{4}</span></h3>",
            esc(name),
            d.port,
            esc(&word(&d.mode)),
            esc(&word(&d.balance)),
            d.member_port,
        );
        // Servers haproxy has that the registry does not (removed members
        // kept in maint until the next reload, or a stale config).
        let extra: std::collections::BTreeSet<&String> = views
            .iter()
            .flat_map(|(_, v)| v.servers(name))
            .filter(|s| !svc.members.contains_key(*s))
            .collect();
        if svc.members.is_empty() && extra.is_empty() {
            out.push_str("<p class=\"muted\">no members</p>");
            continue;
        }
        out.push_str(
            "<table><thead><tr><th>member</th><th>address</th><th>weight</th><th>state</th>\
             <th>ttl</th><th>registered</th>",
        );
        for (id, v) in &views {
            out.push_str(&haproxy_view::header(*id, v, now_ms));
        }
        out.push_str("</tr></thead><tbody>");
        for (m_name, m) in &svc.members {
            let st = state_class(m.state);
            let _ = write!(
                out,
                "<tr id=\"member-{0}-{1}\" data-state=\"{2}\"><td><b>{1}</b></td><td><code>{3}:{4}</code></td>\
                 <td>{5}</td><td>{6}</td><td>{7}</td><td>{8}</td>",
                esc(name),
                esc(m_name),
                st,
                esc(&m.address),
                m.port,
                m.weight,
                badge(st, st),
                m.ttl_s.map_or("—".into(), |t| format!("{t} s")),
                esc(&ago(now_ms, Some(m.registered_at_ms))),
            );
            for (id, v) in &views {
                out.push_str(&haproxy_view::cell(name, m_name, Some(m.state), *id, v));
            }
            out.push_str("</tr>");
        }
        for s_name in extra {
            let _ = write!(
                out,
                "<tr id=\"extra-{0}-{1}\" data-state=\"none\"><td><b>{1}</b></td>\
                 <td colspan=\"5\" class=\"muted\">in haproxy, not in the registry</td>",
                esc(name),
                esc(s_name),
            );
            for (id, v) in &views {
                out.push_str(&haproxy_view::cell(name, s_name, None, *id, v));
            }
            out.push_str("</tr>");
        }
        out.push_str("</tbody></table>\n");
    }
    out.push_str("</section>\n</main>\n");
    out.push_str(
        "<footer><span>refreshes every 5 s · JSON: <code>GET /v1/cluster</code>, <code>GET /v1/services</code></span>\
         <form method=\"post\" action=\"/ui\"><button name=\"sign_out\" value=\"1\">sign out</button></form></footer>\
         </body></html>\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(text(Some("<b>")), "&lt;b&gt;");
        assert_eq!(text(None::<u64>), "—");
    }

    #[test]
    fn cookie_values_round_trip() {
        for t in ["plain-token_1.2~", "with space;and,comma\"q\"", "ünï"] {
            let enc = pct_encode(t);
            assert!(enc
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)));
            assert_eq!(pct_decode(&enc).as_deref(), Some(t));
        }
        assert_eq!(pct_decode("%4"), None);
    }

    #[test]
    fn page_escapes_values_and_never_shows_a_token() {
        let view = serde_json::json!({
            "node_id": 1, "cluster_id": "<script>", "leader": 1, "term": 2,
            "applied_index": 7, "voters": [1, 2], "vip_holder": 1,
            "vip": {"vip": "10.0.0.9"},
            "nodes": {"1": "127.0.0.1:1", "2": "<i>:2"},
            "node_status": {
                "1": {"node_id": 1, "state": "leader", "role": "balancer", "applied_index": 7,
                      "render": {"rendered_index": 7, "applied_index": 7, "last_apply": "runtime",
                                 "last_error": "bad <cfg>", "validating": true}},
                "2": {"error": "unreachable: <refused>"}
            }
        });
        let view: ClusterView = serde_json::from_value(view).unwrap();
        let page = status_page(&view, &Registry::default(), 0);
        assert!(!page.contains("<script>"));
        assert!(!page.contains("<i>"));
        assert!(!page.contains("<cfg>"));
        assert!(page.contains("&lt;script&gt;"));
        assert!(page.contains("node 1</b>"));
        assert!(page.contains("id=\"vip-holder\">node 1"));
        assert!(page.contains("unreachable"));
    }

    /// Two balancers' haproxy, a witness and a timeline on one page.
    #[test]
    fn page_puts_haproxy_beside_the_registry() {
        use crate::model::{Command, MemberSpec, ServiceDef};
        let mut registry = Registry::default();
        for m in ["web1", "web2"] {
            registry.apply(&Command::Register {
                service: "http".into(),
                member: m.into(),
                spec: MemberSpec {
                    address: "10.0.0.1".into(),
                    port: Some(80),
                    weight: None,
                    ttl_s: None,
                },
                create: ServiceDef::well_known("http"),
                at_ms: 1,
            });
        }
        let stat = |web2: &str| {
            serde_json::json!({"at_ms": 9_000, "backends": {"be_http": {"status": "UP", "scur": 1,
                "servers": {"web1": {"status": "UP", "scur": 4, "econ": 1},
                            "web2": {"status": web2, "check": "L4CON", "check_detail": "Connection refused"},
                            "<gone>": {"status": "MAINT"}}}}})
        };
        let view = serde_json::json!({
            "node_id": 1, "leader": 1, "voters": [1, 2, 3], "vip_holder": 1,
            "nodes": {"1": "a:1", "2": "a:2", "3": "a:3"},
            "node_status": {
                "1": {"node_id": 1, "role": "balancer", "vip_held": true, "haproxy": stat("DOWN"), "timeline": [
                    {"at_ms": 2_000, "kind": "leader", "term": 2, "leader": 1},
                    {"at_ms": 3_000, "kind": "vip_claim", "term": 2},
                    {"at_ms": 4_000, "kind": "render", "how": "reload", "index": 5}]},
                "2": {"node_id": 2, "role": "balancer", "haproxy": stat("UP"),
                      "timeline": [{"at_ms": 2_500, "kind": "leader", "term": 2, "leader": 1}]},
                "3": {"node_id": 3, "role": "witness", "haproxy": null, "timeline": []}
            }
        });
        let view: ClusterView = serde_json::from_value(view).unwrap();
        let page = status_page(&view, &registry, 10_000);
        // Node 1's haproxy finds web2 down although the registry has it
        // active; node 2's finds it up.
        let cell = |m: &str, n: u64| {
            let at = page.find(&format!("id=\"hap-http-{m}-{n}\"")).expect(m);
            &page[at..at + page[at..].find("</td>").unwrap()]
        };
        assert!(
            cell("web2", 1).contains("data-status=\"DOWN\" class=\"disagree\""),
            "{page}"
        );
        assert!(cell("web2", 2).starts_with("id=\"hap-http-web2-2\" data-status=\"UP\" title"));
        assert!(cell("web1", 1).contains("4 sess") && cell("web1", 1).contains("1 err"));
        assert!(
            !page.contains("hap-http-web1-3"),
            "a witness gets no column"
        );
        assert!(page.contains("none (witness)"));
        // A server the registry lacks gets a row, escaped.
        assert!(page.contains("id=\"extra-http-&lt;gone&gt;\""));
        assert!(!page.contains("<gone>"));
        // One leader change though two nodes saw it; the claim and the reload.
        assert_eq!(page.matches("data-kind=\"leader\"").count(), 1);
        assert!(page.contains("seen by node 1, 2"));
        assert!(page.contains("data-kind=\"vip_claim\" data-node=\"1\""));
        assert!(page.contains("haproxy reloaded (index 5)"));
        assert!(page.contains("class=\"tl-vip\""));
    }
}
