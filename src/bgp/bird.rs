//! BIRD 2's control socket (the one `birdc` uses), and the include file
//! clbd writes for BIRD's config.
//!
//! The protocol is line based: BIRD greets with `0001 BIRD x.y ready.`, and
//! answers each command with lines `DDDD-text` (more follows), ` text` (a
//! continuation of the previous code) and a last `DDDD text`. Codes from
//! 8000 up are errors. One connection per request: a restarted BIRD then
//! costs nothing but the next request.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// One exchange must not hold up the announcer.
const TIMEOUT: Duration = Duration::from_secs(2);

/// One line of an answer: its code (the last code seen for continuations)
/// and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub code: u16,
    pub text: String,
}

/// Sends `command` and returns the answer's lines, or why there is none
/// (no BIRD on the socket, or an error code).
pub async fn request(socket: &Path, command: &str) -> Result<Vec<Line>, String> {
    let at = socket.display();
    let work = async {
        let s = UnixStream::connect(socket)
            .await
            .map_err(|e| format!("connect {at}: {e}"))?;
        let (read, mut write) = s.into_split();
        let mut read = BufReader::new(read);
        let hello = reply(&mut read).await?;
        if hello.first().map(|l| l.code) != Some(1) {
            return Err(format!("{at} is not a BIRD control socket"));
        }
        write
            .write_all(format!("{command}\n").as_bytes())
            .await
            .map_err(|e| format!("write {at}: {e}"))?;
        let lines = reply(&mut read).await?;
        match lines.iter().find(|l| l.code >= 8000) {
            Some(e) => Err(format!("bird refused `{command}`: {}", e.text.trim())),
            None => Ok(lines),
        }
    };
    tokio::time::timeout(TIMEOUT, work)
        .await
        .map_err(|_| format!("{at} did not answer within {TIMEOUT:?}"))?
}

async fn reply(read: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> Result<Vec<Line>, String> {
    let mut lines = Vec::new();
    let mut code = 0;
    loop {
        let mut raw = String::new();
        if read
            .read_line(&mut raw)
            .await
            .map_err(|e| format!("read: {e}"))?
            == 0
        {
            return Err("bird closed the connection".into());
        }
        let (line, last) = parse_line(raw.trim_end_matches('\n'), code)?;
        code = line.code;
        lines.push(line);
        if last {
            return Ok(lines);
        }
    }
}

/// One raw line: the line and whether it ends the answer.
pub fn parse_line(raw: &str, previous: u16) -> Result<(Line, bool), String> {
    if let Some(text) = raw.strip_prefix(' ') {
        return Ok((
            Line {
                code: previous,
                text: text.to_string(),
            },
            false,
        ));
    }
    let head = raw
        .get(..4)
        .filter(|h| h.bytes().all(|b| b.is_ascii_digit()));
    let (Some(head), Some(sep)) = (head, raw.as_bytes().get(4)) else {
        return Err(format!("not a BIRD answer line: {raw:?}"));
    };
    let code = head.parse().unwrap_or(0);
    let text = raw[5..].to_string();
    match sep {
        b'-' => Ok((Line { code, text }, false)),
        b' ' => Ok((Line { code, text }, true)),
        _ => Err(format!("not a BIRD answer line: {raw:?}")),
    }
}

/// One row of `show protocols`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protocol {
    pub name: String,
    pub proto: String,
    /// `up`, `down`, `start`, `stop`.
    pub state: String,
    /// For BGP: `Established`, `Idle`, `Active`, `Connect`... (may be empty).
    pub info: String,
}

/// Parses `show protocols` (code 1002 rows; the 2002 header is skipped).
pub fn protocols(lines: &[Line]) -> Vec<Protocol> {
    lines
        .iter()
        .filter(|l| l.code == 1002)
        .filter_map(|l| {
            let cols: Vec<&str> = l.text.split_whitespace().collect();
            // name proto table state since [info...]; `since` may be a
            // date and a time, so the info is what follows the last
            // column that looks like a time or a date.
            if cols.len() < 4 {
                return None;
            }
            let rest = &cols[4..];
            let info_from = rest
                .iter()
                .rposition(|c| c.contains(':') || (c.len() == 10 && c.matches('-').count() == 2))
                .map(|i| i + 1)
                .unwrap_or(0);
            Some(Protocol {
                name: cols[0].to_string(),
                proto: cols[1].to_string(),
                state: cols[3].to_string(),
                info: rest[info_from..].join(" "),
            })
        })
        .collect()
}

/// One row of `show bfd sessions`: the neighbour and its state (`Up`,
/// `Down`, `Init`, `AdminDown`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BfdSession {
    pub neighbor: IpAddr,
    pub state: String,
}

/// Parses `show bfd sessions` (rows of code 1020 after the header).
pub fn bfd_sessions(lines: &[Line]) -> Vec<BfdSession> {
    lines
        .iter()
        .filter(|l| l.code == 1020)
        .filter_map(|l| {
            let cols: Vec<&str> = l.text.split_whitespace().collect();
            let neighbor = cols.first()?.parse().ok()?;
            Some(BfdSession {
                neighbor,
                state: cols.get(2)?.to_string(),
            })
        })
        .collect()
}

/// What clbd tells BIRD, written to `--bird-include` for BIRD's config to
/// pull in with `include`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Include {
    pub protocol: String,
    pub vip: IpAddr,
    pub neighbor: IpAddr,
    pub asn: u32,
    pub peer_asn: u32,
    /// BFD transmit and receive interval; 0 turns BFD off.
    pub bfd_interval_ms: u64,
}

impl Include {
    /// The BGP protocol's name in BIRD.
    pub fn session_name(&self) -> String {
        format!("{}_bgp", self.protocol)
    }

    /// The config text. The VIP's route sits in a static protocol of its
    /// own that starts `disabled`: a BIRD that (re)starts announces nothing
    /// until clbd, having checked this balancer is fit, enables it.
    pub fn text(&self) -> String {
        let (family, len) = match self.vip {
            IpAddr::V4(_) => ("ipv4", 32),
            IpAddr::V6(_) => ("ipv6", 128),
        };
        let name = &self.protocol;
        let session = self.session_name();
        let bfd = if self.bfd_interval_ms > 0 {
            format!(
                "protocol bfd {name}_bfd {{\n  interface \"*\" {{\n    \
                 min rx interval {i} ms;\n    min tx interval {i} ms;\n    multiplier 3;\n  }};\n}}\n\n",
                i = self.bfd_interval_ms,
            )
        } else {
            String::new()
        };
        let bfd_on = if self.bfd_interval_ms > 0 {
            "  bfd on;\n"
        } else {
            ""
        };
        format!(
            "# Written by clbd (--vip-mode bgp); changes are overwritten at its next start.\n\
             # clbd enables `{name}` while this balancer is fit to serve and disables it\n\
             # to withdraw the VIP.\n\n\
             protocol static {name} {{\n  {family};\n  route {vip}/{len} blackhole;\n  disabled;\n}}\n\n\
             {bfd}\
             protocol bgp {session} {{\n  local as {asn};\n  neighbor {neighbor} as {peer};\n  \
             {family} {{\n    import none;\n    export where proto = \"{name}\";\n    next hop self;\n  }};\n\
             {bfd_on}  hold time 3;\n  connect delay time 1;\n  connect retry time 2;\n  \
             error wait time 1, 10;\n}}\n",
            vip = self.vip,
            asn = self.asn,
            neighbor = self.neighbor,
            peer = self.peer_asn,
        )
    }
}

/// Writes `text` to `path` when it differs (atomically: temp file and
/// rename); true when it changed.
pub fn write_include(path: &Path, text: &str) -> std::io::Result<bool> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(false);
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(raw: &str) -> Vec<Line> {
        let mut code = 0;
        raw.lines()
            .map(|l| {
                let (line, _) = parse_line(l, code).unwrap();
                code = line.code;
                line
            })
            .collect()
    }

    #[test]
    fn answer_lines_carry_their_code_and_end() {
        assert_eq!(
            parse_line("0011-clb_vip: enabled", 0).unwrap(),
            (
                Line {
                    code: 11,
                    text: "clb_vip: enabled".into()
                },
                false
            )
        );
        assert!(parse_line("0000 ", 11).unwrap().1);
        assert_eq!(parse_line(" more", 1002).unwrap().0.code, 1002);
        assert!(parse_line("oops", 0).is_err());
        assert!(parse_line("12", 0).is_err());
    }

    #[test]
    fn protocols_as_bird_2_prints_them() {
        // Copied from `show protocols` of BIRD 2.0.12.
        let raw = "2002-Name       Proto      Table      State  Since         Info\n\
                   1002-device1    Device     ---        up     16:03:56.091  \n \
                   clb_vip    Static     master4    down   16:03:56.091  \n \
                   uplink     BGP        ---        start  2026-12-01 16:03:56  Idle          \n \
                   b2         BGP        ---        up     16:03:57.001  Established   \n\
                   0000 ";
        let p = protocols(&lines(raw));
        assert_eq!(p.len(), 4);
        assert_eq!(p[1].name, "clb_vip");
        assert_eq!(p[1].state, "down");
        assert_eq!(p[2].info, "Idle");
        assert_eq!(p[3].info, "Established");
        assert_eq!(p[0].info, "");
    }

    #[test]
    fn bfd_sessions_as_bird_2_prints_them() {
        let raw = "1020-clb_bfd:\n \
                   IP address                Interface  State      Since         Interval  Timeout\n \
                   10.0.0.1                  eth0       Up         16:10:01.123    0.100    0.300\n\
                   0000 ";
        let s = bfd_sessions(&lines(raw));
        assert_eq!(
            s,
            vec![BfdSession {
                neighbor: "10.0.0.1".parse().unwrap(),
                state: "Up".into()
            }]
        );
    }

    #[test]
    fn the_include_starts_withdrawn_and_exports_only_the_vip() {
        let inc = Include {
            protocol: "clb_vip".into(),
            vip: "192.0.2.10".parse().unwrap(),
            neighbor: "10.0.0.1".parse().unwrap(),
            asn: 65001,
            peer_asn: 65000,
            bfd_interval_ms: 100,
        };
        let t = inc.text();
        assert!(
            t.contains("route 192.0.2.10/32 blackhole;\n  disabled;"),
            "{t}"
        );
        assert!(t.contains("export where proto = \"clb_vip\";"), "{t}");
        assert!(t.contains("bfd on;"), "{t}");
        assert!(t.contains("min rx interval 100 ms"), "{t}");
        let v6 = Include {
            vip: "2001:db8::10".parse().unwrap(),
            bfd_interval_ms: 0,
            ..inc
        };
        let t = v6.text();
        assert!(
            t.contains("ipv6;\n  route 2001:db8::10/128 blackhole;"),
            "{t}"
        );
        assert!(!t.contains("bfd"), "{t}");
    }
}
