//! haproxy's own view of its backends: `show stat` on the admin socket,
//! asked every [`POLL`] and right after a render goes live, so `/ui` can put
//! what haproxy's checks say (UP, DOWN, MAINT…), its sessions and its error
//! counters beside the registry. The latest [`Snapshot`] crosses to other
//! nodes inside `node_view`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::watch;

use super::RenderStatus;

/// How often haproxy is asked when nothing goes live meanwhile.
pub const POLL: Duration = Duration::from_secs(2);
/// After a render goes live, ask after this pause (the runtime API's
/// changes are in place by then) and never more often than this.
const AFTER_APPLY: Duration = Duration::from_millis(200);
/// One answer must not hold the poller up.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Servers kept per snapshot. The snapshot travels in every `node_view`
/// (`/v1/cluster` carries one per node), so a registry of 100k members must
/// not make it megabytes; past this the rest of the answer is not read.
pub const MAX_SERVERS: usize = 500;
/// Backends + servers only: `show stat <proxy> <type> <sid>`, type 2|4.
const COMMAND: &str = "show stat -1 6 -1";

/// One server as haproxy sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Server {
    /// `UP`, `DOWN`, `MAINT`, `DRAIN`, `NOLB`, `no check`, or a transition
    /// such as `UP 2/3` (failing checks, not yet down).
    pub status: String,
    /// Current sessions.
    pub scur: u64,
    /// Sessions since haproxy started (or the server was added).
    pub stot: u64,
    /// Connection errors.
    pub econ: u64,
    /// Response errors.
    pub eresp: u64,
    /// Failed checks.
    pub chkfail: u64,
    /// The last check's result code (`L4OK`, `L4CON`, `L7STS`…), with the
    /// HTTP code when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    /// What the last check found (`Connection refused`), else haproxy's
    /// description of the result.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check_detail: Option<String>,
    /// Seconds since the status last changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lastchg_s: Option<u64>,
}

/// One backend: its own line (`BACKEND`) and its servers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Backend {
    /// `UP` while any server can take traffic, else `DOWN`.
    pub status: String,
    pub scur: u64,
    pub servers: BTreeMap<String, Server>,
}

/// haproxy's answer at one moment, or why there is none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Snapshot {
    /// When it was asked (Unix milliseconds).
    pub at_ms: u64,
    /// haproxy did not answer, or not with statistics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub backends: BTreeMap<String, Backend>,
    /// More than [`MAX_SERVERS`] servers: the rest are left out.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// Column positions from the `# pxname,svname,...` header; haproxy adds
/// columns between versions, so nothing is assumed about the order.
struct Columns {
    pxname: usize,
    svname: usize,
    status: usize,
    scur: Option<usize>,
    stot: Option<usize>,
    econ: Option<usize>,
    eresp: Option<usize>,
    chkfail: Option<usize>,
    lastchg: Option<usize>,
    check_status: Option<usize>,
    check_code: Option<usize>,
    last_chk: Option<usize>,
    check_desc: Option<usize>,
}

impl Columns {
    fn from_header(line: &str) -> Result<Columns, String> {
        let Some(names) = line.strip_prefix('#') else {
            // Not statistics: an error such as "Permission denied" or
            // "Unknown command"; its first line says what went wrong.
            let said = line.trim();
            return Err(if said.is_empty() {
                "haproxy answered `show stat` with nothing".into()
            } else {
                format!("haproxy answered `show stat` with: {said}")
            });
        };
        let names: Vec<&str> = names.trim().split(',').collect();
        let find = |n: &str| names.iter().position(|c| *c == n);
        let need = |n: &str| find(n).ok_or_else(|| format!("`show stat` has no {n} column"));
        Ok(Columns {
            pxname: need("pxname")?,
            svname: need("svname")?,
            status: need("status")?,
            scur: find("scur"),
            stot: find("stot"),
            econ: find("econ"),
            eresp: find("eresp"),
            chkfail: find("chkfail"),
            lastchg: find("lastchg"),
            check_status: find("check_status"),
            check_code: find("check_code"),
            last_chk: find("last_chk"),
            check_desc: find("check_desc"),
        })
    }
}

/// Reads `show stat` CSV a line at a time, up to [`MAX_SERVERS`] servers.
pub struct Parser {
    columns: Option<Columns>,
    backends: BTreeMap<String, Backend>,
    servers: usize,
    max_servers: usize,
    truncated: bool,
}

impl Parser {
    pub fn new(max_servers: usize) -> Parser {
        Parser {
            columns: None,
            backends: BTreeMap::new(),
            servers: 0,
            max_servers,
            truncated: false,
        }
    }

    /// Takes one line; `Ok(false)` once the server limit is reached (the
    /// rest need not be read).
    pub fn line(&mut self, line: &str) -> Result<bool, String> {
        let line = line.trim_end_matches(['\r', '\n']);
        let Some(cols) = &self.columns else {
            self.columns = Some(Columns::from_header(line)?);
            return Ok(true);
        };
        if line.is_empty() {
            return Ok(true);
        }
        let fields = split_csv(line);
        let get = |i: usize| fields.get(i).map(String::as_str).unwrap_or("");
        let opt = |i: Option<usize>| i.map(get).filter(|s| !s.is_empty());
        let num = |i: Option<usize>| opt(i).and_then(|s| s.parse::<u64>().ok());
        let (px, sv) = (get(cols.pxname), get(cols.svname));
        if px.is_empty() || sv == "FRONTEND" {
            return Ok(true);
        }
        if sv == "BACKEND" {
            let b = self.backends.entry(px.to_string()).or_default();
            b.status = get(cols.status).to_string();
            b.scur = num(cols.scur).unwrap_or(0);
            return Ok(true);
        }
        if self.servers >= self.max_servers {
            self.truncated = true;
            return Ok(false);
        }
        let check = opt(cols.check_status).map(|s| match opt(cols.check_code) {
            Some(code) => format!("{s} {code}"),
            None => s.to_string(),
        });
        let server = Server {
            status: get(cols.status).to_string(),
            scur: num(cols.scur).unwrap_or(0),
            stot: num(cols.stot).unwrap_or(0),
            econ: num(cols.econ).unwrap_or(0),
            eresp: num(cols.eresp).unwrap_or(0),
            chkfail: num(cols.chkfail).unwrap_or(0),
            check,
            check_detail: opt(cols.last_chk)
                .or_else(|| opt(cols.check_desc))
                .map(str::to_string),
            lastchg_s: num(cols.lastchg),
        };
        self.backends
            .entry(px.to_string())
            .or_default()
            .servers
            .insert(sv.to_string(), server);
        self.servers += 1;
        Ok(true)
    }

    pub fn finish(self, at_ms: u64) -> Result<Snapshot, String> {
        if self.columns.is_none() {
            return Err("haproxy answered `show stat` with nothing".into());
        }
        Ok(Snapshot {
            at_ms,
            error: None,
            backends: self.backends,
            truncated: self.truncated,
        })
    }
}

/// A whole `show stat` answer.
pub fn parse(text: &str, max_servers: usize, at_ms: u64) -> Result<Snapshot, String> {
    let mut p = Parser::new(max_servers);
    for line in text.lines() {
        if !p.line(line)? {
            break;
        }
    }
    p.finish(at_ms)
}

/// Splits one CSV line. haproxy quotes a field (doubling its quotes) when
/// it holds a comma or a quote, as a check's text may.
fn split_csv(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', true) => quoted = false,
            ('"', false) if field.is_empty() => quoted = true,
            (',', false) => out.push(std::mem::take(&mut field)),
            (c, _) => field.push(c),
        }
    }
    out.push(field);
    out
}

/// Asks haproxy once; the answer or the reason for none.
pub async fn ask(socket: &Path, at_ms: u64) -> Snapshot {
    let work = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| format!("connect {}: {e}", socket.display()))?;
        let (read, mut write) = stream.into_split();
        write
            .write_all(format!("{COMMAND}\n").as_bytes())
            .await
            .map_err(|e| format!("talk to {}: {e}", socket.display()))?;
        let _ = write.shutdown().await;
        let mut lines = BufReader::new(read).lines();
        let mut parser = Parser::new(MAX_SERVERS);
        while let Some(line) = lines
            .next_line()
            .await
            .map_err(|e| format!("read from {}: {e}", socket.display()))?
        {
            // Past the limit the connection is dropped: haproxy stops there.
            if !parser.line(&line)? {
                break;
            }
        }
        parser.finish(at_ms)
    };
    let answer = tokio::time::timeout(TIMEOUT, work)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "{} did not answer within {TIMEOUT:?}",
                socket.display()
            ))
        });
    answer.unwrap_or_else(|error| Snapshot {
        at_ms,
        error: Some(error),
        ..Default::default()
    })
}

/// The latest snapshot; `None` until haproxy was first asked.
pub type Latest = watch::Receiver<Option<Arc<Snapshot>>>;

/// Asks haproxy on `socket` every [`POLL`] and soon after each render that
/// goes live, until `shutdown` turns true.
pub fn spawn(
    socket: PathBuf,
    mut render: watch::Receiver<RenderStatus>,
    mut shutdown: watch::Receiver<bool>,
) -> Latest {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut live_at = render.borrow_and_update().last_apply_at_ms;
        loop {
            let snapshot = ask(&socket, super::now_ms()).await;
            tx.send_replace(Some(Arc::new(snapshot)));
            let tick = tokio::time::sleep(POLL);
            let seen = live_at;
            let went_live = async {
                let r = render.wait_for(|s| s.last_apply_at_ms != seen).await;
                r.map(|s| s.last_apply_at_ms).ok()
            };
            let stop = async { shutdown.wait_for(|s| *s).await.is_ok() };
            let pause = tokio::select! {
                _ = tick => Duration::ZERO,
                r = went_live => match r {
                    Some(at) => {
                        live_at = at;
                        AFTER_APPLY
                    }
                    // No renderer any more: the tick alone paces us.
                    None => POLL,
                },
                _ = stop => return,
            };
            tokio::time::sleep(pause).await;
            if *shutdown.borrow() {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    // Answers of Debian's haproxy 2.6.12 to `show stat -1 6 -1`, captured
    // from a live process (one backend with a server in each state), not
    // written by hand: they test haproxy's format, not our idea of it.
    const DRAIN: &str = include_str!("testdata/show_stat_2.6_drain.csv");
    const GOING_DOWN: &str = include_str!("testdata/show_stat_2.6_going_down.csv");
    const ERRORS: &str = include_str!("testdata/show_stat_2.6_errors.csv");

    fn server<'a>(s: &'a Snapshot, backend: &str, name: &str) -> &'a Server {
        &s.backends[backend].servers[name]
    }

    #[test]
    fn reads_each_state_from_real_haproxy_output() {
        let s = parse(DRAIN, MAX_SERVERS, 7).unwrap();
        assert_eq!(s.at_ms, 7);
        assert!(s.error.is_none() && !s.truncated);
        assert_eq!(
            s.backends.keys().collect::<Vec<_>>(),
            ["be_empty", "be_web"]
        );
        let web = &s.backends["be_web"];
        assert_eq!(web.status, "UP");
        let states: Vec<(&str, &str)> = web
            .servers
            .iter()
            .map(|(n, s)| (n.as_str(), s.status.as_str()))
            .collect();
        assert_eq!(
            states,
            [
                ("down", "DOWN"),
                ("drain", "DRAIN"),
                ("maint", "MAINT"),
                ("nocheck", "no check"),
                ("up", "UP"),
            ]
        );
        let up = server(&s, "be_web", "up");
        assert_eq!(up.check.as_deref(), Some("L4OK"));
        assert_eq!(up.check_detail.as_deref(), Some("Layer4 check passed"));
        assert_eq!(up.lastchg_s, Some(6));
        let down = server(&s, "be_web", "down");
        assert_eq!(down.check.as_deref(), Some("L4CON"));
        // The specific finding wins over the generic description.
        assert_eq!(down.check_detail.as_deref(), Some("Connection refused"));
        assert_eq!((down.chkfail, down.econ), (1, 0));
        let nocheck = server(&s, "be_web", "nocheck");
        assert_eq!((nocheck.check.as_ref(), nocheck.chkfail), (None, 0));
        assert!(s.backends["be_empty"].servers.is_empty());
    }

    #[test]
    fn reads_transitions_sessions_and_errors() {
        let s = parse(GOING_DOWN, MAX_SERVERS, 0).unwrap();
        let up = server(&s, "be_web", "up");
        assert_eq!(up.status, "UP 2/3", "failing checks, not yet down");
        assert_eq!(up.check_detail.as_deref(), Some("Connection refused"));

        let s = parse(ERRORS, MAX_SERVERS, 0).unwrap();
        let nocheck = server(&s, "be_web", "nocheck");
        assert_eq!((nocheck.stot, nocheck.econ, nocheck.eresp), (15, 3, 0));
        assert_eq!(server(&s, "be_web", "drain").status, "DOWN");
        assert_eq!(server(&s, "be_web", "drain").chkfail, 3);
        assert_eq!(s.backends["be_web"].scur, 1);
    }

    #[test]
    fn stops_at_the_server_limit() {
        let s = parse(DRAIN, 2, 0).unwrap();
        assert!(s.truncated);
        let n: usize = s.backends.values().map(|b| b.servers.len()).sum();
        assert_eq!(n, 2);
        assert!(!parse(DRAIN, 5, 0).unwrap().truncated, "exactly five fit");
    }

    #[test]
    fn an_answer_without_statistics_is_an_error() {
        let e = parse("Permission denied\n", MAX_SERVERS, 0).unwrap_err();
        assert!(e.contains("Permission denied"), "{e}");
        assert!(parse("", MAX_SERVERS, 0).unwrap_err().contains("nothing"));
        let e = parse("# pxname,svname\nbe,s\n", MAX_SERVERS, 0).unwrap_err();
        assert!(e.contains("status"), "{e}");
    }

    #[test]
    fn quoted_fields_keep_their_commas_and_quotes() {
        assert_eq!(
            split_csv(r#"a,"b,c","say ""hi""",,d"#),
            ["a", "b,c", "say \"hi\"", "", "d"]
        );
        let text = "# pxname,svname,status,last_chk\nbe,s1,DOWN,\"refused, twice\"\n";
        let s = parse(text, MAX_SERVERS, 0).unwrap();
        assert_eq!(
            server(&s, "be", "s1").check_detail.as_deref(),
            Some("refused, twice")
        );
    }

    #[tokio::test]
    async fn a_missing_socket_is_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let s = ask(&dir.path().join("none.sock"), 5).await;
        assert_eq!(s.at_ms, 5);
        assert!(s.error.as_deref().unwrap().contains("connect"), "{s:?}");
        assert!(s.backends.is_empty());
    }
}
