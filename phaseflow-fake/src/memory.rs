//! [`MemoryStore`]: the [`Store`] contract kept in memory, for tests and examples.
//!
//! One mutex guards every table, and each command runs entirely under it — the in-memory
//! counterpart of `PgStore`'s one transaction per command with the run row locked first.
//! Like `PgStore`, a command loads a [`Snapshot`] of exactly what its [`Needs`] name, runs the
//! shared rules of [`phaseflow::store::rules`] on it and, only when they succeed, persists the
//! [`Changes`] they return; a refused command writes nothing, exactly as a rolled-back
//! transaction. The conformance suite in [`crate::conformance`] holds both stores to the same
//! outputs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use phaseflow::error::{Error, Result};
use phaseflow::event::Event;
use phaseflow::ids::{ApprovalId, PhaseKey, RoleKey, RunId, SessionId};
use phaseflow::store::rules::{
    self, Applied, Changes, Needs, Snapshot, Target, phase_not_found, run_not_found,
};
use phaseflow::store::{
    ApprovalRecord, ArtifactRecord, BeginAttempt, BeginOutcome, Decide, FinishPhase, Finished,
    MarkBusy, NewRun, OperatorAction, PhaseRecord, PhaseWork, RecordPrompt, RecordVerdict,
    RunRecord, SessionEvent, SessionRecord, Store, TranscriptChunk,
};
use time::OffsetDateTime;

/// A [`Store`] that keeps everything in memory behind one mutex.
///
/// It follows the same contract as the PostgreSQL store (the conformance suite runs against
/// both) and counts the commands that wrote something, so tests can hold the engine to its
/// commit budget:
///
/// ```
/// use phaseflow::ids::{PhaseKey, RunId};
/// use phaseflow::state::RunState;
/// use phaseflow::store::{NewRun, Store};
/// use phaseflow_fake::memory::MemoryStore;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let store = MemoryStore::new();
/// let new = NewRun {
///     id: RunId::new(),
///     workflow: "feature".into(),
///     subject: "TICKET-42".into(),
///     worktree: "/work/tree".into(),
///     phases: vec![PhaseKey::new("plan")],
/// };
/// let run = store.create_run(new.clone()).await?;
/// assert_eq!(run.state, RunState::Planning);
/// store.create_run(new).await?; // a replay writes nothing
/// assert_eq!(store.commands(), 1);
/// # Ok::<_, phaseflow::Error>(()) }).unwrap();
/// ```
#[derive(Default)]
pub struct MemoryStore {
    tables: Mutex<Tables>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many commands wrote something (replays and refused commands do not count).
    pub fn commands(&self) -> u64 {
        self.lock().commands
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        // A command mutates the tables only in `Tables::persist`, which cannot fail half-way,
        // so the state behind a poisoned lock is still consistent.
        self.tables.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one command atomically: `command` decides on a snapshot of what `needs` names; its
    /// changes are persisted only if it returns `Ok`.
    fn write<T>(
        &self,
        target: Target,
        needs: Needs,
        command: impl FnOnce(Snapshot) -> Result<Applied<T>>,
    ) -> Result<T> {
        let mut guard = self.lock();
        let tables = &mut *guard;
        let run = tables.locate(target)?;
        let snapshot = tables.snapshot(run, &needs)?;
        let applied = command(snapshot)?;
        if let Some(changes) = applied.changes {
            tables.persist(run, changes);
        }
        Ok(applied.output)
    }

    /// Reads one run's tables.
    fn read<T>(&self, run: RunId, query: impl FnOnce(&RunTables) -> Result<T>) -> Result<T> {
        let tables = self.lock();
        let stored = tables.runs.get(&run).ok_or_else(|| run_not_found(run))?;
        query(stored)
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tables = self.lock();
        f.debug_struct("MemoryStore")
            .field("runs", &tables.runs.len())
            .field("commands", &tables.commands)
            .finish()
    }
}

/// Every table.
#[derive(Debug, Default)]
struct Tables {
    runs: HashMap<RunId, RunTables>,
    /// Which run a session belongs to (session ids are unique across runs).
    session_runs: HashMap<SessionId, RunId>,
    /// Which run an approval request belongs to.
    approval_runs: HashMap<ApprovalId, RunId>,
    commands: u64,
}

impl Tables {
    fn locate(&self, target: Target) -> Result<RunId> {
        let found = match target {
            Target::Run(run) => Some(run),
            Target::Session(session) => self.session_runs.get(&session).copied(),
            Target::Approval(request) => self.approval_runs.get(&request).copied(),
        };
        found.ok_or_else(|| target.not_found())
    }

    /// What a command with these needs sees of the run.
    fn snapshot(&self, run: RunId, needs: &Needs) -> Result<Snapshot> {
        let stored = self.runs.get(&run).ok_or_else(|| run_not_found(run))?;
        let chunks = match &needs.chunks {
            Some((session, seqs)) => {
                let texts = stored.transcripts.get(session);
                seqs.iter()
                    .filter_map(|seq| {
                        let text = texts?.get(seq)?;
                        Some((
                            *session,
                            TranscriptChunk {
                                seq: *seq,
                                text: text.clone(),
                            },
                        ))
                    })
                    .collect()
            }
            None => Vec::new(),
        };
        Ok(Snapshot {
            now: OffsetDateTime::now_utc(),
            run: stored.run.clone(),
            phases: stored.phases.clone(),
            sessions: stored.sessions.clone(),
            approvals: if needs.approvals {
                stored.approvals.clone()
            } else {
                Vec::new()
            },
            event_keys: needs
                .event_keys
                .iter()
                .map(|key| (key.clone(), stored.event_keys.contains(key)))
                .collect(),
            artifact: needs.artifact.as_ref().and_then(|(path, hash)| {
                stored
                    .artifacts
                    .iter()
                    .find(|artifact| &artifact.path == path && &artifact.hash == hash)
                    .cloned()
            }),
            session_recorded: needs
                .session
                .is_some_and(|session| self.session_runs.contains_key(&session)),
            chunks,
        })
    }

    /// Writes a command's changes; counts the command when it wrote anything (a replay whose
    /// events are all recorded already writes nothing).
    fn persist(&mut self, run: RunId, changes: Changes) {
        let Some(stored) = self.runs.get_mut(&run) else {
            return;
        };
        let changes_rows = changes.changes_rows();
        stored.run = changes.run;
        for phase in changes.phases {
            if let Some(row) = stored.phases.iter_mut().find(|row| row.key == phase.key) {
                *row = phase;
            }
        }
        for session in changes.sessions {
            self.session_runs.insert(session.id, run);
            upsert(&mut stored.sessions, session, |row| row.id);
        }
        for approval in changes.approvals {
            self.approval_runs.insert(approval.id, run);
            upsert(&mut stored.approvals, approval, |row| row.id);
        }
        let mut inserted = false;
        for (key, kind) in changes.events {
            if !stored.event_keys.insert(key.clone()) {
                continue;
            }
            inserted = true;
            let seq = stored.events.len() as u64 + 1;
            stored.events.push(Event {
                seq,
                run,
                at: changes.at,
                key,
                kind,
            });
        }
        for artifact in changes.artifacts {
            let known = stored
                .artifacts
                .iter()
                .any(|row| row.path == artifact.path && row.hash == artifact.hash);
            if !known {
                stored.artifacts.push(artifact);
            }
        }
        for (session, chunk) in changes.chunks {
            stored
                .transcripts
                .entry(session)
                .or_default()
                .entry(chunk.seq)
                .or_insert(chunk.text);
        }
        if changes_rows || inserted {
            self.commands += 1;
        }
    }
}

/// Replaces the row with the same id, or appends a new one.
fn upsert<T, K: PartialEq>(rows: &mut Vec<T>, row: T, id: impl Fn(&T) -> K) {
    match rows.iter_mut().find(|stored| id(stored) == id(&row)) {
        Some(stored) => *stored = row,
        None => rows.push(row),
    }
}

/// One run and everything recorded about it.
#[derive(Debug)]
struct RunTables {
    run: RunRecord,
    phases: Vec<PhaseRecord>,
    sessions: Vec<SessionRecord>,
    approvals: Vec<ApprovalRecord>,
    events: Vec<Event>,
    event_keys: HashSet<String>,
    artifacts: Vec<ArtifactRecord>,
    transcripts: HashMap<SessionId, BTreeMap<u64, String>>,
}

#[async_trait]
impl Store for MemoryStore {
    async fn create_run(&self, new: NewRun) -> Result<RunRecord> {
        let created = rules::create_run(&new, OffsetDateTime::now_utc())?;
        let mut tables = self.lock();
        if let Some(stored) = tables.runs.get(&new.id) {
            let keys: Vec<PhaseKey> = stored.phases.iter().map(|p| p.key.clone()).collect();
            return rules::create_run_replay(&new, stored.run.clone(), &keys);
        }
        let run = created.run;
        let (key, kind) = created.event;
        let stored = RunTables {
            run: run.clone(),
            phases: created.phases,
            sessions: Vec::new(),
            approvals: Vec::new(),
            events: vec![Event {
                seq: 1,
                run: run.id,
                at: run.created_at,
                key: key.clone(),
                kind,
            }],
            event_keys: HashSet::from([key]),
            artifacts: Vec::new(),
            transcripts: HashMap::new(),
        };
        tables.runs.insert(run.id, stored);
        tables.commands += 1;
        Ok(run)
    }

    async fn begin_attempt(&self, cmd: BeginAttempt) -> Result<BeginOutcome> {
        let needs = Needs::begin_attempt(&cmd);
        self.write(Target::Run(cmd.work.run), needs, |snapshot| {
            rules::begin_attempt(snapshot, cmd)
        })
    }

    async fn claim_phase(&self, work: PhaseWork) -> Result<PhaseRecord> {
        self.write(Target::Run(work.run), Needs::default(), |snapshot| {
            rules::claim_phase(snapshot, work)
        })
    }

    async fn mark_busy(&self, cmd: MarkBusy) -> Result<SessionRecord> {
        let needs = Needs::mark_busy(&cmd);
        self.write(Target::Run(cmd.work.run), needs, |snapshot| {
            rules::mark_busy(snapshot, cmd)
        })
    }

    async fn record_prompt(&self, cmd: RecordPrompt) -> Result<()> {
        self.write(Target::Run(cmd.work.run), Needs::default(), |snapshot| {
            rules::record_prompt(snapshot, cmd)
        })
    }

    async fn record_session_event(
        &self,
        work: PhaseWork,
        session: SessionId,
        event: SessionEvent,
    ) -> Result<SessionRecord> {
        let needs = Needs::session_event(&work, &event);
        self.write(Target::Run(work.run), needs, |snapshot| {
            rules::record_session_event(snapshot, work, session, event)
        })
    }

    async fn record_verdict(&self, cmd: RecordVerdict) -> Result<ArtifactRecord> {
        let needs = Needs::record_verdict(&cmd);
        self.write(Target::Run(cmd.work.run), needs, |snapshot| {
            rules::record_verdict(snapshot, cmd)
        })
    }

    async fn finish_phase(&self, cmd: FinishPhase) -> Result<Finished> {
        let needs = Needs::finish_phase(&cmd);
        self.write(Target::Run(cmd.work.run), needs, |snapshot| {
            rules::finish_phase(snapshot, cmd)
        })
    }

    async fn decide(&self, cmd: Decide) -> Result<Finished> {
        let needs = Needs::decide(&cmd);
        self.write(Target::Approval(cmd.request), needs, |snapshot| {
            rules::decide(snapshot, cmd)
        })
    }

    async fn operate(&self, run: RunId, action: OperatorAction) -> Result<Finished> {
        self.write(Target::Run(run), Needs::default(), |snapshot| {
            rules::operate(snapshot, action)
        })
    }

    async fn append_transcript(
        &self,
        session: SessionId,
        chunks: Vec<TranscriptChunk>,
    ) -> Result<()> {
        let needs = Needs::append_transcript(session, &chunks);
        self.write(Target::Session(session), needs, |snapshot| {
            rules::append_transcript(snapshot, session, chunks)
        })
    }

    async fn run(&self, run: RunId) -> Result<RunRecord> {
        self.read(run, |stored| Ok(stored.run.clone()))
    }

    async fn phases(&self, run: RunId) -> Result<Vec<PhaseRecord>> {
        self.read(run, |stored| Ok(stored.phases.clone()))
    }

    async fn session(&self, run: RunId, role: &RoleKey) -> Result<Option<SessionRecord>> {
        self.read(run, |stored| {
            Ok(stored
                .sessions
                .iter()
                .find(|session| &session.role == role)
                .cloned())
        })
    }

    async fn sessions(&self, run: RunId) -> Result<Vec<SessionRecord>> {
        self.read(run, |stored| Ok(stored.sessions.clone()))
    }

    async fn events(&self, run: RunId, after: u64) -> Result<Vec<Event>> {
        self.read(run, |stored| {
            let skip = usize::try_from(after).unwrap_or(usize::MAX);
            Ok(stored.events.iter().skip(skip).cloned().collect())
        })
    }

    async fn approvals(&self, run: RunId) -> Result<Vec<ApprovalRecord>> {
        self.read(run, |stored| Ok(stored.approvals.clone()))
    }

    async fn approval(&self, id: ApprovalId) -> Result<ApprovalRecord> {
        let tables = self.lock();
        let run = tables.locate(Target::Approval(id))?;
        tables
            .runs
            .get(&run)
            .and_then(|stored| stored.approvals.iter().find(|a| a.id == id))
            .cloned()
            .ok_or_else(|| {
                Error::corruption(format!("approval request {id} is indexed but missing"))
            })
    }

    async fn latest_artifact(
        &self,
        run: RunId,
        phase: &PhaseKey,
    ) -> Result<Option<ArtifactRecord>> {
        self.read(run, |stored| {
            if !stored.phases.iter().any(|p| &p.key == phase) {
                return Err(phase_not_found(run, phase));
            }
            Ok(stored
                .artifacts
                .iter()
                .rev()
                .find(|artifact| &artifact.phase == phase)
                .cloned())
        })
    }

    async fn transcript(&self, session: SessionId) -> Result<Vec<TranscriptChunk>> {
        let tables = self.lock();
        let run = tables.locate(Target::Session(session))?;
        Ok(tables
            .runs
            .get(&run)
            .and_then(|stored| stored.transcripts.get(&session))
            .map(|texts| {
                texts
                    .iter()
                    .map(|(seq, text)| TranscriptChunk {
                        seq: *seq,
                        text: text.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}
