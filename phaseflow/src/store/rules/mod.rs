//! The rules of every [`Store`](super::Store) command, once, for every store.
//!
//! A store implements a command in three steps, all under the run's lock:
//!
//! 1. **load** a [`Snapshot`] of the run — its row, phases and sessions, plus exactly the
//!    lookups the command's [`Needs`] name (approval requests, whether some event keys are
//!    recorded, the artifact stored under a (path, hash), whether a session id is recorded
//!    anywhere, stored transcript chunks);
//! 2. **decide**: call this module's function for the command ([`begin_attempt`],
//!    [`finish_phase`], …). It checks the run state, the owner, the phase and session states,
//!    builds the events, compares idempotent re-inserts with what is stored, and returns the
//!    command's result together with the [`Changes`] to persist — or an error, having decided
//!    nothing;
//! 3. **persist** the [`Changes`] atomically (or nothing when there are none), skipping events
//!    whose key the run already has.
//!
//! The functions are pure: no I/O, no clock (the snapshot carries `now`), so `MemoryStore` and
//! `PgStore` differ only in how they load and persist, and emit the same events in the same
//! order and fail with the same errors. The conformance suite in `phaseflow-fake` pins the
//! behaviour down through both stores.
//!
//! Choices the [`Store`](super::Store) docs leave open, made here:
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
//!
//! ```
//! use phaseflow::ids::{EngineId, PhaseKey, RunId};
//! use phaseflow::state::{PhaseState, RunState};
//! use phaseflow::store::rules::{self, Needs, Snapshot};
//! use phaseflow::store::{BeginAttempt, BeginOutcome, NewRun, PhaseWork};
//! use time::OffsetDateTime;
//!
//! let now = OffsetDateTime::now_utc();
//! let new = NewRun {
//!     id: RunId::new(),
//!     workflow: "feature".into(),
//!     subject: "TICKET-42".into(),
//!     worktree: "/work/tree".into(),
//!     phases: vec![PhaseKey::new("plan")],
//! };
//! let created = rules::create_run(&new, now)?;
//! let cmd = BeginAttempt {
//!     work: PhaseWork { run: new.id, phase: PhaseKey::new("plan"), owner: EngineId::new() },
//!     repair: false,
//!     reason: "initial".into(),
//!     instructions: "Write the plan.".into(),
//! };
//! assert_eq!(Needs::begin_attempt(&cmd), Needs::default());
//! let snapshot = Snapshot::new(created.run, created.phases, now);
//! let applied = rules::begin_attempt(snapshot, cmd)?;
//! let Some(changes) = applied.changes else { unreachable!("a fresh attempt writes") };
//! assert_eq!(changes.run.state, RunState::Executing);
//! assert_eq!(changes.phases[0].state, PhaseState::Running);
//! let kinds: Vec<&str> = changes.events.iter().map(|(_, kind)| kind.type_name()).collect();
//! assert_eq!(kinds, ["run.started", "phase.started"]);
//! assert!(matches!(applied.output, BeginOutcome::Started(_)));
//! # Ok::<_, phaseflow::Error>(())
//! ```

use std::collections::{HashMap, HashSet};

use time::OffsetDateTime;

use super::{
    ApprovalRecord, ArtifactRecord, BeginAttempt, BeginOutcome, Decide, FinishPhase, Finished,
    MarkBusy, NewRun, OperatorAction, PhaseEnd, PhaseRecord, PhaseWork, RecordPrompt,
    RecordVerdict, RunRecord, SessionEvent, SessionRecord, TranscriptChunk,
};
use crate::error::{Error, ErrorCode, Result};
use crate::event::EventKind;
use crate::ids::{ApprovalId, ContentHash, PhaseKey, RunId, SessionId};
use crate::state::{PhaseState, RunState};

mod commands;
mod tx;

use tx::Tx;

/// How a command finds the run it locks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// By the run's id.
    Run(RunId),
    /// By one of its sessions ([`Store::append_transcript`](super::Store::append_transcript)).
    Session(SessionId),
    /// By one of its approval requests ([`Store::decide`](super::Store::decide)).
    Approval(ApprovalId),
}

impl Target {
    /// The error for a target that names no stored run, session or approval request.
    pub fn not_found(self) -> Error {
        match self {
            Target::Run(run) => run_not_found(run),
            Target::Session(session) => session_not_found(session),
            Target::Approval(request) => approval_not_found(request),
        }
    }
}

/// What a command needs loaded into its [`Snapshot`] besides the run, its phases and sessions.
///
/// One constructor per command; commands without one ([`begin_attempt`], [`claim_phase`],
/// [`record_prompt`], [`operate`]) need nothing more: [`Needs::default`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// Event keys whose presence the command's rules ask about ([`Snapshot::event_keys`]).
    pub event_keys: Vec<String>,
    /// The artifact stored under this (path, hash), if any ([`Snapshot::artifact`]).
    pub artifact: Option<(String, ContentHash)>,
    /// Whether this session id is recorded for any run ([`Snapshot::session_recorded`]).
    pub session: Option<SessionId>,
    /// Stored transcript chunks of this session with these seqs ([`Snapshot::chunks`]).
    pub chunks: Option<(SessionId, Vec<u64>)>,
    /// The run's approval requests ([`Snapshot::approvals`]).
    pub approvals: bool,
}

impl Needs {
    /// What [`begin_attempt`] needs: nothing more.
    pub fn begin_attempt(_cmd: &BeginAttempt) -> Self {
        Self::default()
    }

    /// What [`mark_busy`] needs: whether a started session's id is already recorded.
    pub fn mark_busy(cmd: &MarkBusy) -> Self {
        Self {
            session: Some(cmd.session),
            ..Self::default()
        }
    }

    /// What [`record_session_event`] needs: whether a timeout was already recorded.
    pub fn session_event(work: &PhaseWork, event: &SessionEvent) -> Self {
        match event {
            SessionEvent::ArtifactTimeout { attempt, path } => Self {
                event_keys: vec![
                    commands::timeout_event(work, *attempt, path.clone()).idempotency_key(),
                ],
                ..Self::default()
            },
            SessionEvent::Recovered => Self::default(),
        }
    }

    /// What [`record_verdict`] needs: the artifact stored under the verdict's (path, hash).
    pub fn record_verdict(cmd: &RecordVerdict) -> Self {
        Self {
            artifact: Some((cmd.artifact.path.clone(), cmd.artifact.hash.clone())),
            ..Self::default()
        }
    }

    /// What [`finish_phase`] needs: whether the attempt already completed (or its approval
    /// request exists), the stored verdict and transcript chunks it re-sends.
    pub fn finish_phase(cmd: &FinishPhase) -> Self {
        let event_keys = match &cmd.end {
            PhaseEnd::Complete => vec![
                EventKind::PhaseCompleted {
                    phase: cmd.work.phase.clone(),
                    attempt: cmd.attempt,
                }
                .idempotency_key(),
            ],
            _ => Vec::new(),
        };
        Self {
            event_keys,
            artifact: cmd
                .verdict
                .as_ref()
                .map(|v| (v.path.clone(), v.hash.clone())),
            session: None,
            chunks: cmd
                .session
                .as_ref()
                .filter(|_| !cmd.transcript.is_empty())
                .map(|(id, _)| (*id, cmd.transcript.iter().map(|c| c.seq).collect())),
            approvals: matches!(
                cmd.end,
                PhaseEnd::AwaitApproval { .. } | PhaseEnd::HumanGate { .. }
            ),
        }
    }

    /// What [`decide`] needs: the run's approval requests.
    pub fn decide(_cmd: &Decide) -> Self {
        Self {
            approvals: true,
            ..Self::default()
        }
    }

    /// What [`append_transcript`] needs: the stored chunks with the same seqs.
    pub fn append_transcript(session: SessionId, chunks: &[TranscriptChunk]) -> Self {
        Self {
            chunks: Some((session, chunks.iter().map(|c| c.seq).collect())),
            ..Self::default()
        }
    }
}

/// One run as a command sees it, read under the run's lock: what the command's [`Needs`] named,
/// nothing more.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// The command's clock: `recorded_at`, `created_at`, `last_prompt_at` and decision times.
    pub now: OffsetDateTime,
    /// The run.
    pub run: RunRecord,
    /// Its phases in workflow order.
    pub phases: Vec<PhaseRecord>,
    /// Its sessions, oldest first.
    pub sessions: Vec<SessionRecord>,
    /// Its approval requests, oldest first, when [`Needs::approvals`]; empty otherwise.
    pub approvals: Vec<ApprovalRecord>,
    /// Every key of [`Needs::event_keys`], mapped to whether the run has that event.
    pub event_keys: HashMap<String, bool>,
    /// The artifact stored under [`Needs::artifact`], if any.
    pub artifact: Option<ArtifactRecord>,
    /// Whether the session id of [`Needs::session`] is recorded for any run.
    pub session_recorded: bool,
    /// The stored chunks among [`Needs::chunks`].
    pub chunks: Vec<(SessionId, TranscriptChunk)>,
}

impl Snapshot {
    /// A snapshot of a run, its phases and nothing else (no sessions, approval requests or
    /// lookups yet); fill in the fields the command's [`Needs`] name.
    pub fn new(run: RunRecord, phases: Vec<PhaseRecord>, now: OffsetDateTime) -> Self {
        Self {
            now,
            run,
            phases,
            sessions: Vec::new(),
            approvals: Vec::new(),
            event_keys: HashMap::new(),
            artifact: None,
            session_recorded: false,
            chunks: Vec::new(),
        }
    }
}

/// What a command decided to write; the store persists all of it atomically.
#[derive(Clone, Debug, PartialEq)]
pub struct Changes {
    /// When (the snapshot's `now`): the events' time.
    pub at: OffsetDateTime,
    /// The run row afterwards (whether or not it changed: its event sequence still advances).
    pub run: RunRecord,
    /// Whether the run row changed.
    pub run_changed: bool,
    /// Phases whose row changed.
    pub phases: Vec<PhaseRecord>,
    /// Sessions new or changed (upsert on id; new ones in creation order).
    pub sessions: Vec<SessionRecord>,
    /// Approval requests new or decided (upsert on id; new ones in creation order).
    pub approvals: Vec<ApprovalRecord>,
    /// Events to append in this order, with their idempotency keys. A key the run already has
    /// (one the command did not ask about in its [`Needs`]) must be skipped, not appended again.
    pub events: Vec<(String, EventKind)>,
    /// Artifacts to insert (unique on run, path, hash).
    pub artifacts: Vec<ArtifactRecord>,
    /// Transcript chunks to insert (unique on session, seq).
    pub chunks: Vec<(SessionId, TranscriptChunk)>,
}

impl Changes {
    /// Whether a row other than an event changes. When it does not, and every event turns out
    /// to be recorded already, the command was a replay and writes nothing.
    pub fn changes_rows(&self) -> bool {
        self.run_changed
            || !self.phases.is_empty()
            || !self.sessions.is_empty()
            || !self.approvals.is_empty()
            || !self.artifacts.is_empty()
            || !self.chunks.is_empty()
    }
}

/// A command's result and what it writes.
#[derive(Clone, Debug, PartialEq)]
pub struct Applied<T> {
    /// What the store command returns.
    pub output: T,
    /// What to persist; `None` when the command writes nothing (a replay).
    pub changes: Option<Changes>,
}

/// Runs one command's rules on a working copy of the snapshot.
fn apply<T>(snapshot: Snapshot, command: impl FnOnce(&mut Tx) -> Result<T>) -> Result<Applied<T>> {
    let mut tx = Tx::begin(snapshot);
    let output = command(&mut tx)?;
    Ok(Applied {
        output,
        changes: tx.into_changes(),
    })
}

/// A new run's rows and its first event, as [`create_run`] builds them.
#[derive(Clone, Debug, PartialEq)]
pub struct CreatedRun {
    /// The run, `planning` at its first phase.
    pub run: RunRecord,
    /// Its phases, all `pending`.
    pub phases: Vec<PhaseRecord>,
    /// `run.created` and its idempotency key.
    pub event: (String, EventKind),
}

/// [`Store::create_run`](super::Store::create_run): checks the new run (at least one phase, no
/// duplicate keys) and builds its rows. Insert them unless the id exists; then compare with
/// [`create_run_replay`].
pub fn create_run(new: &NewRun, now: OffsetDateTime) -> Result<CreatedRun> {
    check_new_run(new)?;
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
    Ok(CreatedRun {
        run,
        phases,
        event: (created.idempotency_key(), created),
    })
}

/// A [`create_run`] whose id exists: the stored run when it was created with the same content
/// (a replay), `internal_state_corruption` otherwise.
pub fn create_run_replay(
    new: &NewRun,
    stored: RunRecord,
    stored_phases: &[PhaseKey],
) -> Result<RunRecord> {
    if stored.workflow == new.workflow
        && stored.subject == new.subject
        && stored.worktree == new.worktree
        && stored_phases == new.phases.as_slice()
    {
        return Ok(stored);
    }
    Err(Error::corruption(format!(
        "run {} exists with other content than this create_run",
        new.id
    ))
    .with_run(new.id))
}

fn check_new_run(run: &NewRun) -> Result<()> {
    let problem = if run.phases.is_empty() {
        "has no phases".to_owned()
    } else {
        let mut seen = HashSet::new();
        let Some(duplicate) = run.phases.iter().find(|key| !seen.insert(*key)) else {
            return Ok(());
        };
        format!("lists phase `{duplicate}` twice")
    };
    Err(Error::new(
        ErrorCode::InvalidArgument,
        format!("run {} {problem}", run.id),
    )
    .with_run(run.id)
    .with_hint("a run needs at least one phase and unique phase keys"))
}

/// [`Store::begin_attempt`](super::Store::begin_attempt). Needs [`Needs::begin_attempt`].
pub fn begin_attempt(snapshot: Snapshot, cmd: BeginAttempt) -> Result<Applied<BeginOutcome>> {
    apply(snapshot, |tx| commands::begin_attempt(tx, cmd))
}

/// [`Store::claim_phase`](super::Store::claim_phase). Needs [`Needs::default`].
pub fn claim_phase(snapshot: Snapshot, work: PhaseWork) -> Result<Applied<PhaseRecord>> {
    apply(snapshot, |tx| commands::claim_phase(tx, work))
}

/// [`Store::mark_busy`](super::Store::mark_busy). Needs [`Needs::mark_busy`].
pub fn mark_busy(snapshot: Snapshot, cmd: MarkBusy) -> Result<Applied<SessionRecord>> {
    apply(snapshot, |tx| commands::mark_busy(tx, cmd))
}

/// [`Store::record_prompt`](super::Store::record_prompt). Needs [`Needs::default`].
pub fn record_prompt(snapshot: Snapshot, cmd: RecordPrompt) -> Result<Applied<()>> {
    apply(snapshot, |tx| commands::record_prompt(tx, cmd))
}

/// [`Store::record_session_event`](super::Store::record_session_event). Needs
/// [`Needs::session_event`].
pub fn record_session_event(
    snapshot: Snapshot,
    work: PhaseWork,
    session: SessionId,
    event: SessionEvent,
) -> Result<Applied<SessionRecord>> {
    apply(snapshot, |tx| {
        commands::record_session_event(tx, work, session, event)
    })
}

/// [`Store::record_verdict`](super::Store::record_verdict). Needs [`Needs::record_verdict`].
pub fn record_verdict(snapshot: Snapshot, cmd: RecordVerdict) -> Result<Applied<ArtifactRecord>> {
    apply(snapshot, |tx| commands::record_verdict(tx, cmd))
}

/// [`Store::finish_phase`](super::Store::finish_phase). Needs [`Needs::finish_phase`].
pub fn finish_phase(snapshot: Snapshot, cmd: FinishPhase) -> Result<Applied<Finished>> {
    apply(snapshot, |tx| commands::finish_phase(tx, cmd))
}

/// [`Store::decide`](super::Store::decide) on the snapshot of the request's run. Needs
/// [`Needs::decide`].
pub fn decide(snapshot: Snapshot, cmd: Decide) -> Result<Applied<Finished>> {
    apply(snapshot, |tx| commands::decide(tx, cmd))
}

/// [`Store::operate`](super::Store::operate). Needs [`Needs::default`].
pub fn operate(snapshot: Snapshot, action: OperatorAction) -> Result<Applied<Finished>> {
    apply(snapshot, |tx| commands::operate(tx, action))
}

/// [`Store::append_transcript`](super::Store::append_transcript) on the snapshot of the
/// session's run. Needs [`Needs::append_transcript`].
pub fn append_transcript(
    snapshot: Snapshot,
    session: SessionId,
    chunks: Vec<TranscriptChunk>,
) -> Result<Applied<()>> {
    apply(snapshot, |tx| {
        commands::append_transcript(tx, session, &chunks)
    })
}

/// `run_not_found` for an unknown run id.
pub fn run_not_found(run: RunId) -> Error {
    Error::new(ErrorCode::RunNotFound, format!("no run {run}"))
        .with_run(run)
        .with_hint("check the run id; runs exist once create_run returned")
}

/// `phase_not_found` for a phase the run does not have.
pub fn phase_not_found(run: RunId, phase: &PhaseKey) -> Error {
    Error::new(
        ErrorCode::PhaseNotFound,
        format!("run {run} has no phase `{phase}`"),
    )
    .in_phase(run, phase)
    .with_hint("check that the workflow passed to the engine is the one the run was created with")
}

/// `session_not_found` for an unknown session id.
pub fn session_not_found(session: SessionId) -> Error {
    Error::new(
        ErrorCode::SessionNotFound,
        format!("the store has no session {session}"),
    )
    .with_hint(
        "a session is recorded by mark_busy with origin `Started`; record it before using it",
    )
}

/// `approval_not_found` for an unknown approval request id.
pub fn approval_not_found(request: ApprovalId) -> Error {
    Error::new(
        ErrorCode::ApprovalNotFound,
        format!("no approval request {request}"),
    )
    .with_hint("list the run's pending requests and decide one of those")
}

#[cfg(test)]
mod tests;
