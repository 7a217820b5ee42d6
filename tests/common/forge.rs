//! Forged peer RPCs: what an attacker who reaches a node's peer port would
//! send. Every body is well formed, so a node that skipped authentication
//! would act on it: append a log entry that creates an admin token, take a
//! vote at term 1000, install a snapshot, apply a forwarded write that
//! injects a `server` line into haproxy.cfg, start an election, step down.

#![allow(dead_code)]

use clb::auth::{sha256_hex, Scope, Token};
use clb::codec::Codec;
use clb::consensus::rpc::{CampaignRequest, IdentityProbe, V1_PREFIX};
use clb::consensus::{LeaderRequest, TypeConfig};
use clb::model::{Command, MemberSpec, Proposal, ServiceDef};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, SnapshotMeta, Vote};

/// The secret of the admin token a forged entry would create.
pub const EVIL_TOKEN: &str =
    "clb_evil_0000000000000000000000000000000000000000000000000000000000000000";
/// Text that must never reach a registry or a rendered file.
pub const EVIL: &str = "evil";
/// The term a forged vote or append claims.
pub const FORGED_TERM: u64 = 1000;

fn proposal(cmd: Command) -> Proposal {
    Proposal {
        cmd,
        by: "attacker".into(),
        at_ms: 0,
        force: true,
    }
}

/// A command that would create an admin token only the attacker knows.
pub fn evil_token() -> Command {
    Command::CreateToken {
        id: EVIL.into(),
        token: Token {
            name: EVIL.into(),
            scope: Scope::Admin,
            hash: sha256_hex(EVIL_TOKEN.as_bytes()),
            created_at_ms: 0,
            expires_at_ms: None,
            created_by: "attacker".into(),
        },
    }
}

/// A registration whose address carries a second haproxy `server` line.
pub fn injected_member() -> Command {
    Command::Register {
        service: "http".into(),
        member: "m-evil".into(),
        spec: MemberSpec {
            address: "10.0.0.1:80\n    server evil 6.6.6.6".into(),
            port: None,
            weight: None,
            ttl_s: None,
        },
        create: ServiceDef::well_known("http"),
        at_ms: 0,
    }
}

/// `path` with `v` as the release before postcard sent it, and under the
/// v1 prefix in v1: both must meet the same gate.
fn both<T: serde::Serialize>(path: &str, v: &T) -> [(String, Vec<u8>); 2] {
    [
        (path.to_string(), Codec::Legacy.encode(v).expect("encode")),
        (
            format!("{V1_PREFIX}{path}"),
            Codec::V1.encode(v).expect("encode"),
        ),
    ]
}

/// (path, body) of every peer RPC, forged.
pub fn forgeries() -> Vec<(String, Vec<u8>)> {
    let vote = Vote::new_committed(FORGED_TERM, 99);
    let log_id = |index| LogId::new(CommittedLeaderId::new(FORGED_TERM, 99), index);
    let entry = Entry::<TypeConfig> {
        log_id: log_id(1),
        payload: EntryPayload::Normal(proposal(evil_token())),
    };
    let append = AppendEntriesRequest::<TypeConfig> {
        vote,
        prev_log_id: None,
        entries: vec![entry],
        leader_commit: Some(log_id(1)),
    };
    let ask_vote = VoteRequest::<u64> {
        vote: Vote::new(FORGED_TERM, 99),
        last_log_id: Some(log_id(1_000_000)),
    };
    let snapshot = InstallSnapshotRequest::<TypeConfig> {
        vote,
        meta: SnapshotMeta {
            last_log_id: Some(log_id(1_000_000)),
            last_membership: Default::default(),
            snapshot_id: "forged".into(),
        },
        offset: 0,
        data: b"{}".to_vec(),
        done: true,
    };
    let write = |cmd| LeaderRequest::Write {
        proposal: proposal(cmd),
        scope: Scope::Admin,
    };
    [
        both("/raft/append", &append),
        both("/raft/vote", &ask_vote),
        both("/raft/snapshot", &snapshot),
        both("/raft/leader", &write(evil_token())),
        both("/raft/leader", &write(injected_member())),
        both(
            "/raft/campaign",
            &CampaignRequest {
                from: 99,
                term: FORGED_TERM,
            },
        ),
        both("/raft/identity", &IdentityProbe { id: 1, instance: 7 }),
        both("/raft/node", &()),
        both("/raft/failover", &()),
        both("/raft/bgp-drain", &true),
        [
            ("/raft/no-such-rpc".to_string(), Vec::new()),
            (format!("{V1_PREFIX}/raft/no-such-rpc"), Vec::new()),
        ],
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Sends every forgery to `base` (`scheme://peer-addr`) without a secret
/// and with each of `wrong` secrets, claiming `cluster_id`; every one must
/// be refused as an unauthenticated peer, with a body that names nothing.
pub async fn assert_all_refused(
    http: &reqwest::Client,
    base: &str,
    cluster_id: &str,
    wrong: &[&str],
) {
    let mut secrets: Vec<Option<&str>> = vec![None];
    secrets.extend(wrong.iter().map(|w| Some(*w)));
    for (path, body) in forgeries() {
        for secret in &secrets {
            let mut req = http
                .post(format!("{base}{path}"))
                .header("x-clb-cluster", cluster_id)
                .header("content-type", "application/octet-stream")
                .body(body.clone());
            if let Some(s) = secret {
                req = req.header("x-clb-secret", *s);
            }
            let r = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            assert_eq!(
                status, 401,
                "{path} with secret {secret:?} answered {text:?}"
            );
            assert_eq!(text, "unauthenticated peer", "{path}");
            assert!(!text.contains(cluster_id), "{path} named the cluster id");
        }
    }
}
