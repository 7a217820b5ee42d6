//! `clbd --restore FILE`: a backup as the log entries that restore it, parts
//! of bounded size ([`Command::RestoreChunk`]) and one
//! [`Command::RestoreCommit`] that makes them live at once. A backup in one
//! entry made one sled value of megabytes, which sled keeps outside its
//! fsynced log. Pure: the same backup gives the same entries on every node.

use std::sync::Arc;

use crate::model::{Command, Members, Registry, Service, RESTORE_PART_ITEMS};

/// Encoded bytes of one part, about: a log entry, and an AppendEntries
/// carrying a few hundred of them, stay small.
const PART_BYTES: u64 = 64 << 10;

/// A backup cut into parts.
#[derive(Debug, Clone)]
pub struct Plan {
    /// From the parts' content: every node given the same file proposes
    /// the same entries, and a part staged twice is staged once.
    pub id: u64,
    pub parts: Vec<Registry>,
    /// The whole backup, to recognize it once restored.
    pub registry: Registry,
}

impl Plan {
    pub fn new(registry: Registry) -> Self {
        let parts = split(&registry);
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        // bincode, not the current codec: nodes of the release before
        // postcard must cut and name the same backup alike.
        for part in &parts {
            hash.update(&bincode::serialize(part).expect("a registry encodes"));
        }
        let digest = hash.finish();
        let id = u64::from_be_bytes(digest.as_ref()[..8].try_into().expect("32 bytes"));
        Self {
            id,
            parts,
            registry,
        }
    }

    /// The entries to propose, in order: every part, then the commit. None
    /// for an empty backup.
    pub fn commands(&self) -> Vec<Command> {
        if self.parts.is_empty() {
            return Vec::new();
        }
        let mut out: Vec<Command> = self
            .parts
            .iter()
            .enumerate()
            .map(|(seq, part)| Command::RestoreChunk {
                id: self.id,
                seq: seq as u32,
                part: Box::new(part.clone()),
            })
            .collect();
        out.push(Command::RestoreCommit {
            id: self.id,
            chunks: self.parts.len() as u32,
        });
        out
    }
}

/// Parts of at most [`RESTORE_PART_ITEMS`] services, members and tokens and
/// about [`PART_BYTES`]. A service's definition goes with each part that
/// holds some of its members.
fn split(registry: &Registry) -> Vec<Registry> {
    let mut parts = Vec::new();
    let mut part = Part::default();
    for (id, token) in &registry.tokens {
        part.room(&mut parts, size(&(id, token)));
        part.registry.tokens.insert(id.clone(), token.clone());
    }
    for (name, svc) in &registry.services {
        let def_bytes = size(&(name, &svc.def));
        part.room(&mut parts, def_bytes);
        part.open(name, svc);
        for (member, m) in &svc.members {
            if part.room(&mut parts, size(&(member, m))) {
                // The service continues in the new part.
                part.open(name, svc);
                part.items += 1;
                part.bytes += def_bytes;
            }
            let service = part.registry.services.get_mut(name).expect("opened above");
            Arc::make_mut(service)
                .members
                .insert(member.clone(), m.clone());
        }
    }
    if part.items > 0 {
        parts.push(part.registry);
    }
    parts
}

#[derive(Default)]
struct Part {
    registry: Registry,
    items: usize,
    bytes: u64,
}

impl Part {
    /// Counts one more item of `bytes`, first moving this part to `parts`
    /// when it would not fit. True when it did.
    fn room(&mut self, parts: &mut Vec<Registry>, bytes: u64) -> bool {
        let full =
            self.items > 0 && (self.items >= RESTORE_PART_ITEMS || self.bytes + bytes > PART_BYTES);
        if full {
            parts.push(std::mem::take(self).registry);
        }
        self.items += 1;
        self.bytes += bytes;
        full
    }

    /// `svc`'s definition, without members yet.
    fn open(&mut self, name: &str, svc: &Service) {
        self.registry.services.insert(
            name.to_owned(),
            Arc::new(Service {
                def: svc.def.clone(),
                members: Members::new(),
            }),
        );
    }
}

fn size<T: serde::Serialize>(v: &T) -> u64 {
    bincode::serialized_size(v).expect("a registry encodes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MemberSpec, Response, ServiceDef};

    fn backup(members: usize) -> Registry {
        let mut r = Registry::default();
        for i in 0..members {
            for service in ["http", "mysql"] {
                r.apply(&Command::Register {
                    service: service.into(),
                    member: format!("member-{i:06}"),
                    spec: MemberSpec {
                        address: format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
                        port: Some(8080),
                        weight: None,
                        ttl_s: None,
                    },
                    create: ServiceDef::well_known(service),
                    at_ms: 1,
                });
            }
        }
        r
    }

    #[test]
    fn a_backup_becomes_bounded_parts_that_restore_it_whole() {
        let registry = backup(3_000);
        let plan = Plan::new(registry.clone());
        assert!(plan.parts.len() > 6, "{}", plan.parts.len());
        for part in &plan.parts {
            let items = part.services.len() + part.member_count() + part.tokens.len();
            assert!(items <= RESTORE_PART_ITEMS, "{items}");
            assert!(size(part) <= PART_BYTES + 1024, "{}", size(part));
        }
        // The same file gives the same entries on every node.
        let again = Plan::new(registry.clone());
        assert_eq!(again.id, plan.id);
        assert_ne!(Plan::new(backup(2_999)).id, plan.id);
        let mut r = Registry::default();
        for cmd in plan.commands() {
            cmd.validate().unwrap();
            assert_eq!(r.apply(&cmd), Response::Done, "{cmd:?}");
        }
        assert_eq!(r, registry);
        assert!(Plan::new(Registry::default()).commands().is_empty());
    }
}
