//! What only the leader keeps, in memory: member renewal times for TTLs (so a
//! renewal is not a Raft write) and recent removals for the guardrail.
//!
//! Both start empty when a node becomes leader: every TTL member gets a full
//! TTL of grace from that moment, and the guardrail window starts afresh.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::model::{Command, MemberState, Registry};

/// Refuse changes that take more than `share` of a service's members out
/// of rotation within `window`.
#[derive(Debug, Clone, Copy)]
pub struct Guardrail {
    pub share: f64,
    pub window: Duration,
}

impl Default for Guardrail {
    fn default() -> Self {
        Self {
            share: 0.5,
            window: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// The term these maps belong to.
    term: u64,
    since: Option<Instant>,
    renewals: HashMap<(String, String), Instant>,
    removals: HashMap<String, VecDeque<Instant>>,
}

#[derive(Debug, Default)]
pub struct LeaderState {
    guardrail: Guardrail,
    inner: Mutex<Inner>,
}

impl LeaderState {
    pub fn new(guardrail: Guardrail) -> Self {
        Self {
            guardrail,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self, term: u64, now: Instant) -> std::sync::MutexGuard<'_, Inner> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.term != term || g.since.is_none() {
            *g = Inner {
                term,
                since: Some(now),
                ..Inner::default()
            };
        }
        g
    }

    pub fn renewed(&self, term: u64, service: &str, member: &str, now: Instant) {
        self.lock(term, now)
            .renewals
            .insert((service.to_string(), member.to_string()), now);
    }

    /// Members whose TTL ran out: last renewal (or the start of this term)
    /// older than their TTL.
    pub fn expired(&self, term: u64, registry: &Registry, now: Instant) -> Vec<(String, String)> {
        let g = self.lock(term, now);
        let since = g.since.unwrap_or(now);
        let mut out = Vec::new();
        for (service, svc) in &registry.services {
            for (member, m) in &svc.members {
                let Some(ttl) = m.ttl_s else { continue };
                let last = g
                    .renewals
                    .get(&(service.clone(), member.clone()))
                    .copied()
                    .unwrap_or(since)
                    .max(since);
                if now.duration_since(last) > Duration::from_secs(ttl.into()) {
                    out.push((service.clone(), member.clone()));
                }
            }
        }
        out
    }

    /// `Err(reason)` when `cmd` would take one more member of its service out
    /// of rotation than the guardrail allows; records it otherwise.
    pub fn admit(
        &self,
        term: u64,
        registry: &Registry,
        cmd: &Command,
        now: Instant,
    ) -> Result<(), String> {
        // Only a member still in rotation counts: unregistering a drained
        // member takes nothing more out.
        let service = match cmd {
            Command::Unregister { service, member }
            | Command::SetMemberState {
                service,
                member,
                state: MemberState::Drain | MemberState::Maint,
            } => registry
                .member(service, member)
                .filter(|m| m.state == MemberState::Active)
                .map(|_| service),
            _ => None,
        };
        let Some(service) = service else {
            return Ok(());
        };
        let in_rotation = registry.services[service]
            .members
            .values()
            .filter(|m| m.state == MemberState::Active)
            .count();
        let mut g = self.lock(term, now);
        let window = self.guardrail.window;
        let recent = g.removals.entry(service.clone()).or_default();
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= window)
        {
            recent.pop_front();
        }
        // Relative to what was in rotation when the window began.
        let base = in_rotation + recent.len();
        let allowed = ((self.guardrail.share * base as f64).floor() as usize).max(1);
        if recent.len() + 1 > allowed {
            return Err(format!(
                "guardrail: this would take {} of {base} members of {service} out of rotation within {} s (limit {:.0}%); retry with --force (?force=true) to override",
                recent.len() + 1,
                window.as_secs(),
                self.guardrail.share * 100.0
            ));
        }
        recent.push_back(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MemberSpec, ServiceDef};

    fn registry(n: usize) -> Registry {
        let mut r = Registry::default();
        for i in 0..n {
            r.apply(&Command::Register {
                service: "http".into(),
                member: format!("m{i}"),
                spec: MemberSpec {
                    address: "10.0.0.1".into(),
                    port: None,
                    weight: None,
                    ttl_s: Some(10),
                },
                create: ServiceDef::well_known("http"),
                at_ms: 0,
            });
        }
        r
    }

    fn unreg(i: usize) -> Command {
        Command::Unregister {
            service: "http".into(),
            member: format!("m{i}"),
        }
    }

    #[test]
    fn guardrail_allows_half_per_window_and_at_least_one() {
        let g = LeaderState::new(Guardrail::default());
        let now = Instant::now();
        let mut r = registry(10);
        for i in 0..5 {
            g.admit(1, &r, &unreg(i), now).unwrap();
            r.apply(&unreg(i));
        }
        let err = g.admit(1, &r, &unreg(5), now).unwrap_err();
        assert!(err.contains("6 of 10") && err.contains("--force"), "{err}");
        // After the window it is allowed again.
        assert!(g
            .admit(1, &r, &unreg(5), now + Duration::from_secs(61))
            .is_ok());
        // Unregistering a member already drained takes nothing more out.
        let mut drained = registry(2);
        let g2 = LeaderState::new(Guardrail::default());
        let drain = Command::SetMemberState {
            service: "http".into(),
            member: "m0".into(),
            state: MemberState::Drain,
        };
        g2.admit(1, &drained, &drain, now).unwrap();
        drained.apply(&drain);
        assert!(g2.admit(1, &drained, &unreg(0), now).is_ok());
        assert!(g2.admit(1, &drained, &unreg(1), now).is_err());
        // A one-member service may lose its member.
        let one = registry(1);
        assert!(LeaderState::new(Guardrail::default())
            .admit(1, &one, &unreg(0), now)
            .is_ok());
    }

    #[test]
    fn a_new_term_grants_full_grace_and_renewals_count() {
        let s = LeaderState::new(Guardrail::default());
        let t0 = Instant::now();
        let r = registry(2);
        assert!(s.expired(1, &r, t0).is_empty());
        s.renewed(1, "http", "m0", t0 + Duration::from_secs(8));
        let late = t0 + Duration::from_secs(11);
        assert_eq!(
            s.expired(1, &r, late),
            vec![("http".to_string(), "m1".to_string())]
        );
        // A new leader term starts the clock again for everyone.
        assert!(s.expired(2, &r, late).is_empty());
        assert_eq!(s.expired(2, &r, late + Duration::from_secs(11)).len(), 2);
    }
}
