//! [`MemoryStore`]: the [`Store`] contract kept in memory, for tests and examples.
//!
//! One mutex guards every table, and each command runs entirely under it — the in-memory
//! counterpart of `PgStore`'s one transaction per command with the run row locked first.
//! A command works on a private copy of the run's mutable rows and on buffers for the
//! append-only tables (events, artifacts, transcript chunks); only when it succeeds are they
//! committed, so a refused command writes nothing, exactly as a rolled-back transaction.
//!
//! Choices the [`Store`] docs leave open, made here and pinned by the conformance suite in
//! [`crate::conformance`]:
//! - every command that carries an `attempt` requires it to be the phase's current attempt
//!   (`phase_state_mismatch` otherwise), and each command accepts only the phase states it
//!   belongs to, plus the state it leaves behind so that a replay is a silent no-op;
//! - a fresh [`BeginAttempt`] only starts the run's *current* phase (a later pending phase is
//!   [`BeginOutcome::NotStartable`]);
//! - a [`FinishPhase`] whose outcome is already recorded (its `phase.completed` event, or its
//!   approval request) returns the stored outcome before any state check;
//! - [`PhaseEnd::Fail`] applies to any run that is not terminal, paused ones included;
//! - decisions that let the run continue (`approve` of a middle phase, `rework`, `retry`)
//!   append `run.resumed`; `reject` / `abort` and an operator's abort also fail the phase that
//!   was in flight (`phase.failed`), so no phase of an aborted run looks active;
//! - every transition into `CRASHED` bumps `recovery_attempts` and appends `session.crashed`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use phaseflow::error::{Error, ErrorCode, Result};
use phaseflow::event::{Decision, Event, EventKind, GateKind, PromptKind};
use phaseflow::ids::{
    ApprovalId, ArtifactId, ContentHash, DedupKey, EngineId, GateKey, PhaseKey, RoleKey, RunId,
    SessionId,
};
use phaseflow::state::{PhaseState, RunState, SessionState};
use phaseflow::store::{
    ApprovalRecord, ArtifactRecord, BeginAttempt, BeginOutcome, Decide, DecisionRecord,
    FinishPhase, Finished, MarkBusy, NewArtifact, NewRun, OperatorAction, PhaseEnd, PhaseRecord,
    PhaseWork, RecordPrompt, RecordVerdict, RunRecord, SessionEvent, SessionOrigin, SessionRecord,
    Store, TranscriptChunk,
};
use serde_json::Value;
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
        // A command mutates the tables only in `Tables::commit`, which cannot fail half-way,
        // so the state behind a poisoned lock is still consistent.
        self.tables.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one command atomically: `command` works on a [`Tx`]; its writes are committed only
    /// if it returns `Ok`.
    fn write<T>(
        &self,
        target: Target,
        command: impl FnOnce(&mut Tx<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut guard = self.lock();
        let tables = &mut *guard;
        let run = tables.locate(target)?;
        let stored = tables.runs.get(&run).ok_or_else(|| run_not_found(run))?;
        let mut tx = Tx::begin(stored, &tables.session_runs);
        let output = command(&mut tx)?;
        if let Some(changes) = tx.into_changes() {
            tables.commit(run, changes);
        }
        Ok(output)
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

/// How a command finds the run it locks.
#[derive(Clone, Copy, Debug)]
enum Target {
    Run(RunId),
    Session(SessionId),
    Approval(ApprovalId),
}

impl Tables {
    fn locate(&self, target: Target) -> Result<RunId> {
        match target {
            Target::Run(run) => Ok(run),
            Target::Session(session) => self
                .session_runs
                .get(&session)
                .copied()
                .ok_or_else(|| session_not_found(session)),
            Target::Approval(request) => {
                self.approval_runs.get(&request).copied().ok_or_else(|| {
                    Error::new(
                        ErrorCode::ApprovalNotFound,
                        format!("no approval request {request}"),
                    )
                    .with_hint("list the run's pending requests and decide one of those")
                })
            }
        }
    }

    fn commit(&mut self, run: RunId, changes: Changes) {
        let Some(stored) = self.runs.get_mut(&run) else {
            return;
        };
        for session in &changes.rows.sessions {
            self.session_runs.insert(session.id, run);
        }
        for approval in &changes.rows.approvals {
            self.approval_runs.insert(approval.id, run);
        }
        stored.rows = changes.rows;
        for (key, kind) in changes.events {
            stored.event_keys.insert(key.clone());
            let seq = stored.events.len() as u64 + 1;
            stored.events.push(Event {
                seq,
                run,
                at: changes.at,
                key,
                kind,
            });
        }
        stored.artifacts.extend(changes.artifacts);
        for (session, chunk) in changes.chunks {
            stored
                .transcripts
                .entry(session)
                .or_default()
                .insert(chunk.seq, chunk.text);
        }
        self.commands += 1;
    }
}

/// One run and everything recorded about it.
#[derive(Debug)]
struct RunTables {
    /// What the run was created with, to tell a replay of `create_run` from a conflict.
    created_as: NewRun,
    rows: Rows,
    events: Vec<Event>,
    event_keys: HashSet<String>,
    artifacts: Vec<ArtifactRecord>,
    transcripts: HashMap<SessionId, BTreeMap<u64, String>>,
}

/// The rows commands update in place; a command works on a copy of them.
#[derive(Clone, Debug, PartialEq)]
struct Rows {
    run: RunRecord,
    phases: Vec<PhaseRecord>,
    sessions: Vec<SessionRecord>,
    approvals: Vec<ApprovalRecord>,
}

/// What a successful command commits.
#[derive(Debug)]
struct Changes {
    at: OffsetDateTime,
    rows: Rows,
    events: Vec<(String, EventKind)>,
    artifacts: Vec<ArtifactRecord>,
    chunks: Vec<(SessionId, TranscriptChunk)>,
}

/// The working state of one command on one run.
struct Tx<'a> {
    now: OffsetDateTime,
    stored: &'a RunTables,
    session_runs: &'a HashMap<SessionId, RunId>,
    rows: Rows,
    events: Vec<(String, EventKind)>,
    keys: HashSet<String>,
    artifacts: Vec<ArtifactRecord>,
    chunks: Vec<(SessionId, TranscriptChunk)>,
}

impl<'a> Tx<'a> {
    fn begin(stored: &'a RunTables, session_runs: &'a HashMap<SessionId, RunId>) -> Self {
        Self {
            now: OffsetDateTime::now_utc(),
            stored,
            session_runs,
            rows: stored.rows.clone(),
            events: Vec::new(),
            keys: HashSet::new(),
            artifacts: Vec::new(),
            chunks: Vec::new(),
        }
    }

    /// The changes to commit, or `None` when the command wrote nothing.
    fn into_changes(self) -> Option<Changes> {
        let wrote = self.rows != self.stored.rows
            || !self.events.is_empty()
            || !self.artifacts.is_empty()
            || !self.chunks.is_empty();
        wrote.then_some(Changes {
            at: self.now,
            rows: self.rows,
            events: self.events,
            artifacts: self.artifacts,
            chunks: self.chunks,
        })
    }

    fn run_id(&self) -> RunId {
        self.rows.run.id
    }

    fn run(&self) -> &RunRecord {
        &self.rows.run
    }

    fn has_event(&self, key: &str) -> bool {
        self.stored.event_keys.contains(key) || self.keys.contains(key)
    }

    /// Appends an event unless the run already has its idempotency key.
    fn append(&mut self, kind: EventKind) {
        let key = kind.idempotency_key();
        if !self.has_event(&key) {
            self.keys.insert(key.clone());
            self.events.push((key, kind));
        }
    }

    // ---- phases and the rules every phase-work command follows ----

    fn phase_index(&self, key: &PhaseKey) -> Result<usize> {
        self.rows
            .phases
            .iter()
            .position(|phase| &phase.key == key)
            .ok_or_else(|| phase_not_found(self.run_id(), key))
    }

    fn phase(&self, index: usize) -> &PhaseRecord {
        &self.rows.phases[index]
    }

    fn phase_mut(&mut self, index: usize) -> &mut PhaseRecord {
        &mut self.rows.phases[index]
    }

    fn require_phase_work(&self) -> Result<()> {
        let run = self.run();
        if run.state.allows_phase_work() {
            Ok(())
        } else {
            Err(Error::run_state_changed(run.id, run.state))
        }
    }

    fn require_owner(&self, index: usize, owner: EngineId) -> Result<()> {
        let phase = self.phase(index);
        if phase.owner == Some(owner) {
            return Ok(());
        }
        let holder = phase
            .owner
            .map_or_else(|| "no engine".to_owned(), |id| format!("engine {id}"));
        Err(Error::new(
            ErrorCode::PhaseClaimed,
            format!("engine {owner} does not own this phase; {holder} does"),
        )
        .in_phase(self.run_id(), &phase.key)
        .with_hint("another engine took the phase over; stop here, or claim it again to resume"))
    }

    /// Steps 2–4 of every phase-work command: phase exists, run allows work, caller owns it.
    fn phase_work(&self, work: &PhaseWork) -> Result<usize> {
        let index = self.phase_index(&work.phase)?;
        self.require_phase_work()?;
        self.require_owner(index, work.owner)?;
        Ok(index)
    }

    fn require_attempt(&self, index: usize, attempt: u32) -> Result<()> {
        let phase = self.phase(index);
        if phase.attempts == attempt {
            return Ok(());
        }
        Err(Error::new(
            ErrorCode::PhaseStateMismatch,
            format!(
                "attempt {attempt} is not the phase's current attempt {}",
                phase.attempts
            ),
        )
        .in_phase(self.run_id(), &phase.key)
        .with_hint("reload the phase and continue from its current attempt"))
    }

    fn require_phase_state(&self, index: usize, allowed: &[PhaseState], doing: &str) -> Result<()> {
        let phase = self.phase(index);
        if allowed.contains(&phase.state) {
            return Ok(());
        }
        let allowed: Vec<&str> = allowed.iter().map(|state| state.as_str()).collect();
        Err(Error::new(
            ErrorCode::PhaseStateMismatch,
            format!(
                "cannot {doing} while the phase is {} (needs {})",
                phase.state,
                allowed.join(" or ")
            ),
        )
        .in_phase(self.run_id(), &phase.key)
        .with_hint("reload the phase and resume from its persisted state"))
    }

    /// After phase `index` completed: the run moves to the next phase, or completes.
    /// `resumed_by` names the approval request whose decision let the run go on.
    fn advance(&mut self, index: usize, resumed_by: Option<ApprovalId>) {
        match self.rows.phases.get(index + 1).map(|next| next.key.clone()) {
            Some(next) => {
                let run = &mut self.rows.run;
                run.current_phase = Some(next);
                run.state = RunState::Executing;
                run.paused_from = None;
                if let Some(request) = resumed_by {
                    self.append(EventKind::RunResumed {
                        request,
                        state: RunState::Executing,
                    });
                }
            }
            None => {
                self.finish_run(RunState::Completed);
                self.append(EventKind::RunCompleted);
            }
        }
    }

    fn finish_run(&mut self, state: RunState) {
        let run = &mut self.rows.run;
        run.state = state;
        run.current_phase = None;
        run.paused_from = None;
    }

    /// Aborts the run: the phase in flight fails, every session stops for good.
    fn abort_run(&mut self, reason: String) -> Vec<SessionId> {
        let current = self.run().current_phase.clone();
        let at = current
            .as_ref()
            .and_then(|key| self.rows.phases.iter().position(|phase| &phase.key == key));
        let mut failed_at = None;
        if let Some(index) = at {
            let phase = self.phase_mut(index);
            let in_flight = matches!(
                phase.state,
                PhaseState::Running
                    | PhaseState::AwaitingArtifact
                    | PhaseState::Validating
                    | PhaseState::AwaitingApproval
            );
            let (key, attempt) = (phase.key.clone(), phase.attempts);
            if in_flight {
                phase.state = PhaseState::Failed;
                self.append(EventKind::PhaseFailed {
                    phase: key.clone(),
                    attempt,
                    reason: reason.clone(),
                });
            }
            failed_at = Some((key, attempt));
        }
        self.finish_run(RunState::Aborted);
        self.append(EventKind::RunAborted { reason });
        match failed_at {
            Some((phase, attempt)) => self.fail_all_sessions(&phase, attempt),
            None => self
                .rows
                .sessions
                .iter()
                .map(|session| session.id)
                .collect(),
        }
    }

    // ---- sessions ----

    fn session_index(&self, id: SessionId) -> Result<usize> {
        self.rows
            .sessions
            .iter()
            .position(|session| session.id == id)
            .ok_or_else(|| session_not_found(id).with_run(self.run_id()))
    }

    fn session_mut(&mut self, index: usize) -> &mut SessionRecord {
        &mut self.rows.sessions[index]
    }

    /// The session finished the prompt `dedup`: `READY`, `session.idle`.
    fn settle_session(&mut self, index: usize, dedup: &DedupKey) {
        let session = self.session_mut(index);
        if session.state == SessionState::Busy && session.last_dedup.as_ref() == Some(dedup) {
            session.state = SessionState::Ready;
            let id = session.id;
            self.append(EventKind::SessionIdle {
                session: id,
                dedup: dedup.clone(),
            });
        }
    }

    fn ready_session(&mut self, index: usize) {
        let session = self.session_mut(index);
        session.state = SessionState::Ready;
        let event = EventKind::SessionReady {
            session: session.id,
            role: session.role.clone(),
            recovery_attempts: session.recovery_attempts,
        };
        self.append(event);
    }

    fn crash_session(&mut self, index: usize) {
        let session = self.session_mut(index);
        session.state = SessionState::Crashed;
        session.recovery_attempts += 1;
        let event = EventKind::SessionCrashed {
            session: session.id,
            recovery_attempts: session.recovery_attempts,
        };
        self.append(event);
    }

    fn fail_session(&mut self, index: usize, phase: &PhaseKey, attempt: u32) {
        let session = self.session_mut(index);
        if session.state == SessionState::FailedNeedsHuman {
            return;
        }
        session.state = SessionState::FailedNeedsHuman;
        let event = EventKind::SessionFailed {
            session: session.id,
            role: session.role.clone(),
            phase: phase.clone(),
            attempt,
        };
        self.append(event);
    }

    /// Stops every session of the run for good; returns all of them for disposal.
    fn fail_all_sessions(&mut self, phase: &PhaseKey, attempt: u32) -> Vec<SessionId> {
        for index in 0..self.rows.sessions.len() {
            self.fail_session(index, phase, attempt);
        }
        self.rows
            .sessions
            .iter()
            .map(|session| session.id)
            .collect()
    }

    fn refuse_failed_session(&self, index: usize) -> Result<()> {
        let session = &self.rows.sessions[index];
        if session.state != SessionState::FailedNeedsHuman {
            return Ok(());
        }
        Err(Error::new(
            ErrorCode::SessionFailedNeedsHuman,
            format!(
                "session {} ({}) is FAILED_NEEDS_HUMAN and is never reused automatically",
                session.id, session.role
            ),
        )
        .with_run(self.run_id())
        .with_hint("decide the run's pending failure gate (retry or abort) first"))
    }

    // ---- artifacts ----

    /// Inserts the artifact idempotently on (run, path, hash), appends its verdict event and
    /// moves the phase to `validating`.
    fn apply_verdict(
        &mut self,
        index: usize,
        attempt: u32,
        new: &NewArtifact,
    ) -> Result<ArtifactRecord> {
        let phase = self.phase(index).key.clone();
        let record = match self.find_artifact(&new.path, &new.hash) {
            Some(stored) if stored.matches(&phase, new) => stored.clone(),
            Some(stored) => {
                return Err(Error::corruption(format!(
                    "artifact {} ({}) was recorded for phase `{}` with another verdict; the replay for phase `{phase}` differs",
                    stored.path, stored.hash, stored.phase
                ))
                .in_phase(self.run_id(), &phase));
            }
            None => {
                let record = ArtifactRecord {
                    id: ArtifactId::new(),
                    run: self.run_id(),
                    phase: phase.clone(),
                    attempt,
                    path: new.path.clone(),
                    hash: new.hash.clone(),
                    schema_id: new.schema_id.clone(),
                    size: new.size,
                    content: new.content.clone(),
                    errors: new.errors.clone(),
                    recorded_at: self.now,
                };
                self.artifacts.push(record.clone());
                record
            }
        };
        let event = if record.is_valid() {
            EventKind::ArtifactValidated {
                phase,
                artifact: record.id,
                path: record.path.clone(),
                hash: record.hash.clone(),
                schema: record.schema_id.clone(),
            }
        } else {
            EventKind::ArtifactInvalid {
                phase,
                artifact: record.id,
                path: record.path.clone(),
                hash: record.hash.clone(),
                schema: record.schema_id.clone(),
                errors: record.errors.clone(),
            }
        };
        self.append(event);
        self.phase_mut(index).state = PhaseState::Validating;
        Ok(record)
    }

    fn find_artifact(&self, path: &str, hash: &ContentHash) -> Option<&ArtifactRecord> {
        self.stored
            .artifacts
            .iter()
            .chain(&self.artifacts)
            .find(|artifact| artifact.path == path && &artifact.hash == hash)
    }

    // ---- approval requests ----

    fn approval_by_key(&self, key: &str) -> Option<&ApprovalRecord> {
        self.rows
            .approvals
            .iter()
            .find(|approval| approval.key == key)
    }

    /// Files an approval request idempotently on its key.
    fn file_request(
        &mut self,
        index: usize,
        attempt: u32,
        gate: &GateKey,
        kind: GateKind,
        payload: &Value,
    ) -> Result<ApprovalRecord> {
        let phase = self.phase(index).key.clone();
        let key = ApprovalRecord::key_for(self.run_id(), gate, &phase, attempt);
        if let Some(stored) = self.approval_by_key(&key) {
            return self
                .check_request_replay(stored, gate, kind, payload)
                .cloned();
        }
        let record = ApprovalRecord {
            id: ApprovalId::new(),
            run: self.run_id(),
            phase,
            attempt,
            gate: gate.clone(),
            kind,
            key,
            payload: payload.clone(),
            decision: None,
            created_at: self.now,
        };
        self.rows.approvals.push(record.clone());
        Ok(record)
    }

    fn check_request_replay<'r>(
        &self,
        stored: &'r ApprovalRecord,
        gate: &GateKey,
        kind: GateKind,
        payload: &Value,
    ) -> Result<&'r ApprovalRecord> {
        if &stored.gate == gate && stored.kind == kind && &stored.payload == payload {
            return Ok(stored);
        }
        Err(Error::corruption(format!(
            "approval request {} was filed with other content than this replay",
            stored.key
        ))
        .in_phase(self.run_id(), &stored.phase))
    }

    fn approval_requested(&mut self, approval: &ApprovalRecord) {
        self.append(EventKind::ApprovalRequested {
            request: approval.id,
            key: approval.key.clone(),
            gate: approval.gate.clone(),
            kind: approval.kind,
            phase: approval.phase.clone(),
            attempt: approval.attempt,
        });
    }

    // ---- transcripts ----

    /// Stages transcript chunks idempotently on (session, seq).
    fn stage_chunks(&mut self, index: usize, chunks: &[TranscriptChunk]) -> Result<()> {
        let session = self.rows.sessions[index].id;
        let stored = self.stored.transcripts.get(&session);
        for chunk in chunks {
            if chunk.seq == 0 {
                return Err(Error::new(
                    ErrorCode::InvalidArgument,
                    format!("transcript chunk of session {session} has seq 0"),
                )
                .with_run(self.run_id())
                .with_hint("transcript sequence numbers start at 1"));
            }
            let known = stored.and_then(|texts| texts.get(&chunk.seq)).or_else(|| {
                self.chunks
                    .iter()
                    .find(|(id, staged)| *id == session && staged.seq == chunk.seq)
                    .map(|(_, staged)| &staged.text)
            });
            match known {
                Some(text) if text == &chunk.text => {}
                Some(_) => {
                    return Err(Error::corruption(format!(
                        "transcript chunk {} of session {session} was stored with other text",
                        chunk.seq
                    ))
                    .with_run(self.run_id()));
                }
                None => self.chunks.push((session, chunk.clone())),
            }
        }
        let last = chunks.iter().map(|chunk| chunk.seq).max().unwrap_or(0);
        let record = self.session_mut(index);
        record.last_capture_seq = record.last_capture_seq.max(last);
        Ok(())
    }
}

fn run_not_found(run: RunId) -> Error {
    Error::new(ErrorCode::RunNotFound, format!("no run {run}"))
        .with_run(run)
        .with_hint("check the run id; runs exist once create_run returned")
}

fn phase_not_found(run: RunId, phase: &PhaseKey) -> Error {
    Error::new(
        ErrorCode::PhaseNotFound,
        format!("run {run} has no phase `{phase}`"),
    )
    .in_phase(run, phase)
    .with_hint("check that the workflow passed to the engine is the one the run was created with")
}

fn session_not_found(session: SessionId) -> Error {
    Error::new(
        ErrorCode::SessionNotFound,
        format!("the store has no session {session}"),
    )
    .with_hint(
        "a session is recorded by mark_busy with origin `Started`; record it before using it",
    )
}

fn invalid_run(run: &NewRun) -> Option<Error> {
    let problem = if run.phases.is_empty() {
        "has no phases".to_owned()
    } else {
        let mut seen = HashSet::new();
        let duplicate = run.phases.iter().find(|key| !seen.insert(*key))?;
        format!("lists phase `{duplicate}` twice")
    };
    Some(
        Error::new(
            ErrorCode::InvalidArgument,
            format!("run {} {problem}", run.id),
        )
        .with_run(run.id)
        .with_hint("a run needs at least one phase and unique phase keys"),
    )
}

/// The decisions a gate of that kind takes, for error hints.
fn allowed_decisions(kind: GateKind) -> &'static str {
    match kind {
        GateKind::Workflow => "approve, rework or reject",
        GateKind::Failure => "retry or abort",
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn create_run(&self, new: NewRun) -> Result<RunRecord> {
        if let Some(error) = invalid_run(&new) {
            return Err(error);
        }
        let mut tables = self.lock();
        if let Some(stored) = tables.runs.get(&new.id) {
            if stored.created_as == new {
                return Ok(stored.rows.run.clone());
            }
            return Err(Error::corruption(format!(
                "run {} exists with other content than this create_run",
                new.id
            ))
            .with_run(new.id));
        }
        let now = OffsetDateTime::now_utc();
        let run = RunRecord {
            id: new.id,
            workflow: new.workflow.clone(),
            subject: new.subject.clone(),
            worktree: new.worktree.clone(),
            state: RunState::Planning,
            paused_from: None,
            current_phase: new.phases.first().cloned(),
            created_at: now,
        };
        let phases = new
            .phases
            .iter()
            .zip(0..)
            .map(|(key, position)| PhaseRecord {
                run: new.id,
                key: key.clone(),
                position,
                state: PhaseState::Pending,
                attempts: 0,
                round_repairs: 0,
                repair: false,
                instructions: None,
                feedback: None,
                owner: None,
            })
            .collect();
        let created = EventKind::RunCreated {
            workflow: new.workflow.clone(),
            phases: new.phases.clone(),
        };
        let key = created.idempotency_key();
        let stored = RunTables {
            created_as: new,
            rows: Rows {
                run: run.clone(),
                phases,
                sessions: Vec::new(),
                approvals: Vec::new(),
            },
            events: vec![Event {
                seq: 1,
                run: run.id,
                at: now,
                key: key.clone(),
                kind: created,
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
        self.write(Target::Run(cmd.work.run), |tx| {
            let index = tx.phase_index(&cmd.work.phase)?;
            tx.require_phase_work()?;
            let phase = tx.phase(index).clone();
            if cmd.repair {
                if !matches!(
                    phase.state,
                    PhaseState::Validating | PhaseState::AwaitingArtifact
                ) {
                    return Ok(BeginOutcome::NotStartable(phase));
                }
                tx.require_owner(index, cmd.work.owner)?;
            } else {
                let current = tx.run().current_phase.as_ref() == Some(&phase.key);
                if phase.state != PhaseState::Pending || !current {
                    return Ok(BeginOutcome::NotStartable(phase));
                }
                if tx.run().state == RunState::Planning {
                    tx.rows.run.state = RunState::Executing;
                    tx.append(EventKind::RunStarted);
                }
            }
            let phase = tx.phase_mut(index);
            phase.state = PhaseState::Running;
            phase.attempts += 1;
            phase.repair = cmd.repair;
            phase.instructions = Some(cmd.instructions);
            if cmd.repair {
                phase.round_repairs += 1;
            } else {
                phase.round_repairs = 0;
                phase.feedback = None;
                phase.owner = Some(cmd.work.owner);
            }
            let phase = phase.clone();
            tx.append(EventKind::PhaseStarted {
                phase: phase.key.clone(),
                attempt: phase.attempts,
                repair: cmd.repair,
                reason: cmd.reason,
            });
            Ok(BeginOutcome::Started(phase))
        })
    }

    async fn claim_phase(&self, work: PhaseWork) -> Result<PhaseRecord> {
        self.write(Target::Run(work.run), |tx| {
            let index = tx.phase_index(&work.phase)?;
            tx.require_phase_work()?;
            let phase = tx.phase_mut(index);
            phase.owner = Some(work.owner);
            Ok(phase.clone())
        })
    }

    async fn mark_busy(&self, cmd: MarkBusy) -> Result<SessionRecord> {
        self.write(Target::Run(cmd.work.run), |tx| {
            let index = tx.phase_work(&cmd.work)?;
            tx.require_attempt(index, cmd.attempt)?;
            let by_role = tx
                .rows
                .sessions
                .iter()
                .position(|session| session.role == cmd.role);
            if let Some(at) = by_role {
                let session = &tx.rows.sessions[at];
                if session.id == cmd.session
                    && session.state == SessionState::Busy
                    && session.last_dedup.as_ref() == Some(&cmd.dedup)
                {
                    // Already marked with this very prompt: a replay, nothing to write.
                    return Ok(session.clone());
                }
            }
            tx.require_phase_state(index, &[PhaseState::Running], "mark a session busy")?;
            let at = match (by_role, cmd.origin) {
                (Some(at), _) if tx.rows.sessions[at].id != cmd.session => {
                    let stored = &tx.rows.sessions[at];
                    return Err(Error::corruption(format!(
                        "role `{}` already has session {}, not {}",
                        cmd.role, stored.id, cmd.session
                    ))
                    .in_phase(tx.run_id(), &cmd.work.phase));
                }
                (Some(at), origin) => {
                    tx.refuse_failed_session(at)?;
                    if origin == SessionOrigin::Resumed {
                        tx.ready_session(at);
                    }
                    at
                }
                (None, SessionOrigin::Started) => {
                    if tx.session_runs.contains_key(&cmd.session) {
                        return Err(Error::corruption(format!(
                            "session {} is already recorded for another run or role",
                            cmd.session
                        ))
                        .in_phase(tx.run_id(), &cmd.work.phase));
                    }
                    tx.rows.sessions.push(SessionRecord {
                        id: cmd.session,
                        run: tx.run_id(),
                        role: cmd.role.clone(),
                        state: SessionState::Created,
                        last_dedup: None,
                        last_prompt_at: None,
                        recovery_attempts: 0,
                        last_capture_seq: 0,
                    });
                    tx.append(EventKind::SessionCreated {
                        session: cmd.session,
                        role: cmd.role.clone(),
                    });
                    let at = tx.rows.sessions.len() - 1;
                    tx.ready_session(at);
                    at
                }
                (None, SessionOrigin::Resumed | SessionOrigin::Continuing) => {
                    return Err(
                        session_not_found(cmd.session).in_phase(tx.run_id(), &cmd.work.phase)
                    );
                }
            };
            let now = tx.now;
            let session = tx.session_mut(at);
            session.state = SessionState::Busy;
            session.last_dedup = Some(cmd.dedup.clone());
            session.last_prompt_at = Some(now);
            let session = session.clone();
            tx.append(EventKind::SessionBusy {
                session: session.id,
                dedup: cmd.dedup,
            });
            Ok(session)
        })
    }

    async fn record_prompt(&self, cmd: RecordPrompt) -> Result<()> {
        self.write(Target::Run(cmd.work.run), |tx| {
            let index = tx.phase_work(&cmd.work)?;
            tx.require_attempt(index, cmd.attempt)?;
            tx.require_phase_state(
                index,
                &[PhaseState::Running, PhaseState::AwaitingArtifact],
                "record a prompt",
            )?;
            let at = tx.session_index(cmd.session)?;
            if tx.rows.sessions[at].last_dedup.as_ref() != Some(&cmd.dedup) {
                return Err(Error::new(
                    ErrorCode::PhaseStateMismatch,
                    format!(
                        "session {} was not marked busy with prompt {}",
                        cmd.session, cmd.dedup
                    ),
                )
                .in_phase(tx.run_id(), &cmd.work.phase)
                .with_hint("mark the session busy with the prompt before sending it"));
            }
            let phase = cmd.work.phase;
            tx.append(match cmd.kind {
                PromptKind::Initial => EventKind::PromptSent {
                    phase: phase.clone(),
                    attempt: cmd.attempt,
                    session: cmd.session,
                    dedup: cmd.dedup,
                },
                PromptKind::Repair => EventKind::PromptRepaired {
                    phase: phase.clone(),
                    attempt: cmd.attempt,
                    session: cmd.session,
                    dedup: cmd.dedup,
                },
            });
            tx.append(EventKind::ArtifactExpected {
                phase,
                attempt: cmd.attempt,
                path: cmd.artifact_path,
                schema: cmd.schema_id,
            });
            tx.phase_mut(index).state = PhaseState::AwaitingArtifact;
            Ok(())
        })
    }

    async fn record_session_event(
        &self,
        work: PhaseWork,
        session: SessionId,
        event: SessionEvent,
    ) -> Result<SessionRecord> {
        self.write(Target::Run(work.run), |tx| {
            let index = tx.phase_work(&work)?;
            let at = tx.session_index(session)?;
            match event {
                SessionEvent::ArtifactTimeout { attempt, path } => {
                    tx.require_attempt(index, attempt)?;
                    let timeout = EventKind::ArtifactTimeout {
                        phase: work.phase,
                        attempt,
                        path,
                    };
                    if !tx.has_event(&timeout.idempotency_key()) {
                        tx.require_phase_state(
                            index,
                            &[PhaseState::AwaitingArtifact],
                            "record an artifact timeout",
                        )?;
                        tx.session_mut(at).state = SessionState::ArtifactTimeout;
                        tx.append(timeout);
                    }
                }
                SessionEvent::Recovered => match tx.rows.sessions[at].state {
                    // Recovered already: a replay.
                    SessionState::Ready => {}
                    SessionState::ArtifactTimeout
                    | SessionState::Resuming
                    | SessionState::Rebootstrapped
                    | SessionState::Crashed => {
                        let record = tx.session_mut(at);
                        record.state = SessionState::Ready;
                        record.recovery_attempts += 1;
                        let recovered = EventKind::SessionRecovered {
                            session,
                            recovery_attempts: record.recovery_attempts,
                        };
                        tx.append(recovered);
                    }
                    SessionState::FailedNeedsHuman => tx.refuse_failed_session(at)?,
                    state => {
                        return Err(Error::new(
                            ErrorCode::PhaseStateMismatch,
                            format!("session {session} is {state}; only a timed-out or crashed session recovers"),
                        )
                        .in_phase(tx.run_id(), &work.phase));
                    }
                },
            }
            Ok(tx.rows.sessions[at].clone())
        })
    }

    async fn record_verdict(&self, cmd: RecordVerdict) -> Result<ArtifactRecord> {
        self.write(Target::Run(cmd.work.run), |tx| {
            let index = tx.phase_work(&cmd.work)?;
            tx.require_attempt(index, cmd.attempt)?;
            tx.require_phase_state(
                index,
                &[PhaseState::AwaitingArtifact, PhaseState::Validating],
                "record an artifact verdict",
            )?;
            let at = tx.session_index(cmd.session)?;
            let record = tx.apply_verdict(index, cmd.attempt, &cmd.artifact)?;
            tx.settle_session(at, &cmd.dedup);
            Ok(record)
        })
    }

    async fn finish_phase(&self, cmd: FinishPhase) -> Result<Finished> {
        self.write(Target::Run(cmd.work.run), |tx| finish_phase(tx, cmd))
    }

    async fn decide(&self, cmd: Decide) -> Result<Finished> {
        self.write(Target::Approval(cmd.request), |tx| decide(tx, cmd))
    }

    async fn operate(&self, run: RunId, action: OperatorAction) -> Result<Finished> {
        self.write(Target::Run(run), |tx| {
            let state = tx.run().state;
            if state.is_terminal() {
                return Err(Error::run_state_changed(run, state));
            }
            let dispose = match action {
                OperatorAction::Pause { reason } => {
                    if state != RunState::Paused {
                        tx.rows.run.state = RunState::Paused;
                        tx.rows.run.paused_from = Some(state);
                        tx.append(EventKind::RunPaused {
                            cause: reason,
                            paused_from: state,
                        });
                    }
                    Vec::new()
                }
                OperatorAction::Abort { reason } => tx.abort_run(reason),
            };
            Ok(Finished {
                run: tx.rows.run.clone(),
                approval: None,
                artifact: None,
                dispose,
            })
        })
    }

    async fn append_transcript(
        &self,
        session: SessionId,
        chunks: Vec<TranscriptChunk>,
    ) -> Result<()> {
        self.write(Target::Session(session), |tx| {
            let at = tx.session_index(session)?;
            tx.stage_chunks(at, &chunks)
        })
    }

    async fn run(&self, run: RunId) -> Result<RunRecord> {
        self.read(run, |stored| Ok(stored.rows.run.clone()))
    }

    async fn phases(&self, run: RunId) -> Result<Vec<PhaseRecord>> {
        self.read(run, |stored| Ok(stored.rows.phases.clone()))
    }

    async fn session(&self, run: RunId, role: &RoleKey) -> Result<Option<SessionRecord>> {
        self.read(run, |stored| {
            Ok(stored
                .rows
                .sessions
                .iter()
                .find(|session| &session.role == role)
                .cloned())
        })
    }

    async fn sessions(&self, run: RunId) -> Result<Vec<SessionRecord>> {
        self.read(run, |stored| Ok(stored.rows.sessions.clone()))
    }

    async fn events(&self, run: RunId, after: u64) -> Result<Vec<Event>> {
        self.read(run, |stored| {
            let skip = usize::try_from(after).unwrap_or(usize::MAX);
            Ok(stored.events.iter().skip(skip).cloned().collect())
        })
    }

    async fn approvals(&self, run: RunId) -> Result<Vec<ApprovalRecord>> {
        self.read(run, |stored| Ok(stored.rows.approvals.clone()))
    }

    async fn approval(&self, id: ApprovalId) -> Result<ApprovalRecord> {
        let tables = self.lock();
        let run = tables.locate(Target::Approval(id))?;
        tables
            .runs
            .get(&run)
            .and_then(|stored| stored.rows.approvals.iter().find(|a| a.id == id))
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
            if !stored.rows.phases.iter().any(|p| &p.key == phase) {
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

/// [`Store::finish_phase`] inside a transaction.
fn finish_phase(tx: &mut Tx<'_>, cmd: FinishPhase) -> Result<Finished> {
    let index = tx.phase_index(&cmd.work.phase)?;
    if let Some(done) = finished_before(tx, index, &cmd)? {
        return Ok(done);
    }
    let failing = matches!(cmd.end, PhaseEnd::Fail { .. });
    if failing && tx.run().state.is_terminal() {
        return Ok(Finished {
            run: tx.run().clone(),
            approval: None,
            artifact: None,
            dispose: Vec::new(),
        });
    }
    if !failing {
        tx.require_phase_work()?;
    }
    tx.require_owner(index, cmd.work.owner)?;
    tx.require_attempt(index, cmd.attempt)?;
    let doing = match &cmd.end {
        PhaseEnd::Complete => "complete the phase",
        PhaseEnd::AwaitApproval { .. } => "request approval",
        PhaseEnd::HumanGate { .. } => "raise a human gate",
        PhaseEnd::Fail { .. } => "fail the phase",
    };
    match &cmd.end {
        PhaseEnd::Complete | PhaseEnd::AwaitApproval { .. } => {
            if cmd
                .verdict
                .as_ref()
                .is_some_and(|verdict| !verdict.is_valid())
            {
                return Err(Error::new(
                    ErrorCode::InvalidArgument,
                    format!("cannot {doing} with an invalid artifact"),
                )
                .in_phase(tx.run_id(), &cmd.work.phase)
                .with_hint("record the verdict with record_verdict and repair, or end the phase with a human gate"));
            }
            let allowed: &[PhaseState] = if cmd.verdict.is_some() {
                &[PhaseState::AwaitingArtifact, PhaseState::Validating]
            } else {
                &[PhaseState::Validating]
            };
            tx.require_phase_state(index, allowed, doing)?;
        }
        PhaseEnd::HumanGate { .. } => tx.require_phase_state(
            index,
            &[
                PhaseState::Running,
                PhaseState::AwaitingArtifact,
                PhaseState::Validating,
            ],
            doing,
        )?,
        PhaseEnd::Fail { .. } => {}
    }
    let session = match &cmd.session {
        Some((id, dedup)) => Some((tx.session_index(*id)?, dedup.clone())),
        None => None,
    };
    if let Some((at, _)) = session {
        tx.stage_chunks(at, &cmd.transcript)?;
    } else if !cmd.transcript.is_empty() {
        return Err(Error::new(
            ErrorCode::InvalidArgument,
            "transcript chunks need the session they were captured from",
        )
        .in_phase(tx.run_id(), &cmd.work.phase));
    }
    let artifact = match &cmd.verdict {
        Some(verdict) => Some(tx.apply_verdict(index, cmd.attempt, verdict)?),
        None => None,
    };
    let phase = cmd.work.phase;
    let attempt = cmd.attempt;
    let settle = |tx: &mut Tx<'_>| {
        if let Some((at, Some(dedup))) = &session {
            tx.settle_session(*at, dedup);
        }
    };
    let mut approval = None;
    let mut dispose = Vec::new();
    match cmd.end {
        PhaseEnd::Complete => {
            settle(tx);
            tx.phase_mut(index).state = PhaseState::Completed;
            tx.append(EventKind::PhaseCompleted { phase, attempt });
            if let Some((at, _)) = session {
                tx.ready_session(at);
            }
            tx.advance(index, None);
        }
        PhaseEnd::AwaitApproval { gate, payload } => {
            settle(tx);
            let request = tx.file_request(index, attempt, &gate, GateKind::Workflow, &payload)?;
            tx.phase_mut(index).state = PhaseState::AwaitingApproval;
            tx.rows.run.state = RunState::AwaitingApproval;
            if let Some((at, _)) = session {
                tx.session_mut(at).state = SessionState::WaitingForApproval;
            }
            tx.approval_requested(&request);
            approval = Some(request);
        }
        PhaseEnd::HumanGate {
            gate,
            payload,
            crash_session,
        } => {
            if !crash_session {
                settle(tx);
            }
            let request = tx.file_request(index, attempt, &gate, GateKind::Failure, &payload)?;
            tx.phase_mut(index).state = PhaseState::Failed;
            tx.append(EventKind::PhaseFailed {
                phase: phase.clone(),
                attempt,
                reason: gate.to_string(),
            });
            let from = tx.run().state;
            tx.rows.run.state = RunState::Paused;
            tx.rows.run.paused_from = Some(from);
            tx.append(EventKind::RunPaused {
                cause: format!("human_required:{gate}:{phase}:{attempt}"),
                paused_from: from,
            });
            if let Some((at, _)) = session {
                if crash_session {
                    tx.crash_session(at);
                }
                tx.fail_session(at, &phase, attempt);
            }
            tx.approval_requested(&request);
            approval = Some(request);
        }
        PhaseEnd::Fail { reason } => {
            tx.phase_mut(index).state = PhaseState::Failed;
            tx.append(EventKind::PhaseFailed {
                phase: phase.clone(),
                attempt,
                reason: reason.clone(),
            });
            tx.finish_run(RunState::Failed);
            tx.append(EventKind::RunFailed { reason });
            dispose = tx.fail_all_sessions(&phase, attempt);
        }
    }
    Ok(Finished {
        run: tx.run().clone(),
        approval,
        artifact,
        dispose,
    })
}

/// The stored outcome of a [`FinishPhase`] that was already applied, if it was.
fn finished_before(tx: &Tx<'_>, index: usize, cmd: &FinishPhase) -> Result<Option<Finished>> {
    let phase = &tx.phase(index).key;
    let approval = match &cmd.end {
        PhaseEnd::Complete => {
            let completed = EventKind::PhaseCompleted {
                phase: phase.clone(),
                attempt: cmd.attempt,
            };
            if !tx.has_event(&completed.idempotency_key()) {
                return Ok(None);
            }
            None
        }
        PhaseEnd::AwaitApproval { gate, payload } | PhaseEnd::HumanGate { gate, payload, .. } => {
            let kind = match cmd.end {
                PhaseEnd::AwaitApproval { .. } => GateKind::Workflow,
                _ => GateKind::Failure,
            };
            let key = ApprovalRecord::key_for(tx.run_id(), gate, phase, cmd.attempt);
            let Some(stored) = tx.approval_by_key(&key) else {
                return Ok(None);
            };
            Some(
                tx.check_request_replay(stored, gate, kind, payload)?
                    .clone(),
            )
        }
        PhaseEnd::Fail { .. } => return Ok(None),
    };
    let artifact = match &cmd.verdict {
        Some(verdict) => match tx.find_artifact(&verdict.path, &verdict.hash) {
            Some(stored) if stored.matches(phase, verdict) => Some(stored.clone()),
            _ => {
                return Err(Error::corruption(format!(
                    "attempt {} of the phase already ended without this verdict ({})",
                    cmd.attempt, verdict.hash
                ))
                .in_phase(tx.run_id(), phase));
            }
        },
        None => None,
    };
    Ok(Some(Finished {
        run: tx.run().clone(),
        approval,
        artifact,
        dispose: Vec::new(),
    }))
}

/// [`Store::decide`] inside a transaction.
fn decide(tx: &mut Tx<'_>, cmd: Decide) -> Result<Finished> {
    let at = tx
        .rows
        .approvals
        .iter()
        .position(|approval| approval.id == cmd.request)
        .ok_or_else(|| {
            Error::corruption(format!(
                "approval request {} is indexed but missing",
                cmd.request
            ))
        })?;
    let request = tx.rows.approvals[at].clone();
    if let Some(done) = &request.decision {
        if done.decision != cmd.decision {
            return Err(Error::new(
                ErrorCode::ApprovalConflict,
                format!(
                    "approval request {} was already decided `{}` by {}; `{}` conflicts",
                    request.key,
                    done.decision.as_str(),
                    done.actor,
                    cmd.decision.as_str()
                ),
            )
            .in_phase(request.run, &request.phase)
            .with_hint("a decision is final; read the run's state instead of deciding again"));
        }
        let dispose = match (done.decision.clone(), tx.run().state) {
            (Decision::Reject | Decision::Abort, RunState::Aborted) => {
                tx.rows.sessions.iter().map(|session| session.id).collect()
            }
            _ => Vec::new(),
        };
        return Ok(Finished {
            run: tx.run().clone(),
            approval: Some(request),
            artifact: None,
            dispose,
        });
    }
    if !cmd.decision.fits(request.kind) {
        return Err(Error::new(
            ErrorCode::ApprovalConflict,
            format!(
                "`{}` does not apply to gate `{}`",
                cmd.decision.as_str(),
                request.gate
            ),
        )
        .in_phase(request.run, &request.phase)
        .with_hint(format!(
            "a {} gate takes {}",
            match request.kind {
                GateKind::Workflow => "workflow",
                GateKind::Failure => "failure",
            },
            allowed_decisions(request.kind)
        )));
    }
    let (run_waits_in, phase_waits_in) = match request.kind {
        GateKind::Workflow => (RunState::AwaitingApproval, PhaseState::AwaitingApproval),
        GateKind::Failure => (RunState::Paused, PhaseState::Failed),
    };
    let state = tx.run().state;
    if state != run_waits_in {
        return Err(Error::run_state_changed(request.run, state).with_phase(request.phase));
    }
    let index = tx.phase_index(&request.phase)?;
    let phase = tx.phase(index);
    if tx.run().current_phase.as_ref() != Some(&phase.key)
        || phase.state != phase_waits_in
        || phase.attempts != request.attempt
    {
        return Err(Error::new(
            ErrorCode::ApprovalConflict,
            format!(
                "approval request {} is superseded: the phase is {} at attempt {}",
                request.key, phase.state, phase.attempts
            ),
        )
        .in_phase(request.run, &request.phase)
        .with_hint("decide the run's newest pending request instead"));
    }
    let decided = DecisionRecord {
        decision: cmd.decision.clone(),
        actor: cmd.actor.clone(),
        note: cmd.note,
        at: tx.now,
    };
    tx.rows.approvals[at].decision = Some(decided);
    tx.append(EventKind::ApprovalDecided {
        request: request.id,
        key: request.key.clone(),
        decision: cmd.decision.clone(),
        actor: cmd.actor,
    });
    let waiting: Vec<usize> = (0..tx.rows.sessions.len())
        .filter(|&i| tx.rows.sessions[i].state == SessionState::WaitingForApproval)
        .collect();
    let mut dispose = Vec::new();
    match cmd.decision {
        Decision::Approve => {
            tx.phase_mut(index).state = PhaseState::Completed;
            tx.append(EventKind::PhaseCompleted {
                phase: request.phase.clone(),
                attempt: request.attempt,
            });
            for at in waiting {
                tx.ready_session(at);
            }
            tx.advance(index, Some(request.id));
        }
        Decision::Rework { feedback } => {
            let phase = tx.phase_mut(index);
            phase.state = PhaseState::Pending;
            phase.feedback = Some(feedback);
            for at in waiting {
                tx.ready_session(at);
            }
            tx.rows.run.state = RunState::Executing;
            tx.append(EventKind::RunResumed {
                request: request.id,
                state: RunState::Executing,
            });
        }
        Decision::Retry => {
            let Some(back_to) = tx.run().paused_from else {
                return Err(Error::corruption(format!(
                    "run {} is paused without a paused_from state",
                    request.run
                ))
                .with_run(request.run));
            };
            tx.phase_mut(index).state = PhaseState::Pending;
            let failed: Vec<usize> = (0..tx.rows.sessions.len())
                .filter(|&i| tx.rows.sessions[i].state == SessionState::FailedNeedsHuman)
                .collect();
            for at in failed {
                tx.crash_session(at);
            }
            tx.rows.run.state = back_to;
            tx.rows.run.paused_from = None;
            tx.append(EventKind::RunResumed {
                request: request.id,
                state: back_to,
            });
        }
        Decision::Reject | Decision::Abort => {
            let reason = format!("{}:{}", cmd.decision.as_str(), request.gate);
            dispose = tx.abort_run(reason);
        }
    }
    Ok(Finished {
        run: tx.run().clone(),
        approval: Some(tx.rows.approvals[at].clone()),
        artifact: None,
        dispose,
    })
}
