//! The phase executor: one small state machine per phase attempt.
//!
//! [`Engine::execute_phase`] walks the `Step`s of DESIGN.md "One phase, step by step": enter
//! (or replay), acquire the session, send the prompt, await the artifact, validate it, route
//! the verdict. Every failure of the agent side goes through one function, `policy`, which
//! maps (stage, error class) to stop / human gate / fail. Store errors are never "handled": the
//! store is the source of truth, so the executor stops and a later resume replays from it.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tracing::{Instrument, debug, info_span, warn};

use crate::artifact::{
    self, ArtifactLocation, ArtifactWatch, CompiledSchema, DEFAULT_MAX_ARTIFACT_BYTES, WaitOptions,
    WaitOutcome,
};
use crate::envelope::EnvelopeContent;
use crate::error::{Error, ErrorClass, ErrorCode, Result};
use crate::event::{Decision, PromptKind};
use crate::ids::{ApprovalId, EngineId, GateKey, PhaseKey, RoleKey, RunId, SessionId};
use crate::session::{SessionRuntime, StartSession};
use crate::spec::{PhaseSpec, WorkflowSpec};
use crate::state::{PhaseState, SessionState};
use crate::store::{
    ApprovalRecord, ArtifactRecord, BeginAttempt, BeginOutcome, Decide, FinishPhase, Finished,
    MarkBusy, NewArtifact, NewRun, OperatorAction, PhaseEnd, PhaseRecord, PhaseWork, RecordPrompt,
    RecordVerdict, RunRecord, SessionEvent, SessionOrigin, SessionRecord, Store, TranscriptChunk,
    phase_of,
};

/// Separates an attempt's base instructions from the repair note appended to them.
const REPAIR_MARKER: &str = "\n\n--- phaseflow: repair ---\n";
/// Separates the caller's instructions from a reviewer's rework feedback.
const FEEDBACK_MARKER: &str = "\n\n--- phaseflow: reviewer feedback ---\n";

/// Compiled schemas by (schema id, schema text).
type SchemaCache = HashMap<(&'static str, &'static str), Arc<CompiledSchema>>;

/// Budgets and timeouts of an engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineOptions {
    /// Extra `send_prompt` tries after a recoverable failure (the predecessor's 2).
    pub send_retries: u32,
    /// Extra `start` / `resume` tries after a recoverable failure.
    pub session_retries: u32,
    /// Extra `rebootstrap` tries after a recoverable failure (the predecessor's 1).
    pub rebootstrap_retries: u32,
    /// How the artifact is awaited.
    pub wait: WaitOptions,
    /// Artifacts larger than this are recorded as invalid.
    pub max_artifact_bytes: u64,
    /// While waiting for an artifact, how often to check that the run is still executing, so
    /// an operator's pause or abort stops the phase without waiting for the artifact timeout.
    pub run_check_interval: Duration,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            send_retries: 2,
            session_retries: 2,
            rebootstrap_retries: 1,
            wait: WaitOptions::default(),
            max_artifact_bytes: DEFAULT_MAX_ARTIFACT_BYTES,
            run_check_interval: Duration::from_secs(2),
        }
    }
}

impl EngineOptions {
    /// Sets how long an attempt waits for its artifact before the timeout path.
    pub fn with_artifact_timeout(mut self, timeout: Duration) -> Self {
        self.wait.timeout = timeout;
        self
    }
}

/// How a phase execution ended. Fatal errors, `run_state_changed` and store failures are `Err`.
#[derive(Debug)]
pub enum PhaseOutcome {
    /// Valid artifact, no gate: the phase completed and the run moved on (or completed).
    Completed {
        /// The accepted artifact.
        artifact: ArtifactRecord,
        /// The run afterwards.
        run: RunRecord,
    },
    /// Valid artifact behind a workflow gate: the run waits for a human decision.
    AwaitingApproval {
        /// The artifact under review.
        artifact: ArtifactRecord,
        /// The filed request.
        approval: ApprovalRecord,
    },
    /// A failure gate: the run is paused until a human decides retry or abort.
    NeedsHuman {
        /// The filed request.
        approval: ApprovalRecord,
        /// Why.
        error: Error,
    },
}

/// Drives phases of runs against a [`Store`] and a [`SessionRuntime`]. Cheap to clone.
///
/// An engine has an identity ([`EngineId`]); the store fences each in-flight phase to the
/// engine that started it, so two engines never both work on one attempt. After a crash a new
/// engine takes over with [`Engine::resume_phase`].
#[derive(Clone, Debug)]
pub struct Engine {
    id: EngineId,
    store: Arc<dyn Store>,
    sessions: Arc<dyn SessionRuntime>,
    options: EngineOptions,
    schemas: Arc<Mutex<SchemaCache>>,
    workflows: Arc<Vec<WorkflowSpec>>,
}

impl Engine {
    /// An engine with default options.
    pub fn new(store: Arc<dyn Store>, sessions: Arc<dyn SessionRuntime>) -> Self {
        Self {
            id: EngineId::new(),
            store,
            sessions,
            options: EngineOptions::default(),
            schemas: Arc::default(),
            workflows: Arc::default(),
        }
    }

    /// Replaces the options.
    pub fn with_options(mut self, options: EngineOptions) -> Self {
        self.options = options;
        self
    }

    /// Registers a workflow so that [`Engine::resume_any`] can continue its runs without the
    /// caller naming the workflow type. Registering a name twice keeps the last spec.
    pub fn with_workflow(mut self, workflow: WorkflowSpec) -> Self {
        let mut workflows: Vec<WorkflowSpec> = self
            .workflows
            .iter()
            .filter(|w| w.name() != workflow.name())
            .copied()
            .collect();
        workflows.push(workflow);
        self.workflows = Arc::new(workflows);
        self
    }

    /// The registered workflow with that name.
    pub fn workflow(&self, name: &str) -> Option<&WorkflowSpec> {
        self.workflows.iter().find(|w| w.name() == name)
    }

    /// This engine's identity (the owner it claims phases as).
    pub fn id(&self) -> EngineId {
        self.id
    }

    /// The options.
    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The session runtime.
    pub fn sessions(&self) -> &Arc<dyn SessionRuntime> {
        &self.sessions
    }

    /// Creates a run of `workflow` about `subject` in `worktree`.
    ///
    /// Checks up front that the worktree exists, that every phase's artifact path stays inside
    /// it and that every schema compiles, so a bad workflow fails here rather than mid-run.
    pub async fn create_run(
        &self,
        workflow: &WorkflowSpec,
        subject: &str,
        worktree: &Path,
    ) -> Result<RunRecord> {
        if workflow.phases().is_empty() {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!("workflow `{}` has no phases", workflow.name()),
            )
            .with_hint("declare at least one phase"));
        }
        let mut canonical = None;
        for spec in workflow.phases() {
            let location = ArtifactLocation::resolve(worktree, spec.artifact())?;
            self.schema(spec)?;
            canonical.get_or_insert_with(|| location.worktree().to_path_buf());
        }
        let worktree = canonical.unwrap_or_else(|| worktree.to_path_buf());
        self.store
            .create_run(NewRun {
                id: RunId::new(),
                workflow: workflow.name().to_owned(),
                subject: subject.to_owned(),
                worktree: worktree.to_string_lossy().into_owned(),
                phases: workflow.phase_keys(),
            })
            .await
    }

    /// Executes one phase of a run: starts an attempt if the phase is pending, otherwise
    /// continues the attempt this engine already started (an in-process retry). A phase that
    /// another engine started is refused with `phase_claimed`; use [`Engine::resume_phase`]
    /// after that engine is gone.
    ///
    /// `instructions` are used for a new attempt only; a replayed attempt re-sends exactly what
    /// it sent before (the stored instructions), so its dedup key cannot change.
    pub async fn execute_phase(
        &self,
        run: RunId,
        spec: &PhaseSpec,
        instructions: &str,
    ) -> Result<PhaseOutcome> {
        self.drive(run, spec, instructions, false).await
    }

    /// Takes the phase over from whichever engine had it (after a crash) and continues it from
    /// its persisted state, following DESIGN.md's replay table. Starts it if it is pending.
    pub async fn resume_phase(
        &self,
        run: RunId,
        spec: &PhaseSpec,
        instructions: &str,
    ) -> Result<PhaseOutcome> {
        self.drive(run, spec, instructions, true).await
    }

    /// Records a human decision on an approval request and disposes of the sessions it stopped.
    pub async fn decide(
        &self,
        request: ApprovalId,
        decision: Decision,
        actor: &str,
        note: Option<&str>,
    ) -> Result<Finished> {
        let finished = self
            .store
            .decide(Decide {
                request,
                decision,
                actor: actor.to_owned(),
                note: note.map(str::to_owned),
            })
            .await?;
        self.dispose_all(&finished.dispose).await;
        Ok(finished)
    }

    /// Pauses or aborts a run from outside (an operator), disposing of stopped sessions.
    /// A phase in flight notices at its next store command and stops with `run_state_changed`.
    pub async fn operate(&self, run: RunId, action: OperatorAction) -> Result<Finished> {
        let finished = self.store.operate(run, action).await?;
        self.dispose_all(&finished.dispose).await;
        Ok(finished)
    }

    async fn drive(
        &self,
        run: RunId,
        spec: &PhaseSpec,
        instructions: &str,
        takeover: bool,
    ) -> Result<PhaseOutcome> {
        let span = info_span!("phase", run = %run, phase = spec.key_str(), engine = %self.id);
        async {
            let record = self.store.run(run).await?;
            let phase = spec.key();
            let work = PhaseWork {
                run,
                phase: phase.clone(),
                owner: self.id,
            };
            if takeover {
                self.store.claim_phase(work.clone()).await?;
            }
            let executor = Executor {
                engine: self,
                spec,
                role: spec.role(),
                location: ArtifactLocation::resolve(Path::new(&record.worktree), spec.artifact())
                    .map_err(|e| e.in_phase(run, &phase))?,
                schema: self.schema(spec).map_err(|e| e.in_phase(run, &phase))?,
                work,
                phase,
                instructions,
            };
            executor.run().await
        }
        .instrument(span)
        .await
    }

    fn schema(&self, spec: &PhaseSpec) -> Result<Arc<CompiledSchema>> {
        let key = (spec.schema_id(), spec.schema());
        let mut cache = self
            .schemas
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(schema) = cache.get(&key) {
            return Ok(schema.clone());
        }
        let schema = Arc::new(CompiledSchema::compile(spec.schema_id(), spec.schema())?);
        cache.insert(key, schema.clone());
        Ok(schema)
    }

    async fn dispose_all(&self, sessions: &[SessionId]) {
        for session in sessions {
            if let Err(error) = self.sessions.dispose(*session).await {
                warn!(%session, %error, "disposing a stopped session failed; it may linger in the runtime");
            }
        }
    }
}

/// The attempt being worked on.
#[derive(Clone, Debug)]
struct Attempt {
    number: u32,
    repair: bool,
    round_repairs: u32,
    instructions: String,
}

impl Attempt {
    fn from_record(phase: &PhaseRecord) -> Result<Self> {
        let instructions = phase.instructions.clone().ok_or_else(|| {
            Error::corruption(format!(
                "phase `{}` is {} at attempt {} but has no recorded instructions",
                phase.key, phase.state, phase.attempts
            ))
        })?;
        Ok(Self {
            number: phase.attempts,
            repair: phase.repair,
            round_repairs: phase.round_repairs,
            instructions,
        })
    }

    fn prompt_kind(&self) -> PromptKind {
        if self.repair {
            PromptKind::Repair
        } else {
            PromptKind::Initial
        }
    }
}

/// What went wrong at the end of an attempt that needs a human.
#[derive(Debug)]
struct GateCause {
    error: Error,
    crash_session: bool,
    verdict: Option<NewArtifact>,
}

/// One step of the phase state machine.
#[derive(Debug)]
enum Step {
    /// Start an attempt, or find out where a started one stands.
    Enter,
    /// Start or resume the role's session.
    AcquireSession(Attempt),
    /// Mark busy (unless replaying), send, record.
    SendPrompt {
        attempt: Attempt,
        session: SessionRecord,
        origin: SessionOrigin,
        replay: bool,
    },
    /// Wait for the artifact file (the watch was armed before the prompt went out).
    AwaitArtifact {
        attempt: Attempt,
        session: SessionRecord,
        watch: ArtifactWatch,
    },
    /// Read, hash, parse and validate the file on disk.
    Validate {
        attempt: Attempt,
        session: SessionRecord,
    },
    /// Act on a verdict.
    Route {
        attempt: Attempt,
        session: SessionRecord,
        verdict: NewArtifact,
    },
    /// Probe and rebootstrap the session after a timeout, then repair.
    Recover {
        attempt: Attempt,
        session: SessionRecord,
    },
    /// Start a repair attempt and send its prompt.
    Repair {
        attempt: Attempt,
        session: SessionRecord,
        reason: &'static str,
        note: String,
    },
    /// File a failure gate and pause the run.
    Gate {
        attempt: Attempt,
        session: Option<SessionRecord>,
        cause: GateCause,
    },
    /// Fail the phase and the run.
    Fail {
        attempt: Attempt,
        session: Option<SessionRecord>,
        error: Error,
    },
    /// Stop without writing phase work (the run changed hands or state, or the store failed).
    Stop {
        session: Option<SessionRecord>,
        error: Error,
    },
    /// Finished.
    Done(PhaseOutcome),
}

/// Where on the agent side an error happened; the failure policy depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    SessionStart,
    SessionResume,
    Send,
    Artifact,
    Recover,
}

/// What to do about an agent-side error (after its retry budget, if it had one).
#[derive(Debug, PartialEq, Eq)]
enum Action {
    /// Return the error without writing.
    Stop,
    /// File a failure gate under this code; optionally mark the session crashed first.
    Gate {
        code: ErrorCode,
        crash_session: bool,
    },
    /// Fail the phase and the run.
    Fail,
}

/// The failure policy: one table from (stage, error) to action.
fn policy(stage: Stage, error: &Error) -> Action {
    // The run changed hands or state, or the store itself failed: nothing can be recorded.
    if matches!(
        error.code(),
        ErrorCode::RunStateChanged
            | ErrorCode::PhaseClaimed
            | ErrorCode::StoreUnavailable
            | ErrorCode::StoreDecode
    ) {
        return Action::Stop;
    }
    if error.class() == ErrorClass::Fatal {
        return Action::Fail;
    }
    // Recoverable errors reach the policy only once their retry budget is spent.
    let (code, crash_session) = match stage {
        Stage::SessionStart => (ErrorCode::SessionStartFailed, false),
        Stage::SessionResume => (ErrorCode::SessionResumeFailed, true),
        Stage::Send => (ErrorCode::PromptSendExhausted, true),
        Stage::Recover => (ErrorCode::RebootstrapFailed, false),
        Stage::Artifact => (error.code(), false),
    };
    let code = if error.class() == ErrorClass::HumanRequired && stage != Stage::Artifact {
        error.code()
    } else {
        code
    };
    Action::Gate {
        code,
        crash_session,
    }
}

/// Runs `call` up to `1 + retries` times while it fails with recoverable errors.
async fn with_retries<T, F, Fut>(retries: u32, mut call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut tries = 0;
    loop {
        match call().await {
            Err(error) if error.is_recoverable() && tries < retries => {
                tries += 1;
                debug!(%error, tries, "retrying a recoverable session error");
            }
            other => return other,
        }
    }
}

struct Executor<'a> {
    engine: &'a Engine,
    spec: &'a PhaseSpec,
    phase: PhaseKey,
    role: RoleKey,
    work: PhaseWork,
    location: ArtifactLocation,
    schema: Arc<CompiledSchema>,
    instructions: &'a str,
}

impl Executor<'_> {
    fn store(&self) -> &dyn Store {
        self.engine.store.as_ref()
    }

    fn run_id(&self) -> RunId {
        self.work.run
    }

    async fn run(&self) -> Result<PhaseOutcome> {
        let mut step = Step::Enter;
        loop {
            debug!(step = step_name(&step), "phase step");
            step = match step {
                Step::Done(outcome) => return Ok(outcome),
                Step::Stop { session, error } => {
                    self.capture_detached(session.as_ref()).await;
                    return Err(error.in_phase(self.run_id(), &self.phase));
                }
                step => {
                    let session = step.session().cloned();
                    match self.advance(step).await {
                        Ok(next) => next,
                        // A store command failed (or refused: the run changed state, another
                        // engine took over): nothing more is recorded but the transcript.
                        Err(error) => Step::Stop { session, error },
                    }
                }
            };
        }
    }

    /// One transition. `Err` only for store failures; agent-side failures become steps.
    async fn advance(&self, step: Step) -> Result<Step> {
        match step {
            Step::Enter => self.enter().await,
            Step::AcquireSession(attempt) => self.acquire_session(attempt).await,
            Step::SendPrompt {
                attempt,
                session,
                origin,
                replay,
            } => self.send_prompt(attempt, session, origin, replay).await,
            Step::AwaitArtifact {
                attempt,
                session,
                watch,
            } => self.await_artifact(attempt, session, watch).await,
            Step::Validate { attempt, session } => self.validate(attempt, session).await,
            Step::Route {
                attempt,
                session,
                verdict,
            } => self.route(attempt, session, verdict).await,
            Step::Recover { attempt, session } => self.recover(attempt, session).await,
            Step::Repair {
                attempt,
                session,
                reason,
                note,
            } => self.repair(attempt, session, reason, note).await,
            Step::Gate {
                attempt,
                session,
                cause,
            } => self.gate(attempt, session, cause).await,
            Step::Fail {
                attempt,
                session,
                error,
            } => self.fail(attempt, session, error).await,
            Step::Stop { .. } | Step::Done(_) => Err(Error::corruption(
                "phase step machine re-entered a final step",
            )),
        }
    }

    /// Routes an agent-side error through the policy.
    fn on_error(
        &self,
        stage: Stage,
        attempt: Attempt,
        session: Option<SessionRecord>,
        error: Error,
    ) -> Step {
        let error = error.in_phase(self.run_id(), &self.phase);
        match policy(stage, &error) {
            Action::Stop => Step::Stop { session, error },
            Action::Fail => Step::Fail {
                attempt,
                session,
                error,
            },
            Action::Gate {
                code,
                crash_session,
            } => {
                let error = if error.code() == code {
                    error.with_class(ErrorClass::HumanRequired)
                } else {
                    Error::new(
                        code,
                        format!("{} gave up: {}", stage_name(stage), error.message()),
                    )
                    .in_phase(self.run_id(), &self.phase)
                    .with_hint(
                        error
                            .hint()
                            .unwrap_or("check the agent session, then decide retry or abort")
                            .to_owned(),
                    )
                    .with_source(error)
                };
                Step::Gate {
                    attempt,
                    session,
                    cause: GateCause {
                        error,
                        crash_session,
                        verdict: None,
                    },
                }
            }
        }
    }

    fn envelope(&self, attempt: &Attempt) -> EnvelopeContent {
        EnvelopeContent {
            run: self.run_id(),
            role: self.role.clone(),
            phase: self.phase.clone(),
            attempt: attempt.number,
            artifact_path: self.location.path_string(),
            schema_id: self.schema.id().to_owned(),
            instructions: attempt.instructions.clone(),
        }
    }

    async fn enter(&self) -> Result<Step> {
        let phase = phase_of(self.store(), self.run_id(), &self.phase).await?;
        if phase.state == PhaseState::Pending {
            let instructions = match &phase.feedback {
                Some(feedback) => format!("{}{FEEDBACK_MARKER}{feedback}", self.instructions),
                None => self.instructions.to_owned(),
            };
            let reason = match (&phase.feedback, phase.attempts) {
                (Some(_), _) => "rework",
                (None, 0) => "initial",
                (None, _) => "retry",
            };
            let begun = self
                .store()
                .begin_attempt(BeginAttempt {
                    work: self.work.clone(),
                    repair: false,
                    reason: reason.to_owned(),
                    instructions,
                })
                .await?;
            return match begun {
                BeginOutcome::Started(phase) => {
                    Ok(Step::AcquireSession(Attempt::from_record(&phase)?))
                }
                BeginOutcome::NotStartable(phase) => self.replay(phase).await,
            };
        }
        self.replay(phase).await
    }

    /// DESIGN.md "Replay after a crash": continue an attempt from its persisted state.
    async fn replay(&self, phase: PhaseRecord) -> Result<Step> {
        if let Some(outcome) = self.finished_outcome(&phase).await? {
            return Ok(Step::Done(outcome));
        }
        if phase.owner != Some(self.engine.id) {
            return Err(Error::new(
                ErrorCode::PhaseClaimed,
                format!(
                    "phase `{}` attempt {} is being executed by another engine",
                    phase.key, phase.attempts
                ),
            )
            .with_hint("let that engine finish, or call resume_phase if it crashed"));
        }
        let attempt = Attempt::from_record(&phase)?;
        let dedup = self.envelope(&attempt).dedup_key();
        let session = self.store().session(self.run_id(), &self.role).await?;
        let busy_with_this_prompt = |s: &SessionRecord| {
            s.last_dedup.as_ref() == Some(&dedup) && s.state != SessionState::FailedNeedsHuman
        };
        let corrupt = |why: &str| {
            Error::corruption(format!(
                "cannot replay phase `{}` ({} at attempt {}): {why}",
                phase.key, phase.state, attempt.number
            ))
        };
        match (phase.state, session) {
            (PhaseState::Running, None) => Ok(Step::AcquireSession(attempt)),
            (PhaseState::Running, Some(s))
                if matches!(
                    s.state,
                    SessionState::Created
                        | SessionState::Bootstrapping
                        | SessionState::Ready
                        | SessionState::Crashed
                ) =>
            {
                Ok(Step::AcquireSession(attempt))
            }
            (PhaseState::Running, Some(s))
                if s.state == SessionState::Busy && busy_with_this_prompt(&s) =>
            {
                Ok(Step::SendPrompt {
                    attempt,
                    session: s,
                    origin: SessionOrigin::Continuing,
                    replay: true,
                })
            }
            (PhaseState::AwaitingArtifact, Some(s)) if busy_with_this_prompt(&s) => {
                Ok(Step::AwaitArtifact {
                    attempt,
                    session: s,
                    watch: ArtifactWatch::arm(&self.location, None),
                })
            }
            (PhaseState::Validating, Some(s)) if busy_with_this_prompt(&s) => {
                let recorded = self
                    .store()
                    .latest_artifact(self.run_id(), &self.phase)
                    .await?;
                match recorded {
                    Some(artifact)
                        if artifact.attempt == attempt.number
                            && s.last_prompt_at.is_none_or(|at| artifact.recorded_at >= at) =>
                    {
                        Ok(Step::Route {
                            attempt,
                            session: s,
                            verdict: verdict_of(artifact),
                        })
                    }
                    _ => Ok(Step::Validate {
                        attempt,
                        session: s,
                    }),
                }
            }
            (_, None) => Err(corrupt("no session is recorded for its role")),
            (_, Some(s)) => Err(corrupt(&format!(
                "the {} session is {} with {} prompt",
                s.role,
                s.state,
                if busy_with_this_prompt(&s) {
                    "this attempt's"
                } else {
                    "another"
                }
            ))),
        }
    }

    /// A phase that already reached a resting state answers with its outcome, so a caller that
    /// crashed right after the finishing commit gets the same answer again.
    async fn finished_outcome(&self, phase: &PhaseRecord) -> Result<Option<PhaseOutcome>> {
        let approvals = || async {
            let approvals = self.store().approvals(self.run_id()).await?;
            Ok::<_, Error>(
                approvals
                    .into_iter()
                    .rev()
                    .find(|a| a.phase == self.phase && a.attempt == phase.attempts),
            )
        };
        let artifact = || async {
            self.store()
                .latest_artifact(self.run_id(), &self.phase)
                .await?
                .ok_or_else(|| {
                    Error::corruption(format!(
                        "phase `{}` is {} but has no recorded artifact",
                        phase.key, phase.state
                    ))
                })
        };
        Ok(Some(match phase.state {
            PhaseState::Completed => PhaseOutcome::Completed {
                artifact: artifact().await?,
                run: self.store().run(self.run_id()).await?,
            },
            PhaseState::AwaitingApproval => match approvals().await? {
                Some(approval) => PhaseOutcome::AwaitingApproval {
                    artifact: artifact().await?,
                    approval,
                },
                None => {
                    return Err(Error::corruption(format!(
                        "phase `{}` awaits approval but no request exists",
                        phase.key
                    )));
                }
            },
            PhaseState::Failed => match approvals().await? {
                Some(approval) if approval.decision.is_none() => {
                    let code = ErrorCode::parse(approval.gate.as_str())
                        .unwrap_or(ErrorCode::PhaseStateMismatch);
                    let error = Error::new(
                        code,
                        format!("phase `{}` waits at gate `{}`", phase.key, approval.gate),
                    )
                    .with_class(ErrorClass::HumanRequired)
                    .in_phase(self.run_id(), &self.phase)
                    .with_hint("decide the approval request: retry or abort");
                    PhaseOutcome::NeedsHuman { approval, error }
                }
                _ => {
                    let run = self.store().run(self.run_id()).await?;
                    return Err(Error::new(
                        ErrorCode::PhaseStateMismatch,
                        format!("phase `{}` failed; the run is {}", phase.key, run.state),
                    )
                    .in_phase(self.run_id(), &self.phase)
                    .with_hint("a failed run cannot continue; start a new run"));
                }
            },
            _ => return Ok(None),
        }))
    }

    async fn acquire_session(&self, attempt: Attempt) -> Result<Step> {
        let existing = self.store().session(self.run_id(), &self.role).await?;
        if let Some(session) = &existing
            && session.state == SessionState::FailedNeedsHuman
        {
            return Ok(Step::Stop {
                session: None,
                error: Error::new(
                    ErrorCode::SessionFailedNeedsHuman,
                    format!(
                        "the {} session {} is FAILED_NEEDS_HUMAN and is not resumed automatically",
                        self.role, session.id
                    ),
                )
                .with_hint("decide the run's pending approval request (retry resets the session)"),
            });
        }
        if let Err(error) = self
            .location
            .remove_stale()
            .and_then(|()| self.location.prepare_parent())
        {
            return Ok(Step::Fail {
                attempt,
                session: existing,
                error,
            });
        }
        let runtime = &self.engine.sessions;
        let retries = self.engine.options.session_retries;
        match existing {
            Some(session) => match with_retries(retries, || runtime.resume(session.id)).await {
                Ok(()) => Ok(Step::SendPrompt {
                    attempt,
                    session,
                    origin: SessionOrigin::Resumed,
                    replay: false,
                }),
                Err(error) => {
                    Ok(self.on_error(Stage::SessionResume, attempt, Some(session), error))
                }
            },
            None => {
                let request = StartSession {
                    id: SessionId::new(),
                    run: self.run_id(),
                    role: self.role.clone(),
                    worktree: self.location.worktree().to_path_buf(),
                };
                match with_retries(retries, || runtime.start(&request)).await {
                    Ok(()) => {
                        let session = SessionRecord {
                            id: request.id,
                            run: self.run_id(),
                            role: self.role.clone(),
                            state: SessionState::Created,
                            last_dedup: None,
                            last_prompt_at: None,
                            recovery_attempts: 0,
                            last_capture_seq: 0,
                        };
                        Ok(Step::SendPrompt {
                            attempt,
                            session,
                            origin: SessionOrigin::Started,
                            replay: false,
                        })
                    }
                    Err(error) => Ok(self.on_error(Stage::SessionStart, attempt, None, error)),
                }
            }
        }
    }

    async fn send_prompt(
        &self,
        attempt: Attempt,
        session: SessionRecord,
        origin: SessionOrigin,
        replay: bool,
    ) -> Result<Step> {
        let envelope = self.envelope(&attempt).into_envelope();
        let (session, baseline) = if replay {
            // The prompt may or may not have reached the agent before the crash: re-send the same
            // envelope (the runtime acknowledges a delivered key without delivering it again) and
            // take no baseline, since the agent may already have written the artifact.
            (session, None)
        } else {
            let session = self
                .store()
                .mark_busy(MarkBusy {
                    work: self.work.clone(),
                    attempt: attempt.number,
                    session: session.id,
                    role: self.role.clone(),
                    origin,
                    dedup: envelope.dedup_key.clone(),
                })
                .await?;
            match self.location.signature() {
                Ok(baseline) => (session, baseline),
                Err(error) => {
                    return Ok(Step::Fail {
                        attempt,
                        session: Some(session),
                        error,
                    });
                }
            }
        };
        // Armed before the prompt goes out, so an agent that writes fast is seen at once.
        let watch = ArtifactWatch::arm(&self.location, baseline.as_ref());
        let runtime = &self.engine.sessions;
        let sent = with_retries(self.engine.options.send_retries, || {
            runtime.send_prompt(session.id, &envelope)
        })
        .await;
        if let Err(error) = sent {
            return Ok(self.on_error(Stage::Send, attempt, Some(session), error));
        }
        self.store()
            .record_prompt(RecordPrompt {
                work: self.work.clone(),
                attempt: attempt.number,
                session: session.id,
                dedup: envelope.dedup_key.clone(),
                kind: attempt.prompt_kind(),
                artifact_path: self.location.path_string(),
                schema_id: self.schema.id().to_owned(),
            })
            .await?;
        Ok(Step::AwaitArtifact {
            attempt,
            session,
            watch,
        })
    }

    /// Waits for the artifact in slices of `run_check_interval`, reading the run between slices:
    /// a run that left `planning`/`executing` ends the wait with `run_state_changed`.
    async fn wait_while_executing(&self, watch: &mut ArtifactWatch) -> Result<WaitOutcome> {
        let options = &self.engine.options;
        let deadline = tokio::time::Instant::now() + options.wait.timeout;
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let slice = WaitOptions {
                timeout: remaining.min(options.run_check_interval),
                ..options.wait.clone()
            };
            match watch.wait(&slice).await? {
                WaitOutcome::TimedOut if tokio::time::Instant::now() < deadline => {
                    let run = self.store().run(self.run_id()).await?;
                    if !run.state.allows_phase_work() {
                        return Err(Error::run_state_changed(run.id, run.state));
                    }
                }
                outcome => return Ok(outcome),
            }
        }
    }

    async fn await_artifact(
        &self,
        attempt: Attempt,
        session: SessionRecord,
        mut watch: ArtifactWatch,
    ) -> Result<Step> {
        match self.wait_while_executing(&mut watch).await {
            Ok(WaitOutcome::Ready) => Ok(Step::Validate { attempt, session }),
            Ok(WaitOutcome::TimedOut) => {
                let session = self
                    .store()
                    .record_session_event(
                        self.work.clone(),
                        session.id,
                        SessionEvent::ArtifactTimeout {
                            attempt: attempt.number,
                            path: self.location.path_string(),
                        },
                    )
                    .await?;
                if attempt.round_repairs >= self.spec.repair_budget() {
                    let error = Error::new(
                        ErrorCode::ArtifactTimeoutExhausted,
                        format!(
                            "no artifact appeared at {} within {:?} and the repair budget ({}) is spent",
                            self.location.path_string(),
                            self.engine.options.wait.timeout,
                            self.spec.repair_budget()
                        ),
                    )
                    .in_phase(self.run_id(), &self.phase)
                    .with_hint("look at the agent's transcript, then decide retry or abort");
                    let cause = GateCause {
                        error,
                        crash_session: false,
                        verdict: None,
                    };
                    return Ok(Step::Gate {
                        attempt,
                        session: Some(session),
                        cause,
                    });
                }
                Ok(Step::Recover { attempt, session })
            }
            Err(error) => Ok(self.on_error(Stage::Artifact, attempt, Some(session), error)),
        }
    }

    async fn validate(&self, attempt: Attempt, session: SessionRecord) -> Result<Step> {
        // Reading and hashing up to the size cap is blocking work.
        let (location, schema) = (self.location.clone(), self.schema.clone());
        let max_bytes = self.engine.options.max_artifact_bytes;
        let inspected =
            tokio::task::spawn_blocking(move || artifact::inspect(&location, &schema, max_bytes))
                .await
                .unwrap_or_else(|join| {
                    Err(Error::new(
                        ErrorCode::WorkspacePermissions,
                        format!("inspecting the artifact did not finish: {join}"),
                    ))
                });
        Ok(match inspected {
            Ok(verdict) => Step::Route {
                attempt,
                session,
                verdict,
            },
            Err(error) => self.on_error(Stage::Artifact, attempt, Some(session), error),
        })
    }

    async fn route(
        &self,
        attempt: Attempt,
        session: SessionRecord,
        verdict: NewArtifact,
    ) -> Result<Step> {
        if verdict.is_valid() {
            let end = match self.spec.approval() {
                Some(gate) => PhaseEnd::AwaitApproval {
                    payload: json!({
                        "path": verdict.path,
                        "hash": verdict.hash,
                        "schema": verdict.schema_id,
                        "attempt": attempt.number,
                    }),
                    gate,
                },
                None => PhaseEnd::Complete,
            };
            let finished = self
                .finish(&attempt, Some(&session), Some(verdict), end)
                .await?;
            let artifact = finished.artifact.ok_or_else(|| {
                Error::corruption("finishing a phase with a verdict recorded no artifact")
            })?;
            return Ok(Step::Done(match finished.approval {
                Some(approval) => PhaseOutcome::AwaitingApproval { artifact, approval },
                None => PhaseOutcome::Completed {
                    artifact,
                    run: finished.run,
                },
            }));
        }
        if attempt.round_repairs < self.spec.repair_budget() {
            let note =
                repair_note_for_invalid(&self.location.path_string(), self.schema.id(), &verdict);
            let dedup = session
                .last_dedup
                .clone()
                .unwrap_or_else(|| self.envelope(&attempt).dedup_key());
            self.store()
                .record_verdict(RecordVerdict {
                    work: self.work.clone(),
                    attempt: attempt.number,
                    session: session.id,
                    dedup,
                    artifact: verdict,
                })
                .await?;
            return Ok(Step::Repair {
                attempt,
                session,
                reason: "artifact_invalid",
                note,
            });
        }
        let error = Error::new(
            ErrorCode::ArtifactInvalidAfterRepair,
            format!(
                "the artifact at {} is still invalid after {} repair prompt(s): {}",
                verdict.path,
                attempt.round_repairs,
                summarize(&verdict)
            ),
        )
        .in_phase(self.run_id(), &self.phase)
        .with_hint(
            "review the validation errors in the approval request, then decide retry or abort",
        );
        Ok(Step::Gate {
            attempt,
            session: Some(session),
            cause: GateCause {
                error,
                crash_session: false,
                verdict: Some(verdict),
            },
        })
    }

    async fn recover(&self, attempt: Attempt, session: SessionRecord) -> Result<Step> {
        let runtime = &self.engine.sessions;
        let probe = match runtime.probe(session.id).await {
            Ok(probe) => probe,
            Err(error) => return Ok(self.on_error(Stage::Recover, attempt, Some(session), error)),
        };
        if !probe.is_usable() {
            let error = Error::new(
                ErrorCode::SessionLost,
                format!(
                    "the {} session {} is not alive after an artifact timeout",
                    self.role, session.id
                ),
            )
            .in_phase(self.run_id(), &self.phase)
            .with_hint(
                "restart the agent, then decide retry (the session will be resumed) or abort",
            );
            return Ok(Step::Gate {
                attempt,
                session: Some(session),
                cause: GateCause {
                    error,
                    crash_session: true,
                    verdict: None,
                },
            });
        }
        if let Err(error) = with_retries(self.engine.options.rebootstrap_retries, || {
            runtime.rebootstrap(session.id)
        })
        .await
        {
            return Ok(self.on_error(Stage::Recover, attempt, Some(session), error));
        }
        let session = self
            .store()
            .record_session_event(self.work.clone(), session.id, SessionEvent::Recovered)
            .await?;
        let note = format!(
            "No artifact appeared at {} within {:?}. Write it now; it must satisfy schema {}.",
            self.location.path_string(),
            self.engine.options.wait.timeout,
            self.schema.id()
        );
        Ok(Step::Repair {
            attempt,
            session,
            reason: "artifact_timeout",
            note,
        })
    }

    async fn repair(
        &self,
        attempt: Attempt,
        session: SessionRecord,
        reason: &'static str,
        note: String,
    ) -> Result<Step> {
        let base = attempt
            .instructions
            .split(REPAIR_MARKER)
            .next()
            .unwrap_or_default();
        let begun = self
            .store()
            .begin_attempt(BeginAttempt {
                work: self.work.clone(),
                repair: true,
                reason: reason.to_owned(),
                instructions: format!("{base}{REPAIR_MARKER}{note}"),
            })
            .await?;
        let attempt = match begun {
            BeginOutcome::Started(phase) => Attempt::from_record(&phase)?,
            BeginOutcome::NotStartable(phase) => {
                return Err(Error::corruption(format!(
                    "a repair attempt of phase `{}` could not start from state {}",
                    phase.key, phase.state
                )));
            }
        };
        if let Err(error) = self.location.remove_stale() {
            return Ok(Step::Fail {
                attempt,
                session: Some(session),
                error,
            });
        }
        Ok(Step::SendPrompt {
            attempt,
            session,
            origin: SessionOrigin::Continuing,
            replay: false,
        })
    }

    async fn gate(
        &self,
        attempt: Attempt,
        session: Option<SessionRecord>,
        cause: GateCause,
    ) -> Result<Step> {
        let GateCause {
            error,
            crash_session,
            verdict,
        } = cause;
        let mut payload = json!({
            "code": error.code(),
            "message": error.message(),
            "hint": error.hint(),
            "path": self.location.path_string(),
            "schema": self.schema.id(),
        });
        if let Some(verdict) = &verdict {
            payload["hash"] = json!(verdict.hash);
            payload["errors"] = json!(verdict.errors);
        }
        let end = PhaseEnd::HumanGate {
            gate: GateKey::new(error.code().as_str()),
            payload,
            crash_session,
        };
        let finished = match self.finish(&attempt, session.as_ref(), verdict, end).await {
            Ok(finished) => finished,
            Err(stop) if policy(Stage::Artifact, &stop) == Action::Stop => {
                return Ok(Step::Stop {
                    session,
                    error: stop,
                });
            }
            Err(other) => return Err(other),
        };
        let approval = finished
            .approval
            .ok_or_else(|| Error::corruption("filing a human gate returned no approval request"))?;
        Ok(Step::Done(PhaseOutcome::NeedsHuman { approval, error }))
    }

    async fn fail(
        &self,
        attempt: Attempt,
        session: Option<SessionRecord>,
        error: Error,
    ) -> Result<Step> {
        let error = error.in_phase(self.run_id(), &self.phase);
        let end = PhaseEnd::Fail {
            reason: error.code().as_str().to_owned(),
        };
        match self.finish(&attempt, session.as_ref(), None, end).await {
            Ok(finished) => {
                self.engine.dispose_all(&finished.dispose).await;
                Ok(Step::Stop {
                    session: None,
                    error,
                })
            }
            Err(stop) if policy(Stage::Artifact, &stop) == Action::Stop => Ok(Step::Stop {
                session,
                error: stop,
            }),
            Err(other) => Err(other),
        }
    }

    /// Ends the attempt in one store command, with the transcript captured so far.
    async fn finish(
        &self,
        attempt: &Attempt,
        session: Option<&SessionRecord>,
        verdict: Option<NewArtifact>,
        end: PhaseEnd,
    ) -> Result<Finished> {
        let transcript = match session {
            Some(session) => self.capture(session).await,
            None => Vec::new(),
        };
        self.store()
            .finish_phase(FinishPhase {
                work: self.work.clone(),
                attempt: attempt.number,
                session: session.map(|s| (s.id, s.last_dedup.clone())),
                verdict,
                end,
                transcript,
            })
            .await
    }

    /// Transcript chunks after the last stored one. A capture failure loses evidence, not work,
    /// so it is logged and the phase goes on.
    ///
    /// Every session record the executor holds was returned by the store, and transcripts are
    /// stored only when an attempt ends, so its `last_capture_seq` is current: no re-read.
    async fn capture(&self, session: &SessionRecord) -> Vec<TranscriptChunk> {
        let from = session.last_capture_seq;
        match self.engine.sessions.capture(session.id, from).await {
            Ok(chunks) => chunks,
            Err(error) => {
                warn!(session = %session.id, %error, "capturing the transcript failed");
                Vec::new()
            }
        }
    }

    /// Captures and stores the transcript on an exit that writes no phase work.
    async fn capture_detached(&self, session: Option<&SessionRecord>) {
        let Some(session) = session else { return };
        let chunks = self.capture(session).await;
        if chunks.is_empty() {
            return;
        }
        if let Err(error) = self.store().append_transcript(session.id, chunks).await {
            warn!(session = %session.id, %error, "storing the transcript failed");
        }
    }
}

fn verdict_of(artifact: ArtifactRecord) -> NewArtifact {
    NewArtifact {
        path: artifact.path,
        hash: artifact.hash,
        schema_id: artifact.schema_id,
        size: artifact.size,
        content: artifact.content,
        errors: artifact.errors,
    }
}

fn summarize(verdict: &NewArtifact) -> String {
    let shown: Vec<String> = verdict
        .errors
        .iter()
        .take(3)
        .map(|issue| format!("{}: {}", pointer_label(&issue.instance_path), issue.message))
        .collect();
    let more = verdict.errors.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} (and {more} more)", shown.join("; "))
    } else {
        shown.join("; ")
    }
}

fn pointer_label(pointer: &str) -> &str {
    if pointer.is_empty() {
        "(document)"
    } else {
        pointer
    }
}

fn repair_note_for_invalid(path: &str, schema: &str, verdict: &NewArtifact) -> String {
    let mut note = format!("The artifact you wrote at {path} is invalid. Problems:\n");
    for issue in &verdict.errors {
        note.push_str(&format!(
            "- {}: {}\n",
            pointer_label(&issue.instance_path),
            issue.message
        ));
    }
    note.push_str(&format!(
        "Write a corrected artifact to the same path; it must satisfy schema {schema}."
    ));
    note
}

impl Step {
    /// The session the step works with, if it has one yet.
    fn session(&self) -> Option<&SessionRecord> {
        match self {
            Step::SendPrompt { session, .. }
            | Step::AwaitArtifact { session, .. }
            | Step::Validate { session, .. }
            | Step::Route { session, .. }
            | Step::Recover { session, .. }
            | Step::Repair { session, .. } => Some(session),
            Step::Gate { session, .. }
            | Step::Fail { session, .. }
            | Step::Stop { session, .. } => session.as_ref(),
            Step::Enter | Step::AcquireSession(_) | Step::Done(_) => None,
        }
    }
}

fn step_name(step: &Step) -> &'static str {
    match step {
        Step::Enter => "enter",
        Step::AcquireSession(_) => "acquire_session",
        Step::SendPrompt { .. } => "send_prompt",
        Step::AwaitArtifact { .. } => "await_artifact",
        Step::Validate { .. } => "validate",
        Step::Route { .. } => "route",
        Step::Recover { .. } => "recover",
        Step::Repair { .. } => "repair",
        Step::Gate { .. } => "gate",
        Step::Fail { .. } => "fail",
        Step::Stop { .. } => "stop",
        Step::Done(_) => "done",
    }
}

fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::SessionStart => "starting the session",
        Stage::SessionResume => "resuming the session",
        Stage::Send => "sending the prompt",
        Stage::Artifact => "handling the artifact",
        Stage::Recover => "recovering the session",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: ErrorCode, class: ErrorClass) -> Error {
        Error::new(code, "x").with_class(class)
    }

    #[test]
    fn policy_stops_on_lost_ownership_or_run_state() {
        for stage in [Stage::SessionStart, Stage::Send, Stage::Artifact] {
            assert_eq!(
                policy(
                    stage,
                    &err(ErrorCode::StoreUnavailable, ErrorClass::Recoverable)
                ),
                Action::Stop
            );
            assert_eq!(
                policy(
                    stage,
                    &err(ErrorCode::RunStateChanged, ErrorClass::HumanRequired)
                ),
                Action::Stop
            );
            assert_eq!(
                policy(
                    stage,
                    &err(ErrorCode::PhaseClaimed, ErrorClass::HumanRequired)
                ),
                Action::Stop
            );
        }
    }

    #[test]
    fn policy_fails_on_fatal_and_gates_on_exhausted_recoverable() {
        assert_eq!(
            policy(
                Stage::Send,
                &err(ErrorCode::PromptSendFailed, ErrorClass::Fatal)
            ),
            Action::Fail
        );
        assert_eq!(
            policy(
                Stage::Send,
                &err(ErrorCode::PromptSendFailed, ErrorClass::Recoverable)
            ),
            Action::Gate {
                code: ErrorCode::PromptSendExhausted,
                crash_session: true
            }
        );
        assert_eq!(
            policy(
                Stage::SessionStart,
                &err(ErrorCode::SessionStartFailed, ErrorClass::Recoverable)
            ),
            Action::Gate {
                code: ErrorCode::SessionStartFailed,
                crash_session: false
            }
        );
        assert_eq!(
            policy(
                Stage::Recover,
                &err(ErrorCode::SessionRuntime, ErrorClass::Recoverable)
            ),
            Action::Gate {
                code: ErrorCode::RebootstrapFailed,
                crash_session: false
            }
        );
    }

    #[tokio::test]
    async fn retries_only_recoverable_errors_within_budget() {
        let calls = std::sync::atomic::AtomicU32::new(0);
        let result: Result<()> = with_retries(2, || {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { Err(err(ErrorCode::PromptSendFailed, ErrorClass::Recoverable)) }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
        calls.store(0, std::sync::atomic::Ordering::SeqCst);
        let _ = with_retries(2, || {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { Err::<(), _>(err(ErrorCode::PromptSendFailed, ErrorClass::Fatal)) }
        })
        .await;
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
