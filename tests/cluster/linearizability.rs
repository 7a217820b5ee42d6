//! A linearizability checker for one member of a service, a register that
//! is absent or present with a value: Wing & Gong's search for an order of
//! the operations that respects real time and the register's semantics, with
//! Lowe's memoization over (set of linearized operations, register state).
//!
//! Operations whose outcome is unknown may take effect at any moment after
//! their invocation, or never.

use std::collections::{BTreeSet, HashSet};

/// What an operation asked of the member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Register: an idempotent upsert of this value (the member's port).
    Put(u32),
    /// Unregister.
    Del,
    /// A consistent read that saw this value (`None`: absent).
    Read(Option<u32>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged; for a read, answered.
    Ok,
    /// An unregister answered 404: it observed the member absent.
    NotFound,
    /// May or may not have taken effect (no answer, or "outcome unknown").
    Unknown,
}

#[derive(Debug, Clone)]
pub struct Entry {
    /// The caller's id for the operation, used in reports.
    pub id: usize,
    pub op: Op,
    pub outcome: Outcome,
    /// Invocation time.
    pub call: u64,
    /// Completion time; ignored when the outcome is unknown.
    pub ret: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// No valid order: the longest linearizable prefix found (ids in
    /// order) and the completed operation that could not follow it.
    NotLinearizable { prefix: Vec<usize>, stuck: usize },
    /// The search gave up; the history must be kept smaller.
    TooBig { steps: u64 },
}

/// State value of a present member whose value no read ever saw: every such
/// value behaves the same, which keeps the memo small.
const UNSEEN: u32 = u32::MAX;
const NIL: usize = usize::MAX;
const MAX_STEPS: u64 = 50_000_000;

type State = Option<u32>;

/// The register's semantics: the state after `op` from `state`, or `None`
/// when `op` cannot take effect (or taking it would change nothing an
/// omission would not, for an unknown unregister).
fn step(state: State, op: Op, outcome: Outcome) -> Option<State> {
    match (op, outcome) {
        (Op::Put(v), _) => Some(Some(v)),
        (Op::Del, Outcome::Ok | Outcome::Unknown) => state.is_some().then_some(None),
        (Op::Del, Outcome::NotFound) => state.is_none().then_some(None),
        (Op::Read(seen), _) => (seen == state).then_some(state),
    }
}

struct Node {
    op: usize,
    is_call: bool,
    prev: usize,
    next: usize,
    /// For a call: its return node, or `NIL` for an unknown outcome.
    ret: usize,
}

/// Checks one member's history; `Ok` when some linearization exists.
pub fn check(history: &[Entry]) -> Result<(), Violation> {
    // Reads constrain nothing unless answered.
    let ops: Vec<Entry> = history
        .iter()
        .filter(|e| !matches!((e.op, e.outcome), (Op::Read(_), Outcome::Unknown)))
        .cloned()
        .collect();
    let seen: BTreeSet<u32> = ops
        .iter()
        .filter_map(|e| match e.op {
            Op::Read(Some(v)) => Some(v),
            _ => None,
        })
        .collect();
    let canon = |op: Op| match op {
        Op::Put(v) if !seen.contains(&v) => Op::Put(UNSEEN),
        op => op,
    };
    let n = ops.len();

    // Unknown-outcome operations with the same effect are interchangeable:
    // they have no deadline, so any valid order that uses some of them can
    // use the earliest-invoked ones instead. Only a prefix (by invocation)
    // of each class may be linearized, which keeps the search polynomial.
    let mut class_prev = vec![None; n];
    let mut by_call: Vec<usize> = (0..n).collect();
    by_call.sort_by_key(|&i| ops[i].call);
    let mut last_del = None;
    let mut last_unseen_put = None;
    for &i in &by_call {
        if ops[i].outcome != Outcome::Unknown {
            continue;
        }
        let slot = match canon(ops[i].op) {
            Op::Del => &mut last_del,
            Op::Put(UNSEEN) => &mut last_unseen_put,
            _ => continue,
        };
        class_prev[i] = *slot;
        *slot = Some(i);
    }

    // Calls and returns in time order (a call first on a tie: concurrent),
    // as a doubly linked list after a head sentinel at index 0.
    let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * n);
    for (i, e) in ops.iter().enumerate() {
        events.push((e.call, 0, i));
        if e.outcome != Outcome::Unknown {
            events.push((e.ret.max(e.call), 1, i));
        }
    }
    events.sort();
    let mut nodes = vec![Node {
        op: NIL,
        is_call: false,
        prev: NIL,
        next: NIL,
        ret: NIL,
    }];
    let mut call_node = vec![NIL; n];
    for (k, &(_, kind, op)) in events.iter().enumerate() {
        let idx = k + 1;
        nodes.push(Node {
            op,
            is_call: kind == 0,
            prev: idx - 1,
            next: if k + 1 < events.len() { idx + 1 } else { NIL },
            ret: NIL,
        });
        if kind == 0 {
            call_node[op] = idx;
        } else {
            nodes[call_node[op]].ret = idx;
        }
    }
    nodes[0].next = if events.is_empty() { NIL } else { 1 };

    fn unlink(nodes: &mut [Node], x: usize) {
        let (p, q) = (nodes[x].prev, nodes[x].next);
        nodes[p].next = q;
        if q != NIL {
            nodes[q].prev = p;
        }
    }
    fn relink(nodes: &mut [Node], x: usize) {
        let (p, q) = (nodes[x].prev, nodes[x].next);
        nodes[p].next = x;
        if q != NIL {
            nodes[q].prev = x;
        }
    }

    let mut remaining = ops.iter().filter(|e| e.outcome != Outcome::Unknown).count();
    let words = n.div_ceil(64).max(1);
    let mut done = vec![0u64; words];
    let is_done = |done: &[u64], i: usize| done[i / 64] & (1 << (i % 64)) != 0;
    let mut memo: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut best: Option<(Vec<usize>, usize)> = None;
    let mut state: State = None;
    let mut entry = nodes[0].next;
    let mut steps = 0u64;
    while remaining > 0 {
        steps += 1;
        if steps > MAX_STEPS {
            return Err(Violation::TooBig { steps });
        }
        assert_ne!(
            entry, NIL,
            "a completed operation is left, so is its return"
        );
        let node = &nodes[entry];
        let op = node.op;
        if node.is_call {
            let allowed = class_prev[op].is_none_or(|p| is_done(&done, p));
            let next_state = if allowed {
                step(state, canon(ops[op].op), ops[op].outcome)
            } else {
                None
            };
            if let Some(next_state) = next_state {
                done[op / 64] |= 1 << (op % 64);
                if memo.insert((done.clone(), next_state)) {
                    stack.push((entry, state));
                    state = next_state;
                    let ret = nodes[entry].ret;
                    unlink(&mut nodes, entry);
                    if ret != NIL {
                        unlink(&mut nodes, ret);
                        remaining -= 1;
                    }
                    entry = nodes[0].next;
                    continue;
                }
                done[op / 64] &= !(1 << (op % 64));
            }
            entry = nodes[entry].next;
        } else {
            // The earliest pending return: its operation must come first.
            if best.as_ref().is_none_or(|(p, _)| stack.len() > p.len()) {
                let prefix = stack.iter().map(|&(c, _)| ops[nodes[c].op].id).collect();
                best = Some((prefix, ops[op].id));
            }
            let Some((call, before)) = stack.pop() else {
                let (prefix, stuck) = best.unwrap_or_default();
                return Err(Violation::NotLinearizable { prefix, stuck });
            };
            let undone = nodes[call].op;
            done[undone / 64] &= !(1 << (undone % 64));
            state = before;
            let ret = nodes[call].ret;
            if ret != NIL {
                relink(&mut nodes, ret);
                remaining += 1;
            }
            relink(&mut nodes, call);
            entry = nodes[call].next;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(id: usize, op: Op, outcome: Outcome, call: u64, ret: u64) -> Entry {
        Entry {
            id,
            op,
            outcome,
            call,
            ret,
        }
    }
    use Op::*;
    use Outcome::{NotFound, Ok as Acked, Unknown};

    #[test]
    fn a_linearizable_history_passes() {
        let h = [
            e(1, Put(7), Acked, 0, 10),
            // Concurrent with the put: may see it.
            e(2, Read(Some(7)), Acked, 5, 15),
            e(3, Del, Acked, 20, 30),
            e(4, Read(None), Acked, 31, 40),
            e(5, Del, NotFound, 41, 50),
            e(6, Put(9), Acked, 51, 55),
            // Concurrent put and unregister: the read says the put came last.
            e(7, Put(8), Acked, 60, 70),
            e(8, Del, Acked, 61, 71),
            e(9, Read(Some(8)), Acked, 80, 90),
        ];
        assert_eq!(check(&h), Ok(()));
    }

    #[test]
    fn an_acknowledged_register_a_later_read_misses_fails() {
        let h = [e(1, Put(7), Acked, 0, 10), e(2, Read(None), Acked, 20, 30)];
        assert_eq!(
            check(&h),
            Err(Violation::NotLinearizable {
                prefix: vec![1],
                stuck: 2
            })
        );
    }

    #[test]
    fn stale_reads_and_wrong_404s_fail() {
        let stale = [
            e(1, Put(7), Acked, 0, 1),
            e(2, Put(8), Acked, 2, 3),
            e(3, Read(Some(7)), Acked, 4, 5),
        ];
        assert!(check(&stale).is_err());
        let wrong_404 = [e(1, Put(7), Acked, 0, 1), e(2, Del, NotFound, 2, 3)];
        assert!(check(&wrong_404).is_err());
        let del_of_absent = [e(1, Del, Acked, 0, 1)];
        assert!(check(&del_of_absent).is_err());
        // Present again after an acknowledged unregister, with no register since.
        let resurrected = [
            e(1, Put(7), Acked, 0, 1),
            e(2, Del, Acked, 2, 3),
            e(3, Read(Some(7)), Acked, 4, 5),
        ];
        assert!(check(&resurrected).is_err());
    }

    #[test]
    fn unknown_outcomes_may_happen_late_or_never_but_not_early() {
        let late = [
            e(1, Put(7), Unknown, 0, 0),
            e(2, Read(None), Acked, 5, 6),
            e(3, Read(Some(7)), Acked, 10, 11),
        ];
        assert_eq!(check(&late), Ok(()));
        let never = [e(1, Put(7), Unknown, 0, 0), e(2, Read(None), Acked, 5, 6)];
        assert_eq!(check(&never), Ok(()));
        let early = [
            e(1, Read(Some(7)), Acked, 0, 1),
            e(2, Put(7), Unknown, 5, 0),
        ];
        assert!(check(&early).is_err());
        // Taking effect once does not mean taking effect twice.
        let twice = [
            e(1, Put(7), Unknown, 0, 0),
            e(2, Read(Some(7)), Acked, 5, 6),
            e(3, Del, Acked, 7, 8),
            e(4, Read(Some(7)), Acked, 9, 10),
        ];
        assert!(check(&twice).is_err());
        // An unknown unregister explains an absence.
        let gone = [
            e(1, Put(7), Acked, 0, 1),
            e(2, Del, Unknown, 2, 0),
            e(3, Read(None), Acked, 5, 6),
        ];
        assert_eq!(check(&gone), Ok(()));
    }

    #[test]
    fn many_unknown_outcomes_stay_fast() {
        // 400 operations, a quarter of them unknown, all overlapping a little.
        let mut h = Vec::new();
        for i in 0..400u64 {
            let (op, outcome) = match i % 8 {
                0 | 4 => (Put(1000 + i as u32), Unknown),
                2 => (Del, Unknown),
                1 | 5 => (Put(1000 + i as u32), Acked),
                3 => (Read(Some(1000 + i as u32 - 2)), Acked),
                _ => (Del, NotFound),
            };
            h.push(e(i as usize, op, outcome, i * 10, i * 10 + 25));
        }
        let started = std::time::Instant::now();
        let verdict = check(&h);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(
            !matches!(verdict, Err(Violation::TooBig { .. })),
            "{verdict:?}"
        );
    }
}
