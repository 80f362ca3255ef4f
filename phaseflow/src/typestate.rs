//! The typed API: a run handle `Run<W, S>` whose type says which phase of workflow `W` it is at
//! and in which state `S`, so that the compiler refuses what the engine would refuse at run time.
//!
//! | state `S` | reached by | offers |
//! |---|---|---|
//! | [`Ready<P>`] | [`Engine::start`] (first phase), finishing the previous phase, `rework()`, `retry()`, [`Engine::resume`] | `execute()` → [`Executed::Valid`] or [`Executed::NeedsHuman`] |
//! | [`Validated<P>`] | `execute()` | `output()`, `artifact()`; `complete()` → `Ready<Next>` or [`Completed`] when `P` has no gate; `request_approval()` → `AwaitingApproval<P>` when it has one |
//! | [`AwaitingApproval<P>`] | `request_approval()`, [`Engine::resume`] | `approve()` → `Ready<Next>` or [`Completed`]; `rework()` → `Ready<P>`; `reject()` → [`Ended`]; `decide()`, `decision()`, `wait_decision()` |
//! | [`Paused<P>`] | `execute()` (failure gate), [`Engine::resume`] | `retry()` → `Ready<P>`; `abort()` → [`Ended`]; `gate()`, `decision()`, `wait_decision()` |
//! | [`Completed`], [`Ended`] | the transitions above, [`Engine::resume`] | `record()` |
//!
//! A handle is thin: the [`Engine`], the [`RunId`] and the state's data. All work is done by the
//! engine and persisted by its store; the handle only records, in its type, what the store
//! already says. Every transition consumes `self`, and no state but the first can be built by
//! user code: the only ways to get a `Run` are [`Engine::start`], [`Engine::resume`] and the
//! transitions below.
//!
//! **What the transitions do.** [`Engine::execute_phase`] routes a phase's verdict durably
//! before it returns: a valid artifact of an ungated phase is already *completed* (the run has
//! moved to the next phase), a valid artifact of a gated phase already has its approval request
//! filed. [`Run::complete`] and [`Run::request_approval`] therefore do no I/O: they move the typed
//! handle to match the persisted state (and refuse, at compile time, the one that does not apply
//! to the phase). Decisions ([`Run::approve`], [`Run::rework`], [`Run::reject`], [`Run::retry`],
//! [`Run::abort`]) are recorded through [`Engine::decide`].
//!
//! **Misuse is a compile error with a message.** Each transition is bounded by a sealed trait
//! carrying `#[diagnostic::on_unimplemented]`, e.g. calling `complete()` on a gated phase says
//! "phase `Plan` has an approval gate; call `request_approval()` instead of `complete()`".
//!
//! **Errors consume the handle.** When a transition returns `Err`, the persisted state is the
//! truth: call [`Engine::resume`] to get a handle that matches it.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::engine::{Engine, PhaseOutcome};
use crate::error::{Error, ErrorCode, Result};
use crate::event::{Decision, GateKind};
use crate::ids::{PhaseKey, RunId};
use crate::spec::{PhaseSpec, WorkflowSpec};
use crate::state::{PhaseState, RunState};
use crate::store::{ApprovalRecord, ArtifactRecord, DecisionRecord, OperatorAction, RunRecord};

// ---------------------------------------------------------------------------------------------
// Declarations: what the derives implement.

/// A phase: one agent role producing one JSON artifact. Implement it with `#[derive(Phase)]`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a phaseflow phase",
    label = "not a phase",
    note = "declare it with `#[derive(Phase)]` and `#[phase(key = \"...\", role = \"...\", artifact = \"...\", schema = \"...\", output = ...)]`"
)]
pub trait Phase: 'static {
    /// The runtime description the engine executes.
    const SPEC: PhaseSpec;
    /// The type a validated artifact deserializes into (the `output = ...` of `#[phase]`).
    type Output: DeserializeOwned + Send + 'static;
}

/// A workflow: a name and its phases in order. Implement it with `#[derive(Workflow)]`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a phaseflow workflow",
    label = "not a workflow",
    note = "declare it with `#[derive(Workflow)]` and `#[workflow(name = \"...\", phases(...))]`"
)]
pub trait Workflow: Sized + 'static {
    /// The runtime description the engine executes.
    const SPEC: WorkflowSpec;
    /// The phase a new run starts with.
    type First: InWorkflow<Self>;
    /// Where a run stands, as [`Engine::resume`] returns it: the generated `<Workflow>State` enum.
    type State: WorkflowState<Workflow = Self>;
}

/// Phase `Self` is part of workflow `W`, at position [`InWorkflow::INDEX`]. Implemented by
/// `#[derive(Workflow)]` for each phase in `phases(...)`.
#[diagnostic::on_unimplemented(
    message = "phase `{Self}` is not part of workflow `{W}`",
    label = "`{Self}` is not listed in the `phases(...)` of `{W}`",
    note = "a run of `{W}` only reaches the phases listed in `#[workflow(phases(...))]`, in that order"
)]
pub trait InWorkflow<W: Workflow>: Phase {
    /// 0-based position in the workflow.
    const INDEX: usize;
    /// What finishing this phase leads to: [`Ready`] of the next phase, or [`Completed`].
    type Next: NextStage<W>;
}

/// The phase declares `approval = "..."`: a valid artifact waits for a human decision.
/// Implemented by `#[derive(Phase)]`; do not implement it by hand.
#[diagnostic::on_unimplemented(
    message = "phase `{Self}` has no approval gate, so there is no approval to request",
    label = "`{Self}` declares no `approval = \"...\"` in its `#[phase(...)]`",
    note = "call `complete()` to finish the phase, or add `approval = \"<gate>\"` to its `#[phase(...)]` so that a human reviews it"
)]
pub trait HasApproval: Phase {}

/// The phase declares no `approval`: a valid artifact completes it.
/// Implemented by `#[derive(Phase)]`; do not implement it by hand.
#[diagnostic::on_unimplemented(
    message = "phase `{Self}` has an approval gate; call `request_approval()` instead of `complete()`",
    label = "`{Self}` declares `approval = \"...\"`, so a human must approve it",
    note = "`request_approval()` returns the run awaiting the decision; `approve()` (or `wait_decision()` for a decision made elsewhere) then moves on to the next phase"
)]
pub trait NoApproval: Phase {}

// ---------------------------------------------------------------------------------------------
// States.

mod sealed {
    /// Only this module's state types are states.
    #[allow(unreachable_pub)] // the sealed-trait pattern: public name, private module
    pub trait Sealed {}
}

/// A typestate of a [`Run`] of workflow `W`. Sealed: the states are the types of this module.
pub trait Stage<W: Workflow>: sealed::Sealed + Sized + fmt::Debug {
    /// The phase the run is at (a placeholder that has no instances once it is completed or
    /// ended).
    type Phase: InWorkflow<W>;
}

/// The phase can be executed (or continued after a crash).
pub struct Ready<P> {
    /// Continue a started attempt ([`Engine::resume_phase`]) rather than start one.
    replay: bool,
    /// The feedback of the rework decision that sent the phase back, if that is how it got here.
    feedback: Option<String>,
    phase: PhantomData<fn() -> P>,
}

/// The phase's artifact is valid; its typed output is available.
pub struct Validated<P: Phase> {
    output: P::Output,
    artifact: ArtifactRecord,
    routed: Routed,
}

/// What the engine did with a valid artifact.
#[derive(Debug)]
enum Routed {
    /// No gate: the phase completed; the run afterwards.
    Completed(RunRecord),
    /// Gate: the request it filed.
    AwaitingApproval(ApprovalRecord),
}

/// The phase's valid artifact waits for a human decision at its workflow gate.
pub struct AwaitingApproval<P> {
    approval: ApprovalRecord,
    phase: PhantomData<fn() -> P>,
}

/// The run is paused: a failure gate (repair budget spent, session lost, …) waits for a human to
/// decide retry or abort, or an operator paused it.
pub struct Paused<P> {
    request: Option<ApprovalRecord>,
    error: Option<Error>,
    phase: PhantomData<fn() -> P>,
}

/// Every phase completed.
#[derive(Debug)]
pub struct Completed {
    _private: (),
}

/// The run failed or was aborted (rejected at a gate, aborted at a failure gate or by an operator).
#[derive(Debug)]
pub struct Ended {
    _private: (),
}

impl<P> Ready<P> {
    fn fresh() -> Self {
        Self {
            replay: false,
            feedback: None,
            phase: PhantomData,
        }
    }
}

impl<P> sealed::Sealed for Ready<P> {}
impl<P: Phase> sealed::Sealed for Validated<P> {}
impl<P> sealed::Sealed for AwaitingApproval<P> {}
impl<P> sealed::Sealed for Paused<P> {}
impl sealed::Sealed for Completed {}
impl sealed::Sealed for Ended {}

impl<W: Workflow, P: InWorkflow<W>> Stage<W> for Ready<P> {
    type Phase = P;
}
impl<W: Workflow, P: InWorkflow<W>> Stage<W> for Validated<P> {
    type Phase = P;
}
impl<W: Workflow, P: InWorkflow<W>> Stage<W> for AwaitingApproval<P> {
    type Phase = P;
}
impl<W: Workflow, P: InWorkflow<W>> Stage<W> for Paused<P> {
    type Phase = P;
}
impl<W: Workflow> Stage<W> for Completed {
    type Phase = NoPhase;
}
impl<W: Workflow> Stage<W> for Ended {
    type Phase = NoPhase;
}

/// The phase a run in state `S` is at.
pub type PhaseOf<W, S> = <S as Stage<W>>::Phase;

/// The state that finishing the phase of a run in state `S` leads to.
pub type NextOf<W, S> = <PhaseOf<W, S> as InWorkflow<W>>::Next;

/// A transition in flight; `.await` it. (Boxed rather than `async fn` so that calling a
/// transition in the wrong state is one compile error, not one per use of its future.)
pub type Transition<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// The "phase" of a completed or ended run, and the first phase of a workflow declared without
/// phases (itself a compile error; this keeps it the only one). Cannot be instantiated.
#[doc(hidden)]
#[derive(Debug)]
pub enum NoPhase {}

impl Phase for NoPhase {
    const SPEC: PhaseSpec = PhaseSpec::new("", "", "", "", "");
    type Output = ();
}

impl<W: Workflow> InWorkflow<W> for NoPhase {
    const INDEX: usize = usize::MAX;
    type Next = Completed;
}

/// A state that finishing a phase leads to: [`Ready`] of the next phase, or [`Completed`].
pub trait NextStage<W: Workflow>: Stage<W> {
    #[doc(hidden)]
    fn enter() -> Self;

    /// Whether `run` (as the store left it after the phase finished) agrees with this state.
    #[doc(hidden)]
    fn agrees(run: &RunRecord) -> bool;
}

impl<W: Workflow, P: InWorkflow<W>> NextStage<W> for Ready<P> {
    fn enter() -> Self {
        Self::fresh()
    }

    fn agrees(run: &RunRecord) -> bool {
        run.current_phase
            .as_ref()
            .is_some_and(|k| k == P::SPEC.key_str())
    }
}

impl<W: Workflow> NextStage<W> for Completed {
    fn enter() -> Self {
        Self { _private: () }
    }

    fn agrees(run: &RunRecord) -> bool {
        run.state == RunState::Completed
    }
}

// ---------------------------------------------------------------------------------------------
// What each transition needs, with the message the compiler shows when it is missing.
//
// The traits take the phase as a parameter (always `PhaseOf<W, S>`) so their messages can name it.
// Return types only project through `Stage`, which every state implements: a projection through
// a gate trait would turn a misuse into "method exists but its trait bounds were not satisfied"
// (E0599), which cannot carry a message.

/// `execute()` applies: phase `P` is [`Ready`].
#[diagnostic::on_unimplemented(
    message = "phase `{P}` is not ready to execute in this run",
    label = "this run is `{Self}`; `execute()` needs `Ready<{P}>`",
    note = "a phase is `Ready` when the run starts, after the previous phase completes or is approved, after `rework()` and after `retry()`"
)]
pub trait CanExecute<W: Workflow, P: InWorkflow<W>>: Stage<W> {
    #[doc(hidden)]
    fn into_ready(self) -> Ready<P>;
}

impl<W: Workflow, P: InWorkflow<W>> CanExecute<W, P> for Ready<P> {
    fn into_ready(self) -> Ready<P> {
        self
    }
}

/// `output()` applies: the artifact of phase `P` is validated.
#[diagnostic::on_unimplemented(
    message = "phase `{P}` has no validated artifact in this run, so there is no output to read",
    label = "this run is `{Self}`; `output()` needs `Validated<{P}>`",
    note = "call `execute()` and match `Executed::Valid(run)`: the typed output exists only once the artifact is valid"
)]
pub trait HasOutput<W: Workflow, P: InWorkflow<W>>: Stage<W> {
    #[doc(hidden)]
    fn output(&self) -> &P::Output;
    #[doc(hidden)]
    fn artifact(&self) -> &ArtifactRecord;
    #[doc(hidden)]
    fn into_output(self) -> P::Output;
}

impl<W: Workflow, P: InWorkflow<W>> HasOutput<W, P> for Validated<P> {
    fn output(&self) -> &P::Output {
        &self.output
    }
    fn artifact(&self) -> &ArtifactRecord {
        &self.artifact
    }
    fn into_output(self) -> P::Output {
        self.output
    }
}

/// `complete()` applies: the artifact of phase `P` is validated and `P` has no approval gate.
#[diagnostic::on_unimplemented(
    message = "cannot complete phase `{P}`: its artifact is not validated in this run",
    label = "this run is `{Self}`; `complete()` needs `Validated<{P}>`",
    note = "call `execute()` and match `Executed::Valid(run)` first; a phase with an approval gate then goes through `request_approval()` and `approve()`"
)]
pub trait CanComplete<W: Workflow, P: InWorkflow<W>>: Stage<W> {
    #[doc(hidden)]
    fn complete(self, run: RunId) -> Result<P::Next>;
}

impl<W: Workflow, P: InWorkflow<W> + NoApproval> CanComplete<W, P> for Validated<P> {
    fn complete(self, run: RunId) -> Result<P::Next> {
        match self.routed {
            Routed::Completed(record) if P::Next::agrees(&record) => Ok(P::Next::enter()),
            routed => Err(disagreement::<P>(run, "completed", &routed)),
        }
    }
}

/// `request_approval()` applies: the artifact of phase `P` is validated and `P` has a gate.
#[diagnostic::on_unimplemented(
    message = "cannot request approval for phase `{P}`: its artifact is not validated in this run",
    label = "this run is `{Self}`; `request_approval()` needs `Validated<{P}>`",
    note = "call `execute()` and match `Executed::Valid(run)` first"
)]
pub trait CanRequestApproval<W: Workflow, P: InWorkflow<W>>: Stage<W> {
    #[doc(hidden)]
    fn request(self, run: RunId) -> Result<AwaitingApproval<P>>;
}

impl<W: Workflow, P: InWorkflow<W> + HasApproval> CanRequestApproval<W, P> for Validated<P> {
    fn request(self, run: RunId) -> Result<AwaitingApproval<P>> {
        match self.routed {
            Routed::AwaitingApproval(approval) => Ok(AwaitingApproval {
                approval,
                phase: PhantomData,
            }),
            routed => Err(disagreement::<P>(run, "awaiting approval", &routed)),
        }
    }
}

/// `approve()`, `rework()`, `reject()` and `decide()` apply: phase `P` waits at its workflow gate.
#[diagnostic::on_unimplemented(
    message = "phase `{P}` is not waiting for an approval decision in this run",
    label = "this run is `{Self}`; approve, rework and reject need `AwaitingApproval<{P}>`",
    note = "a validated phase with an approval gate gets there through `request_approval()`; `Engine::resume` returns it as `PhaseAt::AwaitingApproval`"
)]
pub trait CanDecide<W: Workflow, P: InWorkflow<W>>: Stage<W> {
    #[doc(hidden)]
    fn into_awaiting(self) -> AwaitingApproval<P>;
}

impl<W: Workflow, P: InWorkflow<W>> CanDecide<W, P> for AwaitingApproval<P> {
    fn into_awaiting(self) -> Self {
        self
    }
}

/// `retry()` and `abort()` apply: the run is paused at phase `P`.
#[diagnostic::on_unimplemented(
    message = "phase `{P}` is not paused at a failure gate in this run",
    label = "this run is `{Self}`; `retry()` and `abort()` need `Paused<{P}>`",
    note = "a run is `Paused` when `execute()` returns `Executed::NeedsHuman`; `Engine::resume` returns it as `PhaseAt::Paused`"
)]
pub trait CanRetry<W: Workflow, P: InWorkflow<W>>: Stage<W> {
    #[doc(hidden)]
    fn into_paused(self) -> Paused<P>;
}

impl<W: Workflow, P: InWorkflow<W>> CanRetry<W, P> for Paused<P> {
    fn into_paused(self) -> Self {
        self
    }
}

// ---------------------------------------------------------------------------------------------
// The handle.

/// A typed handle on one run of workflow `W` in state `S`.
///
/// Obtained from [`Engine::start`] or [`Engine::resume`], and from the transitions of another
/// handle, which consume it. See the [module docs](self) for the state diagram.
pub struct Run<W: Workflow, S: Stage<W>> {
    engine: Engine,
    id: RunId,
    state: S,
    workflow: PhantomData<fn() -> W>,
}

/// What [`Run::execute`] led to.
pub enum Executed<W: Workflow, P: InWorkflow<W>> {
    /// The artifact is valid; its typed output is available. Completing (no gate) or requesting
    /// approval (gate) is next.
    Valid(Run<W, Validated<P>>),
    /// A failure gate: the repair budget is spent or the session was lost. The run is paused
    /// until a human decides retry or abort.
    NeedsHuman(Run<W, Paused<P>>),
}

/// What a decision at a workflow gate led to.
pub enum AfterDecision<W: Workflow, P: InWorkflow<W>> {
    /// Approved: the next phase is ready, or the run completed.
    Approved(Run<W, P::Next>),
    /// Sent back with feedback: the same phase is ready again, and its next attempt's
    /// instructions carry the feedback.
    Rework(Run<W, Ready<P>>),
    /// Rejected: the run is aborted.
    Rejected(Run<W, Ended>),
}

/// What a decision at a failure gate led to.
pub enum AfterFailure<W: Workflow, P: InWorkflow<W>> {
    /// Retried: the phase is ready for a new attempt with a fresh repair budget.
    Retried(Run<W, Ready<P>>),
    /// Aborted: the run is over.
    Aborted(Run<W, Ended>),
}

/// The state of the phase a resumed run is at.
pub enum PhaseAt<W: Workflow, P: InWorkflow<W>> {
    /// Pending, or in flight when the previous orchestrator stopped: `execute()` starts it or
    /// continues it from its persisted state, without prompting twice.
    Ready(Run<W, Ready<P>>),
    /// Its valid artifact waits for a decision at its workflow gate.
    AwaitingApproval(Run<W, AwaitingApproval<P>>),
    /// The run is paused at this phase.
    Paused(Run<W, Paused<P>>),
}

/// What [`Engine::start`] needs: what the run is about and where the agents work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartRun {
    subject: String,
    worktree: PathBuf,
}

impl StartRun {
    /// A run about `subject` (`"TICKET-42"`) whose agents work in the git worktree `worktree`.
    pub fn new(subject: impl Into<String>, worktree: impl Into<PathBuf>) -> Self {
        Self {
            subject: subject.into(),
            worktree: worktree.into(),
        }
    }
}

impl Engine {
    /// Creates a run of workflow `W` and returns it ready to execute its first phase.
    ///
    /// The engine checks the worktree, every artifact path and every schema first (see
    /// [`Engine::create_run`]).
    pub async fn start<W: Workflow>(&self, run: StartRun) -> Result<Run<W, Ready<W::First>>> {
        let record = self
            .create_run(&W::SPEC, &run.subject, &run.worktree)
            .await?;
        Ok(Run::assemble(self.clone(), record.id, Ready::fresh()))
    }

    /// Reads where run `run` of workflow `W` stands and returns a handle in the matching state.
    ///
    /// | persisted run | persisted phase | returned |
    /// |---|---|---|
    /// | planning / executing | pending, running, awaiting_artifact, validating | `PhaseAt::Ready` (`execute()` continues it via [`Engine::resume_phase`]) |
    /// | awaiting_approval | awaiting_approval | `PhaseAt::AwaitingApproval` |
    /// | paused | any | `PhaseAt::Paused` (with its failure request, if one is pending) |
    /// | completed | — | `Completed` |
    /// | failed / aborted | — | `Ended` |
    ///
    /// Anything else (a run of another workflow, a phase the workflow does not have, a phase
    /// state the run state does not allow) is an error, never a guess.
    pub async fn resume<W: Workflow>(&self, run: RunId) -> Result<W::State> {
        Ok(match locate(self, run, &W::SPEC).await? {
            Position::Completed => W::State::from_completed(Run::assemble(
                self.clone(),
                run,
                Completed { _private: () },
            )),
            Position::Ended => {
                W::State::from_ended(Run::assemble(self.clone(), run, Ended { _private: () }))
            }
            Position::At { index, key, at } => W::State::from_phase(ResumedPhase {
                engine: self.clone(),
                run,
                index,
                key,
                at: *at,
                workflow: PhantomData,
            })?,
        })
    }
}

/// Where a run stands, as the typed API sees it.
enum Position {
    Completed,
    Ended,
    At {
        index: usize,
        key: PhaseKey,
        at: Box<Resumed>,
    },
}

/// What state a phase handle is in, by the persisted run and phase states (`Engine::resume`'s
/// table); `None` for combinations the store never leaves behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Ready { replay: bool },
    AwaitingApproval,
    Paused,
}

fn classify(run: RunState, phase: PhaseState) -> Option<Class> {
    match (run, phase) {
        (RunState::Planning | RunState::Executing, PhaseState::Pending) => {
            Some(Class::Ready { replay: false })
        }
        (
            RunState::Planning | RunState::Executing,
            PhaseState::Running | PhaseState::AwaitingArtifact | PhaseState::Validating,
        ) => Some(Class::Ready { replay: true }),
        (RunState::AwaitingApproval, PhaseState::AwaitingApproval) => Some(Class::AwaitingApproval),
        (RunState::Paused, _) => Some(Class::Paused),
        _ => None,
    }
}

/// Reads run `run` of `workflow` from the engine's store.
async fn locate(engine: &Engine, run: RunId, workflow: &WorkflowSpec) -> Result<Position> {
    let store = engine.store().as_ref();
    let record = store.run(run).await?;
    if record.workflow != workflow.name() {
        return Err(Error::new(
            ErrorCode::InvalidArgument,
            format!(
                "run {run} is a `{}` run, not `{}`",
                record.workflow,
                workflow.name()
            ),
        )
        .with_run(run)
        .with_hint("resume it with the workflow type it was started with"));
    }
    match record.state {
        RunState::Completed => return Ok(Position::Completed),
        RunState::Failed | RunState::Aborted => return Ok(Position::Ended),
        RunState::Planning
        | RunState::Executing
        | RunState::AwaitingApproval
        | RunState::Paused => {}
    }
    let key = record.current_phase.clone().ok_or_else(|| {
        Error::corruption(format!(
            "run {run} is {} but has no current phase",
            record.state
        ))
        .with_run(run)
    })?;
    let index = workflow.phases().iter().position(|p| p.key_str() == key.as_str()).ok_or_else(|| {
        Error::new(
            ErrorCode::PhaseNotFound,
            format!("run {run} is at phase `{key}`, which workflow `{}` does not have", workflow.name()),
        )
        .with_run(run)
        .with_hint("the workflow's phases changed since the run started; resume it with the version it was started with")
    })?;
    let phase = crate::store::phase_of(store, run, &key).await?;
    let undecided = |kind: GateKind| {
        let key = key.clone();
        async move {
            let approvals = store.approvals(run).await?;
            Ok::<_, Error>(
                approvals
                    .into_iter()
                    .rev()
                    .find(|a| a.phase == key && a.kind == kind && a.decision.is_none()),
            )
        }
    };
    let at = match classify(record.state, phase.state) {
        Some(Class::Ready { replay }) => Resumed::Ready { replay, feedback: phase.feedback },
        Some(Class::AwaitingApproval) => Resumed::AwaitingApproval(undecided(GateKind::Workflow).await?.ok_or_else(|| {
            Error::corruption(format!("run {run} awaits approval of phase `{key}` but has no undecided workflow request"))
                .in_phase(run, &key)
        })?),
        // A failure gate has an undecided failure request; an operator's pause has none.
        Some(Class::Paused) => Resumed::Paused(undecided(GateKind::Failure).await?),
        None => {
            return Err(Error::corruption(format!(
                "run {run} is {} while its current phase `{key}` is {}",
                record.state, phase.state
            ))
            .in_phase(run, &key));
        }
    };
    Ok(Position::At {
        index,
        key,
        at: Box::new(at),
    })
}

impl<W: Workflow, S: Stage<W>> Run<W, S> {
    fn assemble(engine: Engine, id: RunId, state: S) -> Self {
        Self {
            engine,
            id,
            state,
            workflow: PhantomData,
        }
    }

    fn with_state<T: Stage<W>>(self, state: T) -> Run<W, T> {
        Run::assemble(self.engine, self.id, state)
    }

    fn map_state<T: Stage<W>>(self, f: impl FnOnce(S) -> T) -> Run<W, T> {
        Run::assemble(self.engine, self.id, f(self.state))
    }

    /// The run id (persist it to [`Engine::resume`] the run from another process).
    pub fn id(&self) -> RunId {
        self.id
    }

    /// The engine driving the run.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The run as stored now (another process may have moved it on since this handle was made).
    pub async fn record(&self) -> Result<RunRecord> {
        self.engine.store().run(self.id).await
    }

    /// Executes the ready phase: prompts its agent (at most once per prompt), waits for the
    /// artifact, validates it, repairs within the budget, and routes the verdict durably.
    ///
    /// A phase sent back by `rework()` gets the reviewer's feedback appended to `instructions`
    /// by the engine. A phase that was in flight when a previous process stopped (from
    /// [`Engine::resume`]) is taken over and continued; its stored instructions are re-used.
    ///
    /// # Errors
    /// Fatal errors (the run is then failed) and errors that stop the phase without writing
    /// (`run_state_changed`, `phase_claimed`, `output_decode`, store failures). The handle is
    /// consumed either way: [`Engine::resume`] tells where the run stands.
    pub fn execute<'a>(self, instructions: &'a str) -> Transition<'a, Executed<W, PhaseOf<W, S>>>
    where
        S: CanExecute<W, PhaseOf<W, S>>,
    {
        Box::pin(
            self.map_state(CanExecute::into_ready)
                .execute_ready(instructions),
        )
    }

    /// The validated artifact decoded into the phase's `output` type.
    pub fn output(&self) -> &<PhaseOf<W, S> as Phase>::Output
    where
        S: HasOutput<W, PhaseOf<W, S>>,
    {
        HasOutput::output(&self.state)
    }

    /// The validated artifact as recorded (path, hash, schema id, parsed content).
    pub fn artifact(&self) -> &ArtifactRecord
    where
        S: HasOutput<W, PhaseOf<W, S>>,
    {
        HasOutput::artifact(&self.state)
    }

    /// Takes the output out, ending the handle (when nothing follows in this process).
    pub fn into_output(self) -> <PhaseOf<W, S> as Phase>::Output
    where
        S: HasOutput<W, PhaseOf<W, S>>,
    {
        HasOutput::into_output(self.state)
    }

    /// Finishes a validated phase that has no approval gate: the next phase's [`Ready`], or
    /// [`Completed`] after the last phase.
    ///
    /// The engine completed the phase when it accepted the artifact; this moves the handle on
    /// without I/O. Only for phases without `approval`: a gated phase does not compile here.
    ///
    /// # Errors
    /// `internal_state_corruption` when the engine's report contradicts the phase's declaration.
    pub fn complete(self) -> Result<Run<W, NextOf<W, S>>>
    where
        S: CanComplete<W, PhaseOf<W, S>>,
    {
        let Self {
            engine, id, state, ..
        } = self;
        let next = CanComplete::complete(state, id)?;
        Ok(Run::assemble(engine, id, next))
    }

    /// Hands a validated phase with an approval gate to a human: the run now waits for the
    /// decision.
    ///
    /// The engine filed the approval request when it accepted the artifact; this moves the
    /// handle on without I/O. Only for phases with `approval = "..."`.
    ///
    /// # Errors
    /// `internal_state_corruption` when the engine's report contradicts the phase's declaration.
    pub fn request_approval(self) -> Result<Run<W, AwaitingApproval<PhaseOf<W, S>>>>
    where
        S: CanRequestApproval<W, PhaseOf<W, S>>,
    {
        let Self {
            engine, id, state, ..
        } = self;
        let awaiting = CanRequestApproval::request(state, id)?;
        Ok(Run::assemble(engine, id, awaiting))
    }

    /// Records `decision` (approve, rework or reject) at the phase's workflow gate.
    ///
    /// # Errors
    /// `invalid_argument` for a failure-gate decision (retry, abort); `approval_conflict` when
    /// the request was already decided differently; store errors.
    pub fn decide<'a>(
        self,
        decision: Decision,
        actor: &'a str,
        note: Option<&'a str>,
    ) -> Transition<'a, AfterDecision<W, PhaseOf<W, S>>>
    where
        S: CanDecide<W, PhaseOf<W, S>>,
    {
        Box::pin(
            self.map_state(CanDecide::into_awaiting)
                .decide_gate(decision, actor, note),
        )
    }

    /// Approves the artifact: the next phase's [`Ready`], or [`Completed`] after the last phase.
    ///
    /// # Errors
    /// As [`Run::decide`].
    pub fn approve<'a>(
        self,
        actor: &'a str,
        note: Option<&'a str>,
    ) -> Transition<'a, Run<W, NextOf<W, S>>>
    where
        S: CanDecide<W, PhaseOf<W, S>>,
    {
        let run = self.map_state(CanDecide::into_awaiting);
        Box::pin(async move {
            let id = run.id;
            match run.decide_gate(Decision::Approve, actor, note).await? {
                AfterDecision::Approved(run) => Ok(run),
                _ => Err(
                    Error::corruption("an approval was recorded as another decision").with_run(id),
                ),
            }
        })
    }

    /// Sends the phase back with `feedback`: it is ready again, and its next attempt's
    /// instructions carry the feedback (with a fresh repair budget).
    ///
    /// # Errors
    /// As [`Run::decide`].
    pub fn rework<'a>(
        self,
        feedback: impl Into<String>,
        actor: &'a str,
    ) -> Transition<'a, Run<W, Ready<PhaseOf<W, S>>>>
    where
        S: CanDecide<W, PhaseOf<W, S>>,
    {
        let run = self.map_state(CanDecide::into_awaiting);
        let decision = Decision::Rework {
            feedback: feedback.into(),
        };
        Box::pin(async move {
            let id = run.id;
            match run.decide_gate(decision, actor, None).await? {
                AfterDecision::Rework(run) => Ok(run),
                _ => {
                    Err(Error::corruption("a rework was recorded as another decision").with_run(id))
                }
            }
        })
    }

    /// Rejects the artifact: the run is aborted.
    ///
    /// # Errors
    /// As [`Run::decide`].
    pub fn reject<'a>(self, actor: &'a str, note: Option<&'a str>) -> Transition<'a, Run<W, Ended>>
    where
        S: CanDecide<W, PhaseOf<W, S>>,
    {
        let run = self.map_state(CanDecide::into_awaiting);
        Box::pin(async move {
            let id = run.id;
            match run.decide_gate(Decision::Reject, actor, note).await? {
                AfterDecision::Rejected(run) => Ok(run),
                _ => Err(
                    Error::corruption("a rejection was recorded as another decision").with_run(id),
                ),
            }
        })
    }

    /// Decides the failure gate with *retry*: the run goes back to work and the phase is ready
    /// for a new attempt with a fresh repair budget.
    ///
    /// # Errors
    /// `invalid_argument` when an operator paused the run (there is no failure request to
    /// retry); `approval_conflict` when the request was already decided differently.
    pub fn retry<'a>(
        self,
        actor: &'a str,
        note: Option<&'a str>,
    ) -> Transition<'a, Run<W, Ready<PhaseOf<W, S>>>>
    where
        S: CanRetry<W, PhaseOf<W, S>>,
    {
        Box::pin(
            self.map_state(CanRetry::into_paused)
                .retry_gate(actor, note),
        )
    }

    /// Aborts the paused run: at its failure gate if it has one, else as an operator.
    ///
    /// # Errors
    /// `approval_conflict` when the request was already decided differently; store errors.
    pub fn abort<'a>(self, actor: &'a str, note: Option<&'a str>) -> Transition<'a, Run<W, Ended>>
    where
        S: CanRetry<W, PhaseOf<W, S>>,
    {
        Box::pin(
            self.map_state(CanRetry::into_paused)
                .abort_gate(actor, note),
        )
    }
}

impl<W: Workflow, P: InWorkflow<W>> Run<W, Ready<P>> {
    async fn execute_ready(self, instructions: &str) -> Result<Executed<W, P>> {
        let Self {
            engine, id, state, ..
        } = self;
        let spec = P::SPEC;
        let outcome = if state.replay {
            engine.resume_phase(id, &spec, instructions).await?
        } else {
            engine.execute_phase(id, &spec, instructions).await?
        };
        executed(engine, id, outcome)
    }

    /// The feedback of the rework decision that sent this phase back, when this handle came from
    /// `rework()` or a rework decision; the engine appends it to the next attempt's instructions.
    pub fn feedback(&self) -> Option<&str> {
        self.state.feedback.as_deref()
    }
}

impl<W: Workflow, P: InWorkflow<W>> Run<W, AwaitingApproval<P>> {
    async fn decide_gate(
        self,
        decision: Decision,
        actor: &str,
        note: Option<&str>,
    ) -> Result<AfterDecision<W, P>> {
        if !decision.fits(GateKind::Workflow) {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!(
                    "`{}` is a failure-gate decision; the workflow gate of phase `{}` takes approve, rework or reject",
                    decision.as_str(),
                    P::SPEC.key_str()
                ),
            )
            .with_run(self.id));
        }
        self.engine
            .decide(self.state.approval.id, decision.clone(), actor, note)
            .await?;
        after_decision(self.engine, self.id, &decision)
    }

    /// The approval request waiting for a decision.
    pub fn approval(&self) -> &ApprovalRecord {
        &self.state.approval
    }

    /// The decision, if someone (in any process) has made it.
    pub async fn decision(&self) -> Result<Option<DecisionRecord>> {
        Ok(self
            .engine
            .store()
            .approval(self.state.approval.id)
            .await?
            .decision)
    }

    /// Waits, polling the store every `every`, until the request is decided (here or by another
    /// process, such as an operator CLI), and returns what the decision led to.
    pub async fn wait_decision(self, every: Duration) -> Result<AfterDecision<W, P>> {
        let decision = wait(&self.engine, self.state.approval.id, every).await?;
        after_decision(self.engine, self.id, &decision.decision)
    }
}

impl<W: Workflow, P: InWorkflow<W>> Run<W, Paused<P>> {
    async fn retry_gate(self, actor: &str, note: Option<&str>) -> Result<Run<W, Ready<P>>> {
        let Some(request) = &self.state.request else {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!("run {} was paused by an operator, not at a failure gate: there is no request to retry", self.id),
            )
            .with_run(self.id)
            .with_hint("an operator pause is lifted by the operator; `abort()` still works"));
        };
        self.engine
            .decide(request.id, Decision::Retry, actor, note)
            .await?;
        Ok(self.with_state(Ready::fresh()))
    }

    async fn abort_gate(self, actor: &str, note: Option<&str>) -> Result<Run<W, Ended>> {
        match &self.state.request {
            Some(request) => {
                self.engine
                    .decide(request.id, Decision::Abort, actor, note)
                    .await?;
            }
            None => {
                let reason = note.map_or_else(
                    || format!("aborted by {actor}"),
                    |note| format!("aborted by {actor}: {note}"),
                );
                self.engine
                    .operate(self.id, OperatorAction::Abort { reason })
                    .await?;
            }
        }
        Ok(self.with_state(Ended { _private: () }))
    }

    /// The failure request waiting for retry or abort; `None` when an operator paused the run.
    pub fn gate(&self) -> Option<&ApprovalRecord> {
        self.state.request.as_ref()
    }

    /// The error that paused the run, when this handle came from `execute()`.
    pub fn error(&self) -> Option<&Error> {
        self.state.error.as_ref()
    }

    /// The decision on the failure request, if someone has made it.
    pub async fn decision(&self) -> Result<Option<DecisionRecord>> {
        match &self.state.request {
            Some(request) => Ok(self.engine.store().approval(request.id).await?.decision),
            None => Ok(None),
        }
    }

    /// Waits, polling the store every `every`, until the failure request is decided, and returns
    /// what the decision led to.
    ///
    /// # Errors
    /// `invalid_argument` when an operator paused the run (there is no request to wait for).
    pub async fn wait_decision(self, every: Duration) -> Result<AfterFailure<W, P>> {
        let Some(request) = &self.state.request else {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!(
                    "run {} was paused by an operator: there is no failure request to wait for",
                    self.id
                ),
            )
            .with_run(self.id));
        };
        let decision = wait(&self.engine, request.id, every).await?;
        match decision.decision {
            Decision::Retry => Ok(AfterFailure::Retried(self.with_state(Ready::fresh()))),
            Decision::Abort => Ok(AfterFailure::Aborted(
                self.with_state(Ended { _private: () }),
            )),
            other => Err(Error::corruption(format!(
                "failure request {} was decided `{}`",
                request.id,
                other.as_str()
            ))
            .with_run(self.id)),
        }
    }
}

async fn wait(
    engine: &Engine,
    request: crate::ids::ApprovalId,
    every: Duration,
) -> Result<DecisionRecord> {
    loop {
        if let Some(decision) = engine.store().approval(request).await?.decision {
            return Ok(decision);
        }
        tokio::time::sleep(every).await;
    }
}

fn after_decision<W: Workflow, P: InWorkflow<W>>(
    engine: Engine,
    id: RunId,
    decision: &Decision,
) -> Result<AfterDecision<W, P>> {
    match decision {
        Decision::Approve => Ok(AfterDecision::Approved(Run::assemble(
            engine,
            id,
            P::Next::enter(),
        ))),
        Decision::Rework { feedback } => Ok(AfterDecision::Rework(Run::assemble(
            engine,
            id,
            Ready {
                replay: false,
                feedback: Some(feedback.clone()),
                phase: PhantomData,
            },
        ))),
        Decision::Reject => Ok(AfterDecision::Rejected(Run::assemble(
            engine,
            id,
            Ended { _private: () },
        ))),
        Decision::Retry | Decision::Abort => Err(Error::corruption(format!(
            "the workflow gate of phase `{}` was decided `{}`",
            P::SPEC.key_str(),
            decision.as_str()
        ))
        .with_run(id)),
    }
}

/// Turns the engine's outcome into the typed result, checking that it agrees with the phase's
/// declaration and decoding the output.
fn executed<W: Workflow, P: InWorkflow<W>>(
    engine: Engine,
    id: RunId,
    outcome: PhaseOutcome,
) -> Result<Executed<W, P>> {
    let gated = P::SPEC.approval().is_some();
    let (artifact, routed) = match outcome {
        PhaseOutcome::Completed { artifact, run } if !gated => (artifact, Routed::Completed(run)),
        PhaseOutcome::AwaitingApproval { artifact, approval } if gated => {
            (artifact, Routed::AwaitingApproval(approval))
        }
        PhaseOutcome::NeedsHuman { approval, error } => {
            return Ok(Executed::NeedsHuman(Run::assemble(
                engine,
                id,
                Paused {
                    request: Some(approval),
                    error: Some(error),
                    phase: PhantomData,
                },
            )));
        }
        PhaseOutcome::Completed { .. } | PhaseOutcome::AwaitingApproval { .. } => {
            let routed = if gated {
                "completed"
            } else {
                "filed an approval request for"
            };
            return Err(Error::corruption(format!(
                "the engine {routed} phase `{}`, which {} an approval gate",
                P::SPEC.key_str(),
                if gated { "has" } else { "has no" }
            ))
            .in_phase(id, &P::SPEC.key()));
        }
    };
    let output = decode::<P>(id, &artifact)?;
    Ok(Executed::Valid(Run::assemble(
        engine,
        id,
        Validated {
            output,
            artifact,
            routed,
        },
    )))
}

fn decode<P: Phase>(run: RunId, artifact: &ArtifactRecord) -> Result<P::Output> {
    let key = P::SPEC.key();
    let Some(content) = artifact.content.clone() else {
        return Err(Error::new(
            ErrorCode::OutputDecode,
            format!(
                "the validated artifact {} of phase `{key}` has no parsed content",
                artifact.path
            ),
        )
        .in_phase(run, &key));
    };
    serde_json::from_value(content).map_err(|e| {
        Error::new(
            ErrorCode::OutputDecode,
            format!(
                "artifact {} of phase `{key}` satisfies schema `{}` but does not decode into `{}`: {e}",
                artifact.path,
                artifact.schema_id,
                std::any::type_name::<P::Output>()
            ),
        )
        .in_phase(run, &key)
        .with_hint("make the phase's `output` type agree with its JSON Schema")
        .with_source(e)
    })
}

fn disagreement<P: Phase>(run: RunId, expected: &str, routed: &Routed) -> Error {
    let found = match routed {
        Routed::Completed(record) => format!(
            "completed it (run now {}, at {:?})",
            record.state, record.current_phase
        ),
        Routed::AwaitingApproval(approval) => format!("filed approval request {}", approval.id),
    };
    Error::corruption(format!(
        "phase `{}` should be {expected}, but the engine {found}",
        P::SPEC.key_str()
    ))
    .in_phase(run, &P::SPEC.key())
}

// ---------------------------------------------------------------------------------------------
// Resuming: the generated `<Workflow>State` enum is built through these.

/// The generated `<Workflow>State` enum. Implemented by `#[derive(Workflow)]`.
#[doc(hidden)]
pub trait WorkflowState: Sized {
    /// The workflow.
    type Workflow: Workflow;
    /// The run is at a phase: pick the variant by [`ResumedPhase::index`].
    fn from_phase(at: ResumedPhase<Self::Workflow>) -> Result<Self>;
    /// Every phase completed.
    fn from_completed(run: Run<Self::Workflow, Completed>) -> Self;
    /// The run failed or was aborted.
    fn from_ended(run: Run<Self::Workflow, Ended>) -> Self;
}

/// A run at a phase, read from the store, before its phase type is known. Only [`Engine::resume`]
/// makes one.
#[doc(hidden)]
pub struct ResumedPhase<W> {
    engine: Engine,
    run: RunId,
    index: usize,
    key: PhaseKey,
    at: Resumed,
    workflow: PhantomData<fn() -> W>,
}

enum Resumed {
    Ready {
        replay: bool,
        feedback: Option<String>,
    },
    AwaitingApproval(ApprovalRecord),
    Paused(Option<ApprovalRecord>),
}

impl<W: Workflow> ResumedPhase<W> {
    /// The phase's position in the workflow.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The typed state, once the generated code picked `P` by index.
    pub fn into_phase<P: InWorkflow<W>>(self) -> Result<PhaseAt<W, P>> {
        if P::INDEX != self.index || P::SPEC.key_str() != self.key.as_str() {
            return Err(self.out_of_range());
        }
        let (engine, run) = (self.engine, self.run);
        Ok(match self.at {
            Resumed::Ready { replay, feedback } => PhaseAt::Ready(Run::assemble(
                engine,
                run,
                Ready {
                    replay,
                    feedback,
                    phase: PhantomData,
                },
            )),
            Resumed::AwaitingApproval(approval) => PhaseAt::AwaitingApproval(Run::assemble(
                engine,
                run,
                AwaitingApproval {
                    approval,
                    phase: PhantomData,
                },
            )),
            Resumed::Paused(request) => PhaseAt::Paused(Run::assemble(
                engine,
                run,
                Paused {
                    request,
                    error: None,
                    phase: PhantomData,
                },
            )),
        })
    }

    /// The error for a phase the generated code does not know (the workflow changed).
    pub fn out_of_range(&self) -> Error {
        Error::corruption(format!(
            "run {} is at phase `{}` (position {}), which does not match workflow `{}` as compiled",
            self.run,
            self.key,
            self.index,
            W::SPEC.name()
        ))
        .in_phase(self.run, &self.key)
    }
}

// ---------------------------------------------------------------------------------------------
// Debug: readable without requiring `Debug` of the workflow, phase or output types.

impl<W: Workflow, S: Stage<W>> fmt::Debug for Run<W, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Run")
            .field("workflow", &W::SPEC.name())
            .field("id", &self.id)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl<P: Phase> fmt::Debug for Ready<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ready")
            .field("phase", &P::SPEC.key_str())
            .field("replay", &self.replay)
            .field("feedback", &self.feedback)
            .finish()
    }
}

impl<P: Phase> fmt::Debug for Validated<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Validated")
            .field("phase", &P::SPEC.key_str())
            .field("artifact", &self.artifact.path)
            .field("hash", &self.artifact.hash)
            .field("routed", &self.routed)
            .finish_non_exhaustive()
    }
}

impl<P: Phase> fmt::Debug for AwaitingApproval<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwaitingApproval")
            .field("phase", &P::SPEC.key_str())
            .field("approval", &self.approval)
            .finish()
    }
}

impl<P: Phase> fmt::Debug for Paused<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Paused")
            .field("phase", &P::SPEC.key_str())
            .field("request", &self.request)
            .field("error", &self.error)
            .finish()
    }
}

impl<W: Workflow> fmt::Debug for ResumedPhase<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResumedPhase")
            .field("workflow", &W::SPEC.name())
            .field("run", &self.run)
            .field("index", &self.index)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl<W: Workflow, P: InWorkflow<W>> fmt::Debug for Executed<W, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Executed::Valid(run) => f.debug_tuple("Valid").field(run).finish(),
            Executed::NeedsHuman(run) => f.debug_tuple("NeedsHuman").field(run).finish(),
        }
    }
}

impl<W: Workflow, P: InWorkflow<W>> fmt::Debug for AfterDecision<W, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AfterDecision::Approved(run) => f.debug_tuple("Approved").field(run).finish(),
            AfterDecision::Rework(run) => f.debug_tuple("Rework").field(run).finish(),
            AfterDecision::Rejected(run) => f.debug_tuple("Rejected").field(run).finish(),
        }
    }
}

impl<W: Workflow, P: InWorkflow<W>> fmt::Debug for AfterFailure<W, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AfterFailure::Retried(run) => f.debug_tuple("Retried").field(run).finish(),
            AfterFailure::Aborted(run) => f.debug_tuple("Aborted").field(run).finish(),
        }
    }
}

impl<W: Workflow, P: InWorkflow<W>> fmt::Debug for PhaseAt<W, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PhaseAt::Ready(run) => f.debug_tuple("Ready").field(run).finish(),
            PhaseAt::AwaitingApproval(run) => f.debug_tuple("AwaitingApproval").field(run).finish(),
            PhaseAt::Paused(run) => f.debug_tuple("Paused").field(run).finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_follows_the_resume_table() {
        use PhaseState as P;
        use RunState as R;
        for run in [R::Planning, R::Executing] {
            assert_eq!(
                classify(run, P::Pending),
                Some(Class::Ready { replay: false })
            );
            for phase in [P::Running, P::AwaitingArtifact, P::Validating] {
                assert_eq!(classify(run, phase), Some(Class::Ready { replay: true }));
            }
            for phase in [P::AwaitingApproval, P::Completed, P::Failed] {
                assert_eq!(classify(run, phase), None, "{run} / {phase}");
            }
        }
        assert_eq!(
            classify(R::AwaitingApproval, P::AwaitingApproval),
            Some(Class::AwaitingApproval)
        );
        assert_eq!(classify(R::AwaitingApproval, P::Running), None);
        for phase in P::ALL {
            assert_eq!(classify(R::Paused, *phase), Some(Class::Paused));
        }
        for run in [R::Completed, R::Failed, R::Aborted] {
            assert_eq!(
                classify(run, P::Completed),
                None,
                "terminal runs are not classified by phase"
            );
        }
    }

    #[test]
    fn next_stages_agree_only_with_the_run_they_lead_to() {
        use crate::spec::PhaseSpec;

        struct First;
        struct Second;
        struct Flow;
        #[derive(Debug)]
        enum NoState {}
        impl WorkflowState for NoState {
            type Workflow = Flow;
            fn from_phase(at: ResumedPhase<Flow>) -> Result<Self> {
                Err(at.out_of_range())
            }
            fn from_completed(_: Run<Flow, Completed>) -> Self {
                unreachable!("not resumed in this test")
            }
            fn from_ended(_: Run<Flow, Ended>) -> Self {
                unreachable!("not resumed in this test")
            }
        }
        impl Phase for First {
            const SPEC: PhaseSpec = PhaseSpec::new("first", "r", "a.json", "s", "{}");
            type Output = ();
        }
        impl Phase for Second {
            const SPEC: PhaseSpec = PhaseSpec::new("second", "r", "b.json", "s", "{}");
            type Output = ();
        }
        impl Workflow for Flow {
            const SPEC: WorkflowSpec = WorkflowSpec::new("flow", &[First::SPEC, Second::SPEC]);
            type First = First;
            type State = NoState;
        }
        impl InWorkflow<Flow> for First {
            const INDEX: usize = 0;
            type Next = Ready<Second>;
        }
        impl InWorkflow<Flow> for Second {
            const INDEX: usize = 1;
            type Next = Completed;
        }

        let mut run = RunRecord {
            id: RunId::new(),
            workflow: "flow".into(),
            subject: "s".into(),
            worktree: "/w".into(),
            state: RunState::Executing,
            paused_from: None,
            current_phase: Some("second".into()),
            created_at: time::OffsetDateTime::UNIX_EPOCH,
        };
        assert!(<Ready<Second> as NextStage<Flow>>::agrees(&run));
        assert!(!<Completed as NextStage<Flow>>::agrees(&run));
        run.current_phase = Some("first".into());
        assert!(!<Ready<Second> as NextStage<Flow>>::agrees(&run));
        run.state = RunState::Completed;
        run.current_phase = None;
        assert!(<Completed as NextStage<Flow>>::agrees(&run));
    }
}
