//! The durable store contract: a small set of atomic, idempotent *commands* and some reads.
//!
//! Every command:
//! 1. locks the run (`SELECT … FOR UPDATE` in PostgreSQL, a mutex in memory);
//! 2. fails with `run_not_found` / `phase_not_found` for unknown ids;
//! 3. checks the run state — commands that do phase work ([`PhaseWork`]) require
//!    [`RunState::allows_phase_work`] and otherwise fail with `run_state_changed`
//!    ([`Error::run_state_changed`]) having written nothing;
//! 4. checks that the phase is claimed by the calling engine ([`PhaseWork::owner`]); otherwise
//!    `phase_claimed`, nothing written;
//! 5. writes rows and events together, or nothing at all;
//! 6. is idempotent: event keys
//!    ([`EventKind::idempotency_key`](crate::event::EventKind::idempotency_key)) are unique per
//!    run and re-appending one is a no-op; artifacts are unique on (run, path, hash), sessions on
//!    (run, role), approval requests on their key, transcript chunks on (session, seq).
//!    Re-inserting any of those with *different* content is `internal_state_corruption`.
//!
//! The rules themselves — steps 2 to 6 applied to a snapshot of the run — live in [`rules`], once
//! for every implementation; a store loads the snapshot and persists the changes. The conformance
//! suite in `phaseflow-fake` pins this behaviour down for every implementation.

use std::fmt::Debug;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::event::{Decision, Event, GateKind, PromptKind, ValidationIssue};
use crate::ids::{
    ApprovalId, ArtifactId, ContentHash, DedupKey, EngineId, GateKey, PhaseKey, RoleKey, RunId,
    SessionId,
};
use crate::state::{PhaseState, RunState, SessionState};

pub mod rules;

/// A run to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRun {
    /// The run id (chosen by the caller so creation can be retried).
    pub id: RunId,
    /// Workflow name.
    pub workflow: String,
    /// What the run is about (`TICKET-42`).
    pub subject: String,
    /// Canonical absolute path of the worktree.
    pub worktree: String,
    /// Phase keys in execution order; at least one, no duplicates.
    pub phases: Vec<PhaseKey>,
}

/// A stored run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRecord {
    /// Id.
    pub id: RunId,
    /// Workflow name.
    pub workflow: String,
    /// Subject.
    pub subject: String,
    /// Canonical absolute worktree path.
    pub worktree: String,
    /// State.
    pub state: RunState,
    /// While paused: the state a retry returns to.
    pub paused_from: Option<RunState>,
    /// The phase being worked on; `None` once the run is terminal.
    pub current_phase: Option<PhaseKey>,
    /// Created at.
    pub created_at: OffsetDateTime,
}

/// A stored phase of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseRecord {
    /// The run.
    pub run: RunId,
    /// The phase key.
    pub key: PhaseKey,
    /// 0-based position in the workflow.
    pub position: u32,
    /// State.
    pub state: PhaseState,
    /// Attempts started so far (the current attempt's number once started).
    pub attempts: u32,
    /// Repair attempts started in the current round (reset by a non-repair attempt).
    pub round_repairs: u32,
    /// Whether the current attempt is a repair.
    pub repair: bool,
    /// The full instructions of the current attempt, as sent; replays re-use them verbatim.
    pub instructions: Option<String>,
    /// Feedback from the last `rework` decision, for the next attempt's instructions.
    pub feedback: Option<String>,
    /// The engine that claimed the current attempt.
    pub owner: Option<EngineId>,
}

/// A stored agent session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    /// Id.
    pub id: SessionId,
    /// The run.
    pub run: RunId,
    /// The role.
    pub role: RoleKey,
    /// State.
    pub state: SessionState,
    /// The dedup key of the last prompt marked busy.
    pub last_dedup: Option<DedupKey>,
    /// When the last prompt was marked busy.
    pub last_prompt_at: Option<OffsetDateTime>,
    /// Recoveries so far.
    pub recovery_attempts: u32,
    /// Sequence number of the last transcript chunk stored (0 = none).
    pub last_capture_seq: u64,
}

/// An artifact verdict to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewArtifact {
    /// Canonical absolute path.
    pub path: String,
    /// sha256 of the bytes.
    pub hash: ContentHash,
    /// Schema id.
    pub schema_id: String,
    /// Size in bytes.
    pub size: u64,
    /// The parsed document, when it was JSON.
    pub content: Option<Value>,
    /// Every validation problem; empty means valid.
    pub errors: Vec<ValidationIssue>,
}

impl NewArtifact {
    /// True when there is no validation problem.
    pub fn is_valid(&self) -> bool {
        self.errors.is_empty()
    }
}

/// A stored artifact (one per run × path × hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactRecord {
    /// Id.
    pub id: ArtifactId,
    /// The run.
    pub run: RunId,
    /// The phase that first recorded it.
    pub phase: PhaseKey,
    /// The attempt that first recorded it.
    pub attempt: u32,
    /// Canonical absolute path.
    pub path: String,
    /// sha256 of the bytes.
    pub hash: ContentHash,
    /// Schema id.
    pub schema_id: String,
    /// Size in bytes.
    pub size: u64,
    /// The parsed document, when it was JSON.
    pub content: Option<Value>,
    /// Every validation problem; empty means valid.
    pub errors: Vec<ValidationIssue>,
    /// Recorded at.
    pub recorded_at: OffsetDateTime,
}

impl ArtifactRecord {
    /// True when there is no validation problem.
    pub fn is_valid(&self) -> bool {
        self.errors.is_empty()
    }

    /// Whether a replayed verdict agrees with this record (same phase, schema, verdict).
    pub fn matches(&self, phase: &PhaseKey, new: &NewArtifact) -> bool {
        &self.phase == phase
            && self.schema_id == new.schema_id
            && self.size == new.size
            && self.errors == new.errors
    }
}

/// A human's recorded decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// The decision.
    pub decision: Decision,
    /// Who decided.
    pub actor: String,
    /// Their note.
    pub note: Option<String>,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// A stored approval request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalRecord {
    /// Id.
    pub id: ApprovalId,
    /// The run.
    pub run: RunId,
    /// The phase.
    pub phase: PhaseKey,
    /// The attempt.
    pub attempt: u32,
    /// The gate.
    pub gate: GateKey,
    /// Workflow or failure gate.
    pub kind: GateKind,
    /// `{run}:{gate}:{phase}:{attempt}`.
    pub key: String,
    /// Artifact id, path, schema, validation errors or failure code and hint.
    pub payload: Value,
    /// The decision, once made.
    pub decision: Option<DecisionRecord>,
    /// Filed at.
    pub created_at: OffsetDateTime,
}

impl ApprovalRecord {
    /// The idempotency key of a request.
    pub fn key_for(run: RunId, gate: &GateKey, phase: &PhaseKey, attempt: u32) -> String {
        format!("{run}:{gate}:{phase}:{attempt}")
    }
}

/// A piece of a session transcript.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TranscriptChunk {
    /// Sequence number, from 1, increasing per session.
    pub seq: u64,
    /// The captured text.
    pub text: String,
}

/// Who does phase work on which phase: every phase-work command carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseWork {
    /// The run.
    pub run: RunId,
    /// The phase.
    pub phase: PhaseKey,
    /// The engine that claimed the phase; the store refuses work from any other.
    pub owner: EngineId,
}

/// Start an attempt of a phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BeginAttempt {
    /// Who and where.
    pub work: PhaseWork,
    /// A repair attempt (allowed from `validating` or `awaiting_artifact`, owner must match)
    /// or a fresh one (allowed from `pending`; claims the phase for `work.owner`).
    pub repair: bool,
    /// Why (`initial`, `rework`, `retry`, `artifact_invalid`, `artifact_timeout`).
    pub reason: String,
    /// The full instructions of this attempt.
    pub instructions: String,
}

/// What [`Store::begin_attempt`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BeginOutcome {
    /// The attempt started: phase `running`, `attempts` bumped, `phase.started` appended (and
    /// `run.started` if the run was planning).
    Started(PhaseRecord),
    /// The phase was not in a state this attempt can start from; nothing was written.
    NotStartable(PhaseRecord),
}

/// How the session for a prompt was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionOrigin {
    /// Started by this engine just now: insert the row, `session.created` + `session.ready`.
    Started,
    /// An existing session was resumed: `session.ready`.
    Resumed,
    /// An existing session already busy with this very prompt (a replay): nothing but the mark.
    Continuing,
}

/// Mark a session busy with a prompt, before sending it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MarkBusy {
    /// Who and where.
    pub work: PhaseWork,
    /// The attempt.
    pub attempt: u32,
    /// The session.
    pub session: SessionId,
    /// Its role.
    pub role: RoleKey,
    /// How it was obtained.
    pub origin: SessionOrigin,
    /// The prompt's dedup key.
    pub dedup: DedupKey,
}

/// Record that a prompt was delivered and the phase now awaits its artifact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordPrompt {
    /// Who and where.
    pub work: PhaseWork,
    /// The attempt.
    pub attempt: u32,
    /// The session.
    pub session: SessionId,
    /// Dedup key.
    pub dedup: DedupKey,
    /// First prompt or repair prompt.
    pub kind: PromptKind,
    /// Canonical artifact path.
    pub artifact_path: String,
    /// Schema id.
    pub schema_id: String,
}

/// A session transition outside the prompt cycle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// The artifact did not appear: `artifact.timeout`, session `ARTIFACT_TIMEOUT`.
    ArtifactTimeout {
        /// The attempt.
        attempt: u32,
        /// Canonical artifact path.
        path: String,
    },
    /// Probe + rebootstrap succeeded: session `READY`, `recovery_attempts + 1`, `session.recovered`.
    Recovered,
}

/// Record a verdict without finishing the phase (the invalid-artifact-then-repair path).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordVerdict {
    /// Who and where.
    pub work: PhaseWork,
    /// The attempt.
    pub attempt: u32,
    /// The session that produced it and the prompt it answered: marked idle (`session.idle`).
    pub session: SessionId,
    /// The prompt it answered.
    pub dedup: DedupKey,
    /// The verdict.
    pub artifact: NewArtifact,
}

/// How a phase attempt ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PhaseEnd {
    /// Valid artifact, no gate: phase `completed`, session `READY`; the run moves to the next
    /// phase, or `completed` after the last.
    Complete,
    /// Valid artifact, workflow gate: request filed, phase and run `awaiting_approval`,
    /// session `WAITING_FOR_APPROVAL`.
    AwaitApproval {
        /// The gate.
        gate: GateKey,
        /// Request payload.
        payload: Value,
    },
    /// Budget spent or session lost: failure request filed, phase `failed`, run `paused`
    /// (`paused_from` = its state), session `FAILED_NEEDS_HUMAN` (after `CRASHED` when asked).
    HumanGate {
        /// The gate (an error code such as `artifact_invalid_after_repair`).
        gate: GateKey,
        /// Request payload.
        payload: Value,
        /// Mark the session crashed first.
        crash_session: bool,
    },
    /// Fatal: phase and run `failed`, every session of the run `FAILED_NEEDS_HUMAN`.
    /// On an already terminal run this is a no-op.
    Fail {
        /// The error code.
        reason: String,
    },
}

/// Finish an attempt, optionally recording its verdict and transcript in the same transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FinishPhase {
    /// Who and where.
    pub work: PhaseWork,
    /// The attempt.
    pub attempt: u32,
    /// The session involved and the prompt it last worked on, if any.
    pub session: Option<(SessionId, Option<DedupKey>)>,
    /// A verdict to record first (as [`Store::record_verdict`] would).
    pub verdict: Option<NewArtifact>,
    /// How it ends.
    pub end: PhaseEnd,
    /// Transcript chunks captured at the end (as [`Store::append_transcript`] would).
    pub transcript: Vec<TranscriptChunk>,
}

/// What [`Store::finish_phase`] or [`Store::decide`] left behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finished {
    /// The run afterwards.
    pub run: RunRecord,
    /// The approval request filed or decided, if any.
    pub approval: Option<ApprovalRecord>,
    /// The artifact recorded, if any.
    pub artifact: Option<ArtifactRecord>,
    /// Sessions now `FAILED_NEEDS_HUMAN` that the caller must dispose of in the runtime.
    pub dispose: Vec<SessionId>,
}

/// Decide an approval request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decide {
    /// The request.
    pub request: ApprovalId,
    /// The decision; must fit the gate kind (`approval_conflict` otherwise).
    pub decision: Decision,
    /// Who decided.
    pub actor: String,
    /// Their note.
    pub note: Option<String>,
}

/// What an operator does to a run from outside the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OperatorAction {
    /// Pause a planning/executing/awaiting_approval run (`run.paused`, `paused_from` kept).
    Pause {
        /// Why.
        reason: String,
    },
    /// Abort a non-terminal run (`run.aborted`, sessions `FAILED_NEEDS_HUMAN`).
    Abort {
        /// Why.
        reason: String,
    },
}

/// The durable store behind an engine. See the module docs for the rules every command follows.
#[async_trait]
pub trait Store: Send + Sync + Debug + 'static {
    /// Creates a run with its phases (all `pending`, run `planning`, `run.created`).
    /// Replaying with the same content returns the stored run; different content is
    /// `internal_state_corruption`.
    async fn create_run(&self, run: NewRun) -> Result<RunRecord>;

    /// Starts an attempt; see [`BeginAttempt`] and [`BeginOutcome`]. A fresh attempt resets
    /// `round_repairs` to 0, clears `feedback` and claims the phase; a repair bumps `round_repairs`.
    async fn begin_attempt(&self, cmd: BeginAttempt) -> Result<BeginOutcome>;

    /// Makes `work.owner` the engine of the phase (a resume taking over after a crash).
    /// Requires the run to allow phase work.
    async fn claim_phase(&self, work: PhaseWork) -> Result<PhaseRecord>;

    /// Inserts or updates the session per [`SessionOrigin`], sets it `BUSY` with `dedup` and
    /// `last_prompt_at = now`, appends `session.busy`.
    async fn mark_busy(&self, cmd: MarkBusy) -> Result<SessionRecord>;

    /// Appends `prompt.sent` / `prompt.repaired` and `artifact.expected`; phase `awaiting_artifact`.
    async fn record_prompt(&self, cmd: RecordPrompt) -> Result<()>;

    /// Records a session transition; see [`SessionEvent`].
    async fn record_session_event(
        &self,
        work: PhaseWork,
        session: SessionId,
        event: SessionEvent,
    ) -> Result<SessionRecord>;

    /// Inserts the artifact idempotently, appends `artifact.validated` / `artifact.invalid`,
    /// marks the session idle, phase `validating`.
    async fn record_verdict(&self, cmd: RecordVerdict) -> Result<ArtifactRecord>;

    /// Ends an attempt; see [`PhaseEnd`].
    async fn finish_phase(&self, cmd: FinishPhase) -> Result<Finished>;

    /// Records a decision once. The same decision again is a no-op returning the stored state;
    /// a different one is `approval_conflict`.
    ///
    /// - approve: phase `completed`, session `READY`, run `executing` at the next phase (or
    ///   `completed`);
    /// - rework: phase `pending` with `feedback`, session `READY`, run `executing`;
    /// - reject / abort: run `aborted`, sessions `FAILED_NEEDS_HUMAN` (returned for disposal);
    /// - retry: phase `pending`, the phase's `FAILED_NEEDS_HUMAN` session `CRASHED` (to be
    ///   resumed), run back to `paused_from` (`run.resumed`).
    async fn decide(&self, cmd: Decide) -> Result<Finished>;

    /// An operator's pause or abort; see [`OperatorAction`].
    async fn operate(&self, run: RunId, action: OperatorAction) -> Result<Finished>;

    /// Stores transcript chunks (any run state: a transcript is evidence, not phase work) and
    /// advances `last_capture_seq`.
    async fn append_transcript(
        &self,
        session: SessionId,
        chunks: Vec<TranscriptChunk>,
    ) -> Result<()>;

    /// The run.
    async fn run(&self, run: RunId) -> Result<RunRecord>;

    /// The run's phases in workflow order.
    async fn phases(&self, run: RunId) -> Result<Vec<PhaseRecord>>;

    /// The run's session for a role, if one was recorded.
    async fn session(&self, run: RunId, role: &RoleKey) -> Result<Option<SessionRecord>>;

    /// All sessions of the run.
    async fn sessions(&self, run: RunId) -> Result<Vec<SessionRecord>>;

    /// Events with `seq > after`, in order.
    async fn events(&self, run: RunId, after: u64) -> Result<Vec<Event>>;

    /// The run's approval requests, oldest first.
    async fn approvals(&self, run: RunId) -> Result<Vec<ApprovalRecord>>;

    /// One approval request.
    async fn approval(&self, id: ApprovalId) -> Result<ApprovalRecord>;

    /// The most recently recorded artifact of a phase.
    async fn latest_artifact(&self, run: RunId, phase: &PhaseKey)
    -> Result<Option<ArtifactRecord>>;

    /// The stored transcript of a session, in order.
    async fn transcript(&self, session: SessionId) -> Result<Vec<TranscriptChunk>>;
}

/// Reads one phase of a run.
pub async fn phase_of(store: &dyn Store, run: RunId, phase: &PhaseKey) -> Result<PhaseRecord> {
    store
        .phases(run)
        .await?
        .into_iter()
        .find(|p| &p.key == phase)
        .ok_or_else(|| {
            Error::new(
                crate::error::ErrorCode::PhaseNotFound,
                format!("run {run} has no phase `{phase}`"),
            )
            .with_run(run)
            .with_hint(
                "check that the workflow passed to the engine is the one the run was created with",
            )
        })
}
