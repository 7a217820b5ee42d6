//! Leader-side batching of client writes.
//!
//! openraft 0.9 appends (and so flushes) each `client_write` on its own, one
//! after another in its core loop, which caps a leader at one write per log
//! flush however many clients wait. The proposer instead keeps at most
//! [`IN_FLIGHT`] log entries in flight and packs the writes that queued up
//! meanwhile into one [`Command::Batch`] entry: one append, one flush and one
//! replication round for all of them. A lone write is proposed as itself, so
//! an idle cluster pays nothing for this.

use std::sync::Arc;

use openraft::error::ClientWriteError;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{LeaderError, Raft};
use crate::model::{Command, Proposal, Response};

/// Log entries proposed and not yet applied. One keeps the leader's flush of
/// the next entry overlapping the replication of the previous one.
const IN_FLIGHT: usize = 2;
/// Most proposals in one entry, which bounds its size (a registration is about
/// 150 bytes) and so the size of an AppendEntries request.
const MAX_BATCH: usize = 256;

/// The outcome of one proposal: its log index and response.
pub type Outcome = Result<(u64, Response), LeaderError>;

type Pending = (Proposal, oneshot::Sender<Outcome>);

/// Hands writes to the batching task. Clones share it.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::UnboundedSender<Pending>,
}

impl Proposer {
    /// Starts the batching task for `raft`. It stops when every `Proposer`
    /// clone is dropped.
    pub fn start(raft: Raft) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(raft, rx));
        Self { tx }
    }

    /// Proposes `proposal` and waits until it is committed and applied here.
    pub async fn propose(&self, proposal: Proposal) -> Outcome {
        let (tx, rx) = oneshot::channel();
        if self.tx.send((proposal, tx)).is_err() {
            return Err(LeaderError::Failed("raft is shutting down".into()));
        }
        rx.await
            .unwrap_or_else(|_| Err(LeaderError::Failed("raft is shutting down".into())))
    }
}

async fn run(raft: Raft, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        // Writes that arrive while every slot is taken join the next batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let (proposals, waiters): (Vec<Proposal>, Vec<oneshot::Sender<Outcome>>) =
            batch.into_iter().unzip();
        let entry = match <[Proposal; 1]>::try_from(proposals) {
            Ok([one]) => one,
            Err(many) => Proposal {
                at_ms: many.first().map_or(0, |p| p.at_ms),
                cmd: Command::Batch(many),
                by: "batch".into(),
                force: false,
            },
        };
        // Submitted here, in order; only the wait for the outcome runs aside.
        let submitted = raft.client_write_ff(entry).await;
        tokio::spawn(async move {
            let result = match submitted {
                Ok(rx) => match rx.await {
                    Ok(Ok(resp)) => Ok((resp.log_id.index, resp.data)),
                    Ok(Err(e)) => Err(write_error(e)),
                    Err(_) => Err(LeaderError::Failed("raft stopped".into())),
                },
                Err(fatal) => Err(LeaderError::Failed(fatal.to_string())),
            };
            drop(slot);
            distribute(result, waiters);
        });
    }
}

/// Gives each waiter its own part of the entry's outcome.
fn distribute(result: Outcome, waiters: Vec<oneshot::Sender<Outcome>>) {
    let answers: Vec<Outcome> = match result {
        Ok((index, Response::Batch(each))) if each.len() == waiters.len() => {
            each.into_iter().map(|r| Ok((index, r))).collect()
        }
        Ok(one) if waiters.len() == 1 => vec![Ok(one)],
        Ok((index, r)) => {
            let why = format!(
                "entry {index} answered {r:?} for {} proposals",
                waiters.len()
            );
            vec![Err(LeaderError::Failed(why)); waiters.len()]
        }
        Err(e) => vec![Err(e); waiters.len()],
    };
    for (w, a) in waiters.into_iter().zip(answers) {
        // The caller may have given up (client gone): nothing to tell.
        let _ = w.send(a);
    }
}

fn write_error(e: ClientWriteError<super::NodeId, openraft::BasicNode>) -> LeaderError {
    match e {
        ClientWriteError::ForwardToLeader(_) => LeaderError::NotLeader,
        ClientWriteError::ChangeMembershipError(e) => LeaderError::Rejected(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiters(
        n: usize,
    ) -> (
        Vec<oneshot::Sender<Outcome>>,
        Vec<oneshot::Receiver<Outcome>>,
    ) {
        (0..n).map(|_| oneshot::channel()).unzip()
    }

    #[test]
    fn each_waiter_gets_its_own_response() {
        let (tx, rx) = waiters(2);
        let each = vec![
            Response::Done,
            Response::NotFound {
                what: "member x".into(),
            },
        ];
        distribute(Ok((7, Response::Batch(each.clone()))), tx);
        let got: Vec<Outcome> = rx.into_iter().map(|mut r| r.try_recv().unwrap()).collect();
        assert!(matches!(&got[0], Ok((7, r)) if *r == each[0]));
        assert!(matches!(&got[1], Ok((7, r)) if *r == each[1]));
    }

    #[test]
    fn a_lone_proposal_gets_the_entry_response_and_errors_reach_everyone() {
        let (tx, rx) = waiters(1);
        distribute(Ok((3, Response::Done)), tx);
        assert!(matches!(
            rx.into_iter().next().unwrap().try_recv(),
            Ok(Ok((3, Response::Done)))
        ));
        let (tx, rx) = waiters(3);
        distribute(Err(LeaderError::NotLeader), tx);
        for mut r in rx {
            assert!(matches!(r.try_recv(), Ok(Err(LeaderError::NotLeader))));
        }
        // A batch answered with the wrong number of responses fails every caller.
        let (tx, rx) = waiters(2);
        distribute(Ok((4, Response::Batch(vec![Response::Done]))), tx);
        for mut r in rx {
            assert!(matches!(r.try_recv(), Ok(Err(LeaderError::Failed(_)))));
        }
    }
}
