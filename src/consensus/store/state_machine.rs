//! The state machine: the registry persisted key by key in the `sm` tree,
//! applied in batches (one sled batch per `apply` call), the audit records,
//! and the registry every task reads (`watch<Applied>`).

use super::*;

/// The applied registry as of a log index, published after every change.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// Index of the last applied log entry; 0 when none.
    pub index: u64,
    pub registry: Arc<Registry>,
    /// Proposals this process applied (a batch entry holds many, a restore
    /// counts its members); for compaction, which openraft counts in entries.
    pub proposals: u64,
}

/// In-memory mirror of the state machine tree.
pub(super) struct SmState {
    /// The tree (see [`SM_TREE_KEY`]).
    pub(super) tree: sled::Tree,
    /// With the backup being staged, if any, in `registry.restoring`.
    pub(super) registry: Registry,
    /// Prefix of the live registry keys in `tree` (see [`PREFIX_KEY`]).
    pub(super) prefix: String,
    pub(super) last_applied: Option<LogId>,
    pub(super) last_membership: Membership,
    /// Audit records in the tree.
    pub(super) audit_len: usize,
    /// See [`Applied::proposals`].
    pub(super) proposals: u64,
}

/// The snapshot data: the whole state machine.
#[derive(Serialize, Deserialize)]
pub(super) struct SnapshotState {
    pub(super) last_applied: Option<LogId>,
    pub(super) last_membership: Membership,
    pub(super) registry: Registry,
    /// The audit history up to `last_applied`, oldest first.
    #[serde(default)]
    pub(super) audit: Vec<AuditEntry>,
    /// The backup being staged (`registry` leaves it out).
    #[serde(default)]
    pub(super) restore: Option<StagedRestore>,
}

/// The registry state machine. Clones share state, so a clone serves as the
/// snapshot builder.
#[derive(Clone)]
pub struct StateMachine {
    pub(super) state: Arc<Mutex<SmState>>,
    pub(super) db: sled::Db,
    /// Holds the snapshot id counter.
    pub(super) snapshot: sled::Tree,
    /// Serializes the snapshot id counter.
    pub(super) snapshot_lock: Arc<Mutex<()>>,
    pub(super) files: Arc<SnapshotFiles>,
    pub(super) applied_tx: Arc<watch::Sender<Arc<Applied>>>,
}

/// Service definitions and members are JSON so that fields added later with
/// `#[serde(default)]` still decode from older data.
pub(super) fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(v)
}

pub(super) fn decode_err(what: &[u8], reason: impl ToString) -> StoreError {
    StoreError::Decode {
        what: format!("sm key {}", String::from_utf8_lossy(what)),
        reason: reason.to_string(),
    }
}

/// Registry keys read from a tree (without their prefix), then assembled.
#[derive(Default)]
pub(super) struct RegistryKeys {
    pub(super) defs: BTreeMap<String, ServiceDef>,
    pub(super) members: Vec<(String, String, Member)>,
    pub(super) tokens: BTreeMap<String, Token>,
}

impl RegistryKeys {
    /// Takes `rest` (a key less its prefix) if it is a registry key.
    fn add(&mut self, key: &[u8], rest: &str, value: &[u8]) -> Result<bool, StoreError> {
        if let Some(service) = rest.strip_prefix("s/") {
            let def = serde_json::from_slice(value).map_err(|e| decode_err(key, e))?;
            self.defs.insert(service.to_owned(), def);
        } else if let Some(rest) = rest.strip_prefix("m/") {
            let (service, member) = rest
                .split_once('/')
                .ok_or_else(|| decode_err(key, "member key without service"))?;
            let m = serde_json::from_slice(value).map_err(|e| decode_err(key, e))?;
            self.members
                .push((service.to_owned(), member.to_owned(), m));
        } else if let Some(id) = rest.strip_prefix("t/") {
            let t = serde_json::from_slice(value).map_err(|e| decode_err(key, e))?;
            self.tokens.insert(id.to_owned(), t);
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    fn build(self) -> Result<Registry, StoreError> {
        let mut services: BTreeMap<String, Service> = self
            .defs
            .into_iter()
            .map(|(name, def)| {
                let svc = Service {
                    def,
                    members: Members::new(),
                };
                (name, svc)
            })
            .collect();
        for (service, member, m) in self.members {
            let svc = services
                .get_mut(&service)
                .ok_or_else(|| StoreError::Decode {
                    what: format!("member {member}"),
                    reason: format!("its service {service} is not stored"),
                })?;
            svc.members.insert(member, m);
        }
        Ok(Registry {
            services: services
                .into_iter()
                .map(|(name, svc)| (name, Arc::new(svc)))
                .collect(),
            tokens: self.tokens,
            restoring: None,
        })
    }
}

/// `r/{id:016x}/` of a staged or committed backup's key, with the rest.
pub(super) fn split_stage_key(text: &str) -> Option<(&str, &str)> {
    let len = "r/".len() + 16 + 1;
    let prefix = text.get(..len)?;
    (prefix.starts_with("r/") && prefix.ends_with('/')).then(|| (prefix, &text[len..]))
}

/// Rebuilds the state from the state machine tree. Also returns the prefixes
/// of staged backups nothing refers to any more (see [`remove_prefix`]).
pub(super) fn load_state(tree: sled::Tree) -> Result<(SmState, BTreeSet<String>), StoreError> {
    let read = |key: &[u8]| {
        tree.get(key).map_err(|source| StoreError::Read {
            what: String::from_utf8_lossy(key).into_owned(),
            source,
        })
    };
    let prefix = read(PREFIX_KEY)?
        .map(|raw| String::from_utf8_lossy(&raw).into_owned())
        .unwrap_or_default();
    let staged_marker: Option<(u64, u32)> = read(RESTORE_KEY)?
        .map(|raw| unbin(&raw).map_err(|e| decode_err(RESTORE_KEY, e)))
        .transpose()?;
    let staged_prefix = staged_marker.map(|(id, _)| stage_prefix(id));
    let mut live = RegistryKeys::default();
    let mut staged = RegistryKeys::default();
    let mut garbage = BTreeSet::new();
    let mut last_applied = None;
    let mut last_membership = Membership::default();
    let mut audit_len = 0;
    for item in tree.iter() {
        let (key, value) = item.map_err(|source| StoreError::Read {
            what: "state machine".into(),
            source,
        })?;
        let text = std::str::from_utf8(&key).map_err(|e| decode_err(&key, e))?;
        let known = if text.starts_with("a/") {
            // Audit history: read on demand by read_audit.
            audit_len += 1;
            true
        } else if *key == *APPLIED_KEY {
            last_applied = unbin(&value).map_err(|e| decode_err(&key, e))?;
            true
        } else if *key == *MEMBERSHIP_KEY {
            last_membership = unbin(&value).map_err(|e| decode_err(&key, e))?;
            true
        } else if *key == *PREFIX_KEY || *key == *RESTORE_KEY {
            true
        } else if let Some((at, rest)) = split_stage_key(text) {
            if at == prefix {
                live.add(&key, rest, &value)?
            } else if staged_prefix.as_deref() == Some(at) {
                staged.add(&key, rest, &value)?
            } else {
                garbage.insert(at.to_owned());
                true
            }
        } else if prefix.is_empty() {
            live.add(&key, text, &value)?
        } else {
            false
        };
        if !known {
            tracing::warn!(key = text, "ignoring unknown state machine key");
        }
    }
    let mut registry = live.build()?;
    if let Some((id, parts)) = staged_marker {
        registry.restoring = Some(Arc::new(StagedRestore {
            id,
            parts,
            registry: staged.build()?,
        }));
    }
    let state = SmState {
        tree,
        registry,
        prefix,
        last_applied,
        last_membership,
        audit_len,
        proposals: 0,
    };
    Ok((state, garbage))
}

/// Removes every key under `prefix`, in batches of [`Chunked::KEYS`]: for
/// the keys of a staged backup that was dropped or replaced. Nothing reads
/// them, so this need not be atomic; a start finishes what a crash cut short.
pub(super) fn remove_prefix(tree: &sled::Tree, prefix: &str) -> Result<(), sled::Error> {
    loop {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for key in tree.scan_prefix(prefix).keys().take(Chunked::KEYS) {
            batch.remove(key?);
            n += 1;
        }
        if n == 0 {
            return Ok(());
        }
        tree.apply_batch(batch)?;
    }
}

/// The id of the last backup `cmd` committed, given its response.
pub(super) fn committed_restore(cmd: &Command, response: &Response) -> Option<u64> {
    match (cmd, response) {
        (Command::RestoreCommit { id, .. }, Response::Done) => Some(*id),
        (Command::Batch(proposals), Response::Batch(each)) => proposals
            .iter()
            .zip(each)
            .rev()
            .find_map(|(p, r)| committed_restore(&p.cmd, r)),
        _ => None,
    }
}

/// Staged parts are not worth an audit record each: the commit has one.
pub(super) fn audited(cmd: &Command) -> bool {
    !matches!(cmd, Command::RestoreChunk { .. })
}

/// Adds to `batch` the writes that turn the stored `old` registry keys under
/// `prefix` into `new` ones, for the keys touched.
pub(super) fn diff_into_batch(
    batch: &mut sled::Batch,
    tree: &sled::Tree,
    prefix: &str,
    old: &Registry,
    new: &Registry,
    touched: &Touched,
) -> Result<(), StorageError> {
    let Touched {
        services,
        members,
        tokens,
    } = touched;
    for id in tokens {
        let key = token_key(prefix, id);
        match new.tokens.get(id) {
            Some(t) if old.tokens.get(id) != Some(t) => {
                batch.insert(key.as_bytes(), json(t).map_err(write_sm_err)?)
            }
            Some(_) => {}
            None => batch.remove(key.as_bytes()),
        }
    }
    for service in services {
        let before = old.services.get(service).map(|s| &s.def);
        let after = new.services.get(service).map(|s| &s.def);
        if before == after {
            continue;
        }
        match after {
            Some(def) => batch.insert(
                service_key(prefix, service).as_bytes(),
                json(def).map_err(write_sm_err)?,
            ),
            None => {
                // A service gone takes its members with it.
                batch.remove(service_key(prefix, service).as_bytes());
                for item in tree.scan_prefix(member_prefix(prefix, service)) {
                    let (key, _) = item.map_err(read_sm_err)?;
                    batch.remove(key);
                }
            }
        }
    }
    for (service, member) in members {
        let before = old.member(service, member);
        let after = new.member(service, member);
        if before == after {
            continue;
        }
        let key = member_key(prefix, service, member);
        match after {
            Some(m) => batch.insert(key.as_bytes(), json(m).map_err(write_sm_err)?),
            None => batch.remove(key.as_bytes()),
        }
    }
    Ok(())
}

/// Writes to a tree in batches of [`Chunked::KEYS`] keys: for a tree
/// that is not live yet, where the whole need not be atomic.
pub(super) struct Chunked<'a> {
    pub(super) tree: &'a sled::Tree,
    pub(super) batch: sled::Batch,
    pub(super) keys: usize,
}

impl<'a> Chunked<'a> {
    const KEYS: usize = 2_000;

    fn new(tree: &'a sled::Tree) -> Self {
        Self {
            tree,
            batch: sled::Batch::default(),
            keys: 0,
        }
    }

    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), StorageError> {
        self.batch.insert(key, value);
        self.keys += 1;
        if self.keys >= Self::KEYS {
            self.finish()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), StorageError> {
        let batch = std::mem::take(&mut self.batch);
        self.keys = 0;
        self.tree.apply_batch(batch).map_err(write_sm_err)
    }
}

/// Writes the full registry under `prefix`.
pub(super) fn registry_into(
    out: &mut Chunked<'_>,
    prefix: &str,
    registry: &Registry,
) -> Result<(), StorageError> {
    for (id, t) in &registry.tokens {
        out.insert(
            token_key(prefix, id).into_bytes(),
            json(t).map_err(write_sm_err)?,
        )?;
    }
    for (name, svc) in &registry.services {
        out.insert(
            service_key(prefix, name).into_bytes(),
            json(&svc.def).map_err(write_sm_err)?,
        )?;
        for (member, m) in &svc.members {
            out.insert(
                member_key(prefix, name, member).into_bytes(),
                json(m).map_err(write_sm_err)?,
            )?;
        }
    }
    Ok(())
}

pub(super) fn applied_of(state: &SmState) -> Arc<Applied> {
    Arc::new(Applied {
        index: state.last_applied.map(|l| l.index).unwrap_or(0),
        registry: Arc::new(state.registry.clone()),
        proposals: state.proposals,
    })
}

/// Entries applied in memory and not yet written: one sled batch.
pub(super) struct Pending {
    pub(super) registry: Registry,
    pub(super) last_applied: Option<LogId>,
    pub(super) last_membership: Membership,
    pub(super) touched: Touched,
    pub(super) staged: Touched,
    /// The last backup committed, if any.
    pub(super) committed: Option<u64>,
    /// (key, record) of every command that changed something.
    pub(super) audit: Vec<(String, AuditEntry)>,
    pub(super) proposals: u64,
    pub(super) entries: usize,
}

impl Pending {
    fn new(st: &SmState) -> Self {
        Self {
            registry: st.registry.clone(),
            last_applied: st.last_applied,
            last_membership: st.last_membership.clone(),
            touched: Touched::default(),
            staged: Touched::default(),
            committed: None,
            audit: Vec::new(),
            proposals: 0,
            entries: 0,
        }
    }

    /// Keys this batch will write, about.
    fn keys(&self) -> usize {
        let Touched {
            services,
            members,
            tokens,
        } = &self.touched;
        let staged = &self.staged;
        services.len()
            + members.len()
            + tokens.len()
            + staged.services.len()
            + staged.members.len()
            + staged.tokens.len()
            + self.audit.len()
    }

    fn apply(&mut self, entry: Entry<TypeConfig>) -> Response {
        self.entries += 1;
        self.last_applied = Some(entry.log_id);
        let index = entry.log_id.index;
        match entry.payload {
            EntryPayload::Blank => Response::Done,
            EntryPayload::Normal(proposal) => {
                self.proposals += match &proposal.cmd {
                    Command::Batch(each) => each.len() as u64,
                    _ => 1,
                };
                proposal.cmd.touches(&mut self.touched, &mut self.staged);
                let response = self.registry.apply(&proposal.cmd);
                if let Some(id) = committed_restore(&proposal.cmd, &response) {
                    self.committed = Some(id);
                    // A restore is as much change as its members registering.
                    self.proposals += self.registry.member_count() as u64;
                }
                match (&proposal.cmd, &response) {
                    (Command::Batch(proposals), Response::Batch(each)) => {
                        let done = proposals
                            .iter()
                            .zip(each)
                            .filter(|(p, r)| **r == Response::Done && audited(&p.cmd));
                        for (n, (p, _)) in done.enumerate() {
                            self.audit.push((audit_key(index, n), p.audit(index)));
                        }
                    }
                    (cmd, Response::Done) if audited(cmd) => self
                        .audit
                        .push((audit_key(index, 0), proposal.audit(index))),
                    _ => {}
                }
                response
            }
            EntryPayload::Membership(m) => {
                self.last_membership = StoredMembership::new(Some(entry.log_id), m);
                Response::Done
            }
        }
    }
}

/// Writes `p` in one sled batch and makes it the state.
///
/// No flush here. Every entry applied was committed, so it is in the
/// flushed log of a quorum including, for a leader, this node (a follower
/// learns of a commit only for entries it has flushed too). After a crash,
/// openraft starts from the `applied` id stored in this tree and re-applies
/// the log after it; a lost unflushed apply is simply applied again (sled
/// recovers a prefix of its writes, and each batch is atomic and carries
/// its own `applied` id, so the tree is never half-applied). The log is
/// purged only up to a snapshot, and a snapshot is flushed before openraft
/// learns of it (build_snapshot, install_snapshot), so the entries a lost
/// apply needs are still in the log.
pub(super) fn persist(st: &mut SmState, p: Pending) -> Result<(), StorageError> {
    let Pending {
        registry,
        last_applied,
        last_membership,
        mut touched,
        staged,
        committed,
        audit,
        proposals,
        entries: _,
    } = p;
    let mut batch = sled::Batch::default();
    let before = st.registry.restoring.clone();
    let after = registry.restoring.clone();
    let empty = Registry::default();
    // What backup `id` had staged before this batch, if it is that backup.
    let staged_before = |id: u64| {
        before
            .as_deref()
            .filter(|b| b.id == id)
            .map_or(&empty, |b| &b.registry)
    };
    let prefix = match committed {
        // The backup goes live in this one batch: its keys were staged under
        // its own prefix, which becomes the registry's.
        Some(id) => {
            let prefix = stage_prefix(id);
            // The registry it replaced was empty at that point; only tokens
            // created and revoked within this batch can still be stored.
            let mut all = Touched::default();
            all.registry(&st.registry);
            diff_into_batch(&mut batch, &st.tree, &st.prefix, &st.registry, &empty, &all)?;
            touched.extend(staged);
            diff_into_batch(
                &mut batch,
                &st.tree,
                &prefix,
                staged_before(id),
                &registry,
                &touched,
            )?;
            batch.insert(PREFIX_KEY, prefix.as_bytes());
            prefix
        }
        None => {
            diff_into_batch(
                &mut batch,
                &st.tree,
                &st.prefix,
                &st.registry,
                &registry,
                &touched,
            )?;
            if let Some(s) = &after {
                diff_into_batch(
                    &mut batch,
                    &st.tree,
                    &stage_prefix(s.id),
                    staged_before(s.id),
                    &s.registry,
                    &staged,
                )?;
            }
            st.prefix.clone()
        }
    };
    let marker = |r: &Option<Arc<StagedRestore>>| r.as_deref().map(|s| (s.id, s.parts));
    match marker(&after) {
        Some(m) if marker(&before) != Some(m) => {
            batch.insert(RESTORE_KEY, bin(&m).map_err(write_sm_err)?)
        }
        Some(_) => {}
        None if before.is_some() => batch.remove(RESTORE_KEY),
        None => {}
    }
    // Retention keeps the newest AUDIT_KEEP records: every node applies the
    // same records in the same order, so every node drops the same ones.
    let keep = AUDIT_KEEP as usize;
    let new = &audit[audit.len().saturating_sub(keep)..];
    let excess = (st.audit_len + new.len()).saturating_sub(keep);
    for key in st.tree.scan_prefix("a/").keys().take(excess) {
        batch.remove(key.map_err(read_sm_err)?);
    }
    for (key, record) in new {
        batch.insert(key.as_bytes(), json(record).map_err(write_sm_err)?);
    }
    batch.insert(APPLIED_KEY, bin(&last_applied).map_err(write_sm_err)?);
    if last_membership != st.last_membership {
        batch.insert(MEMBERSHIP_KEY, bin(&last_membership).map_err(write_sm_err)?);
    }
    st.tree.apply_batch(batch).map_err(write_sm_err)?;

    // A staged backup dropped or replaced: its keys go once the batch that
    // stopped referring to them is written. Never a prefix still in use (the
    // same backup staged anew shares it).
    if let Some(b) = &before {
        let dropped = stage_prefix(b.id);
        let in_use = dropped == prefix || after.as_ref().is_some_and(|a| a.id == b.id);
        if !in_use {
            remove_prefix(&st.tree, &dropped).map_err(write_sm_err)?;
        }
    }

    st.registry = registry;
    st.prefix = prefix;
    st.last_applied = last_applied;
    st.last_membership = last_membership;
    st.audit_len = st.audit_len + new.len() - excess;
    st.proposals += proposals;
    Ok(())
}

impl StateMachine {
    pub(super) fn load(
        db: sled::Db,
        snapshot: sled::Tree,
        files: SnapshotFiles,
    ) -> Result<Self, StoreError> {
        let tree = sm_tree(&db)?;
        // An install that crashed before its switch left its tree behind.
        for name in db.tree_names() {
            if name.starts_with(b"sm-") && name != tree.name() {
                db.drop_tree(&name).map_err(|source| StoreError::Write {
                    what: "stale sm tree".into(),
                    source,
                })?;
            }
        }
        let (state, garbage) = load_state(tree)?;
        for prefix in garbage {
            remove_prefix(&state.tree, &prefix).map_err(|source| StoreError::Write {
                what: format!("dropped restore {prefix}"),
                source,
            })?;
        }
        move_snapshot_to_file(&db, &snapshot, &files)?;
        let (applied_tx, _) = watch::channel(applied_of(&state));
        Ok(Self {
            state: Arc::new(Mutex::new(state)),
            db,
            snapshot,
            snapshot_lock: Arc::new(Mutex::new(())),
            files: Arc::new(files),
            applied_tx: Arc::new(applied_tx),
        })
    }

    /// Watches the applied registry; the current value is available at once.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Applied>> {
        self.applied_tx.subscribe()
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, SmState> {
        // A panic while holding the lock leaves the state consistent: every
        // change is computed aside and swapped in after its write succeeded.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, state: &SmState) {
        self.applied_tx.send_replace(applied_of(state));
    }

    /// Stores the current snapshot's file (see [`SnapshotFiles::store`]) on
    /// the blocking pool: writing and fsyncing megabytes would hold up a
    /// runtime thread, and with it heartbeats. Gives `data` back.
    pub(super) async fn store_snapshot(
        &self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        data: Vec<u8>,
    ) -> Result<Vec<u8>, StorageError> {
        let files = self.files.clone();
        let owned = meta.clone();
        tokio::task::spawn_blocking(move || files.store(&owned, &data).map(|_| data))
            .await
            .map_err(|e| write_snapshot_err(meta, std::io::Error::other(e)))?
            .map_err(|e| write_snapshot_err(meta, e))
    }

    /// A snapshot id unique for this data dir.
    pub(super) fn next_snapshot_counter(&self) -> Result<u64, StorageError> {
        let _guard = self.snapshot_lock.lock().unwrap_or_else(|p| p.into_inner());
        let last = match self
            .snapshot
            .get(SNAP_COUNTER_KEY)
            .map_err(read_snapshot_err)?
        {
            Some(raw) => {
                let bytes: [u8; 8] = raw.as_ref().try_into().map_err(|_| {
                    read_snapshot_err(std::io::Error::other("bad snapshot counter"))
                })?;
                u64::from_be_bytes(bytes)
            }
            None => 0,
        };
        let next = last + 1;
        // Flushed with the state machine before the snapshot is used.
        self.snapshot
            .insert(SNAP_COUNTER_KEY, &next.to_be_bytes()[..])
            .map_err(read_snapshot_err)?;
        Ok(next)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        let st = self.lock();
        Ok((st.last_applied, st.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut st = self.lock();
        let mut pending = Pending::new(&st);
        let mut responses = Vec::new();
        for entry in entries {
            responses.push(pending.apply(entry));
            // Many restore parts applied at once (catching up, or after a
            // restart) would make one huge sled batch: write what is
            // pending every few thousand keys instead.
            if pending.keys() >= Chunked::KEYS {
                persist(&mut st, pending)?;
                pending = Pending::new(&st);
            }
        }
        if pending.entries > 0 {
            persist(&mut st, pending)?;
        }
        if !responses.is_empty() {
            self.publish(&st);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let blob: SnapshotState = serde_json::from_slice(&data).map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), &e))
        })?;
        // A fresh tree, written in chunks and switched to in one step: one
        // sled batch of the whole registry held 800 MiB at 100k members
        // (sled keeps every node version of a batch until it completes).
        // Random: install counters are not stored, and this must never name the live tree.
        let name = format!("sm-{:016x}", rand::random::<u64>());
        let tree = self.db.open_tree(&name).map_err(write_sm_err)?;
        tree.clear().map_err(write_sm_err)?;
        let mut out = Chunked::new(&tree);
        registry_into(&mut out, "", &blob.registry)?;
        if let Some(s) = &blob.restore {
            registry_into(&mut out, &stage_prefix(s.id), &s.registry)?;
            out.insert(
                RESTORE_KEY.to_vec(),
                bin(&(s.id, s.parts)).map_err(write_sm_err)?,
            )?;
        }
        // Records of one batch entry share an index: number them in order.
        let mut prev = None;
        let mut n = 0;
        for entry in &blob.audit {
            n = if prev == Some(entry.index) { n + 1 } else { 0 };
            prev = Some(entry.index);
            out.insert(
                audit_key(entry.index, n).into_bytes(),
                json(entry).map_err(write_sm_err)?,
            )?;
        }
        // The meta is authoritative for what the snapshot covers.
        out.insert(
            APPLIED_KEY.to_vec(),
            bin(&meta.last_log_id).map_err(write_sm_err)?,
        )?;
        out.insert(
            MEMBERSHIP_KEY.to_vec(),
            bin(&meta.last_membership).map_err(write_sm_err)?,
        )?;
        out.finish()?;
        // The new tree is durable before the switch, and the switch before
        // openraft learns the install is done.
        let flush = |e| write_snapshot_err(meta, e);
        self.db.flush_async().await.map_err(flush)?;
        self.db
            .insert(SM_TREE_KEY, name.as_bytes())
            .map_err(write_sm_err)?;
        self.db.flush_async().await.map_err(flush)?;
        let mut registry = blob.registry;
        registry.restoring = blob.restore.map(Arc::new);
        let old = {
            let mut st = self.lock();
            let proposals = st.proposals;
            let old = std::mem::replace(
                &mut *st,
                SmState {
                    tree,
                    registry,
                    prefix: String::new(),
                    last_applied: meta.last_log_id,
                    last_membership: meta.last_membership.clone(),
                    audit_len: blob.audit.len(),
                    proposals,
                },
            );
            self.publish(&st);
            old.tree
        };
        // A snapshot build may still read the old tree: it then fails, and
        // openraft builds again later.
        if let Err(e) = self.db.drop_tree(old.name()) {
            tracing::warn!(cause = %e, "could not drop the replaced state machine tree");
        }
        self.store_snapshot(meta, data).await?;
        tracing::info!(
            index = meta.last_log_id.map(|l| l.index),
            members = self.lock().registry.member_count(),
            "installed a snapshot from the leader"
        );
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let files = self.files.clone();
        let read = tokio::task::spawn_blocking(move || files.read())
            .await
            .map_err(|e| read_snapshot_err(std::io::Error::other(e)))?;
        let Some((meta, data)) = read.map_err(read_snapshot_err)? else {
            return Ok(None);
        };
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}
