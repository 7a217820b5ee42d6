//! Token scopes and the permission each request needs; pure, like `model`.
//!
//! A token is `clb_<id>_<64 hex>`: the id finds the record, the SHA-256 of the
//! whole secret is what the replicated state keeps.

use serde::{Deserialize, Serialize};

use crate::names::{validate_name, InvalidField};

/// What a token may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Scope {
    /// Everything.
    Admin,
    /// Every read, no write.
    Read,
    /// Register, unregister and change the state of members of one service
    /// (`*`: any service), optionally only members matching a glob.
    Register {
        service: String,
        members: Option<String>,
    },
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Admin => f.write_str("admin"),
            Scope::Read => f.write_str("read"),
            Scope::Register {
                service,
                members: None,
            } => write!(f, "register:{service}"),
            Scope::Register {
                service,
                members: Some(p),
            } => write!(f, "register:{service}:{p}"),
        }
    }
}

impl From<Scope> for String {
    fn from(s: Scope) -> String {
        s.to_string()
    }
}

impl TryFrom<String> for Scope {
    type Error = InvalidField;
    fn try_from(s: String) -> Result<Scope, InvalidField> {
        s.parse()
    }
}

fn bad_scope(reason: impl Into<String>) -> InvalidField {
    InvalidField {
        field: "scope",
        reason: reason.into(),
    }
}

impl std::str::FromStr for Scope {
    type Err = InvalidField;
    fn from_str(s: &str) -> Result<Scope, InvalidField> {
        match s {
            "admin" => return Ok(Scope::Admin),
            "read" => return Ok(Scope::Read),
            _ => {}
        }
        let Some(rest) = s.strip_prefix("register:") else {
            return Err(bad_scope(
                "must be admin, read, register:SERVICE or register:SERVICE:MEMBER-GLOB",
            ));
        };
        let (service, members) = match rest.split_once(':') {
            Some((svc, glob)) => (svc, Some(glob)),
            None => (rest, None),
        };
        if service != "*" {
            validate_name("scope", service)?;
        }
        if let Some(glob) = members {
            let ok = !glob.is_empty()
                && glob.len() <= 63
                && glob
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-*".contains(&b));
            if !ok {
                return Err(bad_scope("member glob may use A-Z a-z 0-9 . _ - and *"));
            }
        }
        Ok(Scope::Register {
            service: service.to_string(),
            members: members.map(str::to_string),
        })
    }
}

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need<'a> {
    Read,
    Admin,
    /// A write to one member of one service.
    Member {
        service: &'a str,
        member: &'a str,
    },
}

impl Scope {
    pub fn allows(&self, need: Need<'_>) -> bool {
        match (self, need) {
            (Scope::Admin, _) => true,
            (Scope::Read, Need::Read) => true,
            (Scope::Register { service, members }, Need::Member { service: s, member }) => {
                (service == "*" || service == s)
                    && members.as_deref().is_none_or(|g| glob_match(g, member))
            }
            _ => false,
        }
    }
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// A replicated token: only the hash of its secret is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub name: String,
    pub scope: Scope,
    /// Hex SHA-256 of the whole secret string.
    pub hash: String,
    pub created_at_ms: u64,
    pub expires_at_ms: Option<u64>,
    pub created_by: String,
}

/// The prefix every clb token secret starts with.
pub const TOKEN_PREFIX: &str = "clb_";

/// Splits `clb_<id>_<secret>` into the id; `None` for other strings.
pub fn token_id(secret: &str) -> Option<&str> {
    let rest = secret.strip_prefix(TOKEN_PREFIX)?;
    let (id, key) = rest.split_once('_')?;
    (id.len() == 16 && key.len() == 64).then_some(id)
}

pub fn sha256_hex(data: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A cluster secret: 256 random bits in hex.
pub fn new_cluster_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares without stopping at the first difference.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A new token secret and its id.
pub fn new_secret() -> (String, String) {
    let id: [u8; 8] = rand::random();
    let key: [u8; 32] = rand::random();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let id = hex(&id);
    (id.clone(), format!("{TOKEN_PREFIX}{id}_{}", hex(&key)))
}

/// `90d`, `12h`, `30m`, `45s` → seconds.
pub fn parse_ttl(text: &str) -> Result<u64, InvalidField> {
    let bad = || InvalidField {
        field: "ttl",
        reason: format!("{text:?} is not a duration like 90d, 12h, 30m or 45s"),
    };
    let (num, unit) = text.split_at(text.len().saturating_sub(1));
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return Err(bad()),
    };
    match n.checked_mul(mult) {
        Some(s) if s > 0 => Ok(s),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_and_print() {
        for s in [
            "admin",
            "read",
            "register:web",
            "register:*",
            "register:web:web-*",
        ] {
            let scope: Scope = s.parse().unwrap();
            assert_eq!(scope.to_string(), s);
        }
        for bad in [
            "",
            "root",
            "register:",
            "register:a b",
            "register:web:a/b",
            "register:../x",
        ] {
            assert!(bad.parse::<Scope>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn each_scope_allows_exactly_its_part() {
        let m = Need::Member {
            service: "web",
            member: "web-1",
        };
        let other = Need::Member {
            service: "db",
            member: "web-1",
        };
        let admin = Scope::Admin;
        let read = Scope::Read;
        let web: Scope = "register:web".parse().unwrap();
        let any: Scope = "register:*".parse().unwrap();
        let glob: Scope = "register:web:api-*".parse().unwrap();
        assert!(admin.allows(Need::Admin) && admin.allows(Need::Read) && admin.allows(m));
        assert!(read.allows(Need::Read) && !read.allows(m) && !read.allows(Need::Admin));
        assert!(
            web.allows(m)
                && !web.allows(other)
                && !web.allows(Need::Read)
                && !web.allows(Need::Admin)
        );
        assert!(any.allows(m) && any.allows(other) && !any.allows(Need::Read));
        assert!(!glob.allows(m));
        assert!(glob.allows(Need::Member {
            service: "web",
            member: "api-7"
        }));
    }

    #[test]
    fn globs() {
        assert!(glob_match("web-*", "web-1"));
        assert!(glob_match("*", "x"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxcyyb"));
        assert!(!glob_match("web-*", "db-1"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("ab*ba", "aba"));
    }

    #[test]
    fn secrets_and_ttls() {
        let (id, secret) = new_secret();
        assert_eq!(token_id(&secret), Some(id.as_str()));
        assert_eq!(token_id("legacy-password"), None);
        assert_eq!(parse_ttl("90d").unwrap(), 90 * 86_400);
        assert_eq!(parse_ttl("45s").unwrap(), 45);
        for bad in ["", "d", "10", "10y", "0s", "-1d"] {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
        }
        assert_eq!(sha256_hex(b"abc").len(), 64);
    }
}
