//! The engine scenario suite: every path of one phase, generic over the [`Store`], so the same
//! scenarios run on [`crate::memory::MemoryStore`] and on PostgreSQL.
//!
//! Each scenario drives a real [`Engine`] against [`FakeSessions`] in a temporary worktree and
//! asserts the ordered event types, the final run / phase / session states, and that no dedup
//! key reached the agent twice. Instantiate all of them for a store with
//! [`engine_scenario_tests!`](crate::engine_scenario_tests).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use phaseflow::error::{ErrorClass, ErrorCode};
use phaseflow::event::{Decision, EventKind};
use phaseflow::ids::{PhaseKey, RoleKey, RunId};
use phaseflow::spec::{PhaseSpec, WorkflowSpec};
use phaseflow::state::{PhaseState, RunState, SessionState};
use phaseflow::store::{OperatorAction, PhaseRecord, RunRecord, SessionRecord, Store};
use phaseflow::{Engine, EngineOptions, PhaseOutcome};
use serde_json::{Value, json};

use crate::sessions::{FakeSessions, Script};

/// The plan phase: role `planner`, gate `plan_review`, repair budget 1.
pub const PLAN: PhaseSpec = PhaseSpec::new(
    "plan",
    "planner",
    "phaseflow/plan.json",
    "plan.schema.json",
    include_str!("../../schemas/plan.schema.json"),
)
.with_approval("plan_review");

/// The implement phase: role `coder`, no gate, repair budget 1.
pub const IMPLEMENT: PhaseSpec = PhaseSpec::new(
    "implement",
    "coder",
    "phaseflow/impl.json",
    "impl.schema.json",
    include_str!("../../schemas/impl.schema.json"),
);

const IMPLEMENT_BUDGET_0: PhaseSpec = IMPLEMENT.with_repair_budget(0);
const IMPLEMENT_BUDGET_3: PhaseSpec = IMPLEMENT.with_repair_budget(3);

/// plan (gated) → implement.
pub const FEATURE: WorkflowSpec = WorkflowSpec::new("feature", &[PLAN, IMPLEMENT]);
/// implement alone.
pub const SOLO: WorkflowSpec = WorkflowSpec::new("solo", &[IMPLEMENT]);
const SOLO_BUDGET_0: WorkflowSpec = WorkflowSpec::new("solo", &[IMPLEMENT_BUDGET_0]);
const SOLO_BUDGET_3: WorkflowSpec = WorkflowSpec::new("solo", &[IMPLEMENT_BUDGET_3]);

/// A plan that satisfies `plan.schema.json`.
pub fn valid_plan() -> Value {
    json!({ "summary": "Add the flag", "steps": [{ "title": "Wire it", "files": ["src/flag.rs"] }] })
}

/// An implementation report that satisfies `impl.schema.json`.
pub fn valid_impl() -> Value {
    json!({ "changed_files": ["src/flag.rs"], "tests_passed": true, "notes": "done" })
}

/// An implementation report with two schema errors (`/changed_files` empty, `/tests_passed` a string).
pub fn invalid_impl() -> Value {
    json!({ "changed_files": [], "tests_passed": "yes", "notes": "done" })
}

/// A schema-invalid implementation report whose bytes differ per `n` (so each is a new artifact).
pub fn invalid_numbered(n: u32) -> Value {
    json!({ "changed_files": [], "tests_passed": true, "notes": n.to_string() })
}

/// Engine options for scenarios: a timeout long enough for a loaded machine when the agent
/// writes, short enough that the timeout scenarios stay quick.
pub fn scenario_options(artifact_timeout: Duration) -> EngineOptions {
    EngineOptions {
        run_check_interval: Duration::from_millis(100),
        ..EngineOptions::default().with_artifact_timeout(artifact_timeout)
    }
}

/// One engine, one fake agent world, one worktree, one run.
#[derive(Debug)]
pub struct Harness {
    /// The store under test.
    pub store: Arc<dyn Store>,
    /// The scripted agents.
    pub fake: FakeSessions,
    /// The engine.
    pub engine: Engine,
    /// The run's worktree (deleted on drop).
    pub worktree: tempfile::TempDir,
    /// The run as created.
    pub run: RunRecord,
}

impl Harness {
    /// Creates a run of `workflow` in a fresh worktree; the artifact timeout is 5 s.
    pub async fn new(store: Arc<dyn Store>, workflow: &WorkflowSpec) -> Self {
        Self::with_timeout(store, workflow, Duration::from_secs(5)).await
    }

    /// Like [`Harness::new`] with another artifact timeout.
    pub async fn with_timeout(
        store: Arc<dyn Store>,
        workflow: &WorkflowSpec,
        artifact_timeout: Duration,
    ) -> Self {
        let fake = FakeSessions::new();
        let engine = Engine::new(store.clone(), Arc::new(fake.clone()))
            .with_options(scenario_options(artifact_timeout));
        let worktree = tempfile::tempdir().expect("create a temporary worktree");
        let run = engine
            .create_run(workflow, "TICKET-42", worktree.path())
            .await
            .expect("create the run");
        Self {
            store,
            fake,
            engine,
            worktree,
            run,
        }
    }

    /// The run id.
    pub fn id(&self) -> RunId {
        self.run.id
    }

    /// Executes a phase with fixed instructions.
    pub async fn execute(&self, spec: &PhaseSpec) -> phaseflow::Result<PhaseOutcome> {
        self.engine
            .execute_phase(self.id(), spec, "Do the work for TICKET-42.")
            .await
    }

    /// The run as stored now.
    pub async fn run_now(&self) -> RunRecord {
        self.store.run(self.id()).await.expect("read the run")
    }

    /// A phase as stored now.
    pub async fn phase(&self, key: &str) -> PhaseRecord {
        self.store
            .phases(self.id())
            .await
            .expect("read phases")
            .into_iter()
            .find(|p| p.key == *key)
            .expect("phase exists")
    }

    /// A role's session as stored now.
    pub async fn session(&self, role: &str) -> SessionRecord {
        self.store
            .session(self.id(), &RoleKey::new(role))
            .await
            .expect("read the session")
            .expect("the role has a session")
    }

    /// The event types in log order.
    pub async fn event_types(&self) -> Vec<String> {
        self.events()
            .await
            .iter()
            .map(|e| e.type_name().to_owned())
            .collect()
    }

    /// The events in log order, after checking the log: seq gapless from 1, keys unique and
    /// equal to each event's own idempotency key.
    pub async fn events(&self) -> Vec<EventKind> {
        let events = self.store.events(self.id(), 0).await.expect("read events");
        crate::conformance::assert_event_log(&events);
        events.into_iter().map(|e| e.kind).collect()
    }

    /// Asserts the ordered event types, then that no dedup key was delivered twice.
    pub async fn assert_events(&self, expected: &[&str]) {
        let actual = self.event_types().await;
        assert_eq!(
            actual, expected,
            "event log differs:\nactual:   {actual:?}\nexpected: {expected:?}"
        );
        self.fake.assert_no_duplicate_delivery();
    }

    /// Asserts run, phase and session states.
    pub async fn assert_states(
        &self,
        run: RunState,
        phase: (&str, PhaseState),
        session: (&str, SessionState),
    ) {
        assert_eq!(self.run_now().await.state, run, "run state");
        assert_eq!(
            self.phase(phase.0).await.state,
            phase.1,
            "phase `{}` state",
            phase.0
        );
        assert_eq!(
            self.session(session.0).await.state,
            session.1,
            "`{}` session state",
            session.0
        );
    }

    /// Asserts that the role's session transcript was captured into the store: every prompt
    /// delivered to it is there, and `last_capture_seq` points at the last stored chunk.
    pub async fn assert_transcript_captured(&self, role: &str) {
        let session = self.session(role).await;
        let chunks = self
            .store
            .transcript(session.id)
            .await
            .expect("read the transcript");
        assert!(
            !chunks.is_empty(),
            "no transcript captured for the `{role}` session"
        );
        assert_eq!(session.last_capture_seq, chunks.last().map_or(0, |c| c.seq));
        for prompt in self.fake.deliveries() {
            if prompt.session == session.id {
                assert!(
                    chunks
                        .iter()
                        .any(|c| c.text.contains(prompt.dedup.as_str())),
                    "the transcript lacks prompt {}: {chunks:?}",
                    prompt.dedup
                );
            }
        }
    }

    /// The instructions of every delivered prompt, in order.
    pub fn delivered_instructions(&self) -> Vec<String> {
        self.fake
            .deliveries()
            .into_iter()
            .map(|p| p.instructions)
            .collect()
    }
}

fn needs_human(outcome: PhaseOutcome) -> (phaseflow::store::ApprovalRecord, phaseflow::Error) {
    match outcome {
        PhaseOutcome::NeedsHuman { approval, error } => (approval, error),
        other => panic!("expected a human gate, got {other:?}"),
    }
}

fn awaiting(outcome: PhaseOutcome) -> phaseflow::store::ApprovalRecord {
    match outcome {
        PhaseOutcome::AwaitingApproval { approval, .. } => approval,
        other => panic!("expected a workflow gate, got {other:?}"),
    }
}

fn completed(outcome: PhaseOutcome) -> phaseflow::store::ArtifactRecord {
    match outcome {
        PhaseOutcome::Completed { artifact, .. } => artifact,
        other => panic!("expected completion, got {other:?}"),
    }
}

const CREATE: &[&str] = &["run.created"];
const BEGIN_FIRST: &[&str] = &["run.started", "phase.started"];
const NEW_SESSION_BUSY: &[&str] = &["session.created", "session.ready", "session.busy"];
const SENT: &[&str] = &["prompt.sent", "artifact.expected"];
const REPAIRED: &[&str] = &[
    "phase.started",
    "session.busy",
    "prompt.repaired",
    "artifact.expected",
];
const INVALID: &[&str] = &["artifact.invalid", "session.idle"];
const COMPLETE_LAST: &[&str] = &[
    "artifact.validated",
    "session.idle",
    "phase.completed",
    "run.completed",
];
const AWAIT_APPROVAL: &[&str] = &["artifact.validated", "session.idle", "approval.requested"];
const GATE: &[&str] = &[
    "phase.failed",
    "run.paused",
    "session.failed",
    "approval.requested",
];
const GATE_CRASHED: &[&str] = &[
    "phase.failed",
    "run.paused",
    "session.crashed",
    "session.failed",
    "approval.requested",
];

fn seq(parts: &[&[&'static str]]) -> Vec<&'static str> {
    parts.iter().flat_map(|p| p.iter().copied()).collect()
}

/// One valid artifact, no gate: the phase and the run complete, in four store commits.
pub async fn happy_path(store: Arc<dyn Store>) {
    let h = Harness::new(store, &SOLO).await;
    h.fake.script("coder", [Script::valid(valid_impl())]);
    let artifact = completed(h.execute(&IMPLEMENT).await.expect("phase runs"));
    assert!(artifact.is_valid());
    assert_eq!(artifact.content, Some(valid_impl()));
    h.assert_events(&seq(&[
        CREATE,
        BEGIN_FIRST,
        NEW_SESSION_BUSY,
        SENT,
        COMPLETE_LAST,
    ]))
    .await;
    h.assert_states(
        RunState::Completed,
        ("implement", PhaseState::Completed),
        ("coder", SessionState::Ready),
    )
    .await;
    assert_eq!(h.phase("implement").await.attempts, 1);
    assert_eq!(h.fake.deliveries().len(), 1);
    h.assert_transcript_captured("coder").await;
}

/// A gated phase parks at `awaiting_approval`; approving moves the run to the next phase.
pub async fn gate_then_approve(store: Arc<dyn Store>) {
    let h = Harness::new(store, &FEATURE).await;
    h.fake.script("planner", [Script::valid(valid_plan())]);
    h.fake.script("coder", [Script::valid(valid_impl())]);
    let approval = awaiting(h.execute(&PLAN).await.expect("plan runs"));
    assert_eq!(approval.gate.as_str(), "plan_review");
    h.assert_states(
        RunState::AwaitingApproval,
        ("plan", PhaseState::AwaitingApproval),
        ("planner", SessionState::WaitingForApproval),
    )
    .await;
    h.assert_transcript_captured("planner").await;
    let decided = h
        .engine
        .decide(approval.id, Decision::Approve, "ada", Some("ship it"))
        .await
        .expect("approve");
    assert_eq!(decided.run.state, RunState::Executing);
    assert_eq!(decided.run.current_phase, Some(PhaseKey::new("implement")));
    let stored = h.store.approval(approval.id).await.expect("read approval");
    let decision = stored.decision.expect("decision recorded");
    assert_eq!(
        (decision.actor.as_str(), decision.note.as_deref()),
        ("ada", Some("ship it"))
    );
    completed(h.execute(&IMPLEMENT).await.expect("implement runs"));
    h.assert_events(&seq(&[
        CREATE,
        BEGIN_FIRST,
        NEW_SESSION_BUSY,
        SENT,
        AWAIT_APPROVAL,
        &["approval.decided", "phase.completed", "run.resumed"],
        &["phase.started"],
        NEW_SESSION_BUSY,
        SENT,
        COMPLETE_LAST,
    ]))
    .await;
    h.assert_states(
        RunState::Completed,
        ("plan", PhaseState::Completed),
        ("planner", SessionState::Ready),
    )
    .await;
}

/// Rework sends the phase back with the reviewer's feedback in a new attempt's instructions.
pub async fn gate_then_rework(store: Arc<dyn Store>) {
    let h = Harness::new(store, &FEATURE).await;
    let mut reworked = valid_plan();
    reworked["summary"] = json!("Add the flag in two smaller steps");
    h.fake.script(
        "planner",
        [Script::valid(valid_plan()), Script::valid(reworked)],
    );
    let first = awaiting(h.execute(&PLAN).await.expect("plan runs"));
    let feedback = "Split step one into two.";
    h.engine
        .decide(
            first.id,
            Decision::Rework {
                feedback: feedback.into(),
            },
            "ada",
            None,
        )
        .await
        .expect("rework");
    assert_eq!(h.phase("plan").await.state, PhaseState::Pending);
    assert_eq!(h.run_now().await.state, RunState::Executing);
    let second = awaiting(h.execute(&PLAN).await.expect("plan runs again"));
    assert_eq!(second.attempt, 2);
    let prompts = h.delivered_instructions();
    assert_eq!(prompts.len(), 2);
    assert!(!prompts[0].contains(feedback));
    assert!(
        prompts[1].contains(feedback),
        "rework prompt lacks the feedback: {}",
        prompts[1]
    );
    assert_eq!(h.phase("plan").await.attempts, 2);
    h.assert_events(&seq(&[
        CREATE,
        BEGIN_FIRST,
        NEW_SESSION_BUSY,
        SENT,
        AWAIT_APPROVAL,
        &["approval.decided", "run.resumed"],
        &["phase.started", "session.busy"],
        SENT,
        AWAIT_APPROVAL,
    ]))
    .await;
    h.assert_states(
        RunState::AwaitingApproval,
        ("plan", PhaseState::AwaitingApproval),
        ("planner", SessionState::WaitingForApproval),
    )
    .await;
}

/// Reject aborts the run and disposes of its sessions.
pub async fn gate_then_reject(store: Arc<dyn Store>) {
    let h = Harness::new(store, &FEATURE).await;
    h.fake.script("planner", [Script::valid(valid_plan())]);
    let approval = awaiting(h.execute(&PLAN).await.expect("plan runs"));
    let decided = h
        .engine
        .decide(approval.id, Decision::Reject, "ada", Some("wrong ticket"))
        .await
        .expect("reject");
    assert_eq!(decided.run.state, RunState::Aborted);
    let session = h.session("planner").await;
    assert_eq!(session.state, SessionState::FailedNeedsHuman);
    assert!(h.fake.is_disposed(session.id));
    h.assert_events(&seq(&[
        CREATE,
        BEGIN_FIRST,
        NEW_SESSION_BUSY,
        SENT,
        AWAIT_APPROVAL,
        &[
            "approval.decided",
            "phase.failed",
            "run.aborted",
            "session.failed",
        ],
    ]))
    .await;
    // The same decision again is a no-op; another one is refused.
    let logged = h.event_types().await.len();
    h.engine
        .decide(approval.id, Decision::Reject, "ada", None)
        .await
        .expect("same decision again");
    let err = h
        .engine
        .decide(approval.id, Decision::Approve, "bob", None)
        .await
        .expect_err("conflict");
    assert_eq!(err.code(), ErrorCode::ApprovalConflict);
    assert_eq!(
        h.event_types().await.len(),
        logged,
        "repeated decisions wrote nothing"
    );
}

/// A schema-invalid artifact gets one repair prompt naming every problem; the fix completes.
pub async fn invalid_then_repaired(store: Arc<dyn Store>) {
    let h = Harness::new(store, &SOLO).await;
    h.fake.script(
        "coder",
        [
            Script::schema_invalid(invalid_impl()),
            Script::valid(valid_impl()),
        ],
    );
    let artifact = completed(h.execute(&IMPLEMENT).await.expect("phase runs"));
    assert_eq!(artifact.attempt, 2);
    let prompts = h.delivered_instructions();
    assert_eq!(prompts.len(), 2);
    assert!(
        prompts[1].contains("/changed_files") && prompts[1].contains("/tests_passed"),
        "{}",
        prompts[1]
    );
    assert!(
        prompts[1].starts_with(&prompts[0]),
        "the repair prompt keeps the original instructions"
    );
    let invalid = h.events().await.into_iter().find_map(|e| match e {
        EventKind::ArtifactInvalid { errors, .. } => Some(errors),
        _ => None,
    });
    let paths: Vec<_> = invalid
        .expect("artifact.invalid")
        .into_iter()
        .map(|i| i.instance_path)
        .collect();
    assert_eq!(paths, ["/changed_files", "/tests_passed"]);
    h.assert_events(&seq(&[
        CREATE,
        BEGIN_FIRST,
        NEW_SESSION_BUSY,
        SENT,
        INVALID,
        REPAIRED,
        COMPLETE_LAST,
    ]))
    .await;
    h.assert_states(
        RunState::Completed,
        ("implement", PhaseState::Completed),
        ("coder", SessionState::Ready),
    )
    .await;
}

/// Invalid twice with a budget of one: a failure gate, the run paused.
pub async fn invalid_twice_gates(store: Arc<dyn Store>) {
    let h = Harness::new(store, &SOLO).await;
    h.fake.script(
        "coder",
        [
            Script::schema_invalid(invalid_impl()),
            Script::schema_invalid(json!({"notes": 1})),
        ],
    );
    let (approval, error) = needs_human(h.execute(&IMPLEMENT).await.expect("phase runs"));
    assert_eq!(error.code(), ErrorCode::ArtifactInvalidAfterRepair);
    assert_eq!(error.class(), ErrorClass::HumanRequired);
    assert_eq!(approval.gate.as_str(), "artifact_invalid_after_repair");
    assert_eq!(
        approval.key,
        format!("{}:artifact_invalid_after_repair:implement:2", h.id())
    );
    assert!(
        approval.payload["errors"]
            .as_array()
            .is_some_and(|e| !e.is_empty())
    );
    let run = h.run_now().await;
    assert_eq!(
        (run.state, run.paused_from),
        (RunState::Paused, Some(RunState::Executing))
    );
    h.assert_events(&seq(&[
        CREATE,
        BEGIN_FIRST,
        NEW_SESSION_BUSY,
        SENT,
        INVALID,
        REPAIRED,
        &["artifact.invalid", "session.idle"],
        GATE,
    ]))
    .await;
    h.assert_states(
        RunState::Paused,
        ("implement", PhaseState::Failed),
        ("coder", SessionState::FailedNeedsHuman),
    )
    .await;
    h.assert_transcript_captured("coder").await;
}

/// Bytes that are not JSON are an invalid artifact, not a crash.
pub async fn invalid_json_is_invalid(store: Arc<dyn Store>) {
    let h = Harness::new(store, &SOLO).await;
    h.fake.script(
        "coder",
        [
            Script::invalid_json("{\"changed_files\": [\"a\""),
            Script::valid(valid_impl()),
        ],
    );
    completed(h.execute(&IMPLEMENT).await.expect("phase runs"));
    let errors = h.events().await.into_iter().find_map(|e| match e {
        EventKind::ArtifactInvalid { errors, .. } => Some(errors),
        _ => None,
    });
    let errors = errors.expect("artifact.invalid");
    assert_eq!(errors.len(), 1);
    assert!(errors[0].message.contains("not valid JSON"), "{errors:?}");
    h.assert_events(&seq(&[
        CREATE,
        BEGIN_FIRST,
        NEW_SESSION_BUSY,
        SENT,
        INVALID,
        REPAIRED,
        COMPLETE_LAST,
    ]))
    .await;
}

/// Budget 0: the first invalid artifact goes straight to the gate.
pub async fn repair_budget_zero(store: Arc<dyn Store>) {
    let h = Harness::new(store, &SOLO_BUDGET_0).await;
    h.fake
        .script("coder", [Script::schema_invalid(invalid_impl())]);
    let (_, error) = needs_human(h.execute(&IMPLEMENT_BUDGET_0).await.expect("phase runs"));
    assert_eq!(error.code(), ErrorCode::ArtifactInvalidAfterRepair);
    assert_eq!(h.fake.deliveries().len(), 1);
    h.assert_events(&seq(&[
        CREATE,
        BEGIN_FIRST,
        NEW_SESSION_BUSY,
        SENT,
        INVALID,
        GATE,
    ]))
    .await;
}

/// Budget 3: three repairs are allowed, and the fourth invalid artifact gates.
pub async fn repair_budget_three(store: Arc<dyn Store>) {
    let h = Harness::new(store.clone(), &SOLO_BUDGET_3).await;
    let invalid = |n: u32| Script::schema_invalid(invalid_numbered(n));
    h.fake.script(
        "coder",
        [
            invalid(1),
            invalid(2),
            invalid(3),
            Script::valid(valid_impl()),
        ],
    );
    let artifact = completed(h.execute(&IMPLEMENT_BUDGET_3).await.expect("phase runs"));
    assert_eq!(artifact.attempt, 4);
    assert_eq!(h.fake.deliveries().len(), 4);
    h.fake.assert_no_duplicate_delivery();

    let h = Harness::new(store, &SOLO_BUDGET_3).await;
    h.fake
        .script("coder", [invalid(1), invalid(2), invalid(3), invalid(4)]);
    let (approval, _) = needs_human(h.execute(&IMPLEMENT_BUDGET_3).await.expect("phase runs"));
    assert_eq!(approval.attempt, 4);
    assert_eq!(h.fake.deliveries().len(), 4);
    h.assert_events(&seq(&[
        CREATE,
        BEGIN_FIRST,
        NEW_SESSION_BUSY,
        SENT,
        INVALID,
        REPAIRED,
        INVALID,
        REPAIRED,
        INVALID,
        REPAIRED,
        INVALID,
        GATE,
    ]))
    .await;
}

/// Timeout → probe + rebootstrap → `session.recovered` → repair prompt → valid.
pub async fn timeout_recovers_then_valid(store: Arc<dyn Store>) {
    let h = Harness::with_timeout(store, &SOLO, Duration::from_millis(400)).await;
    h.fake
        .script("coder", [Script::nothing(), Script::valid(valid_impl())]);
    let artifact = completed(h.execute(&IMPLEMENT).await.expect("phase runs"));
    assert_eq!(artifact.attempt, 2);
    assert!(h.delivered_instructions()[1].contains("No artifact appeared"));
    h.assert_events(&seq(&[
        CREATE,
        BEGIN_FIRST,
        NEW_SESSION_BUSY,
        SENT,
        &["artifact.timeout", "session.recovered"],
        REPAIRED,
        // The recovered session is ready again under its new recovery count.
        &[
            "artifact.validated",
            "session.idle",
            "phase.completed",
            "session.ready",
            "run.completed",
        ],
    ]))
    .await;
    assert_eq!(h.session("coder").await.recovery_attempts, 1);
}

/// Two timeouts with a budget of one: `artifact_timeout_exhausted`.
pub async fn timeout_twice_gates(store: Arc<dyn Store>) {
    let h = Harness::with_timeout(store, &SOLO, Duration::from_millis(300)).await;
    h.fake
        .script("coder", [Script::nothing(), Script::nothing()]);
    let (approval, error) = needs_human(h.execute(&IMPLEMENT).await.expect("phase runs"));
    assert_eq!(error.code(), ErrorCode::ArtifactTimeoutExhausted);
    assert_eq!(approval.gate.as_str(), "artifact_timeout_exhausted");
    h.assert_events(&seq(&[
        CREATE,
        BEGIN_FIRST,
        NEW_SESSION_BUSY,
        SENT,
        &["artifact.timeout", "session.recovered"],
        REPAIRED,
        &["artifact.timeout"],
        GATE,
    ]))
    .await;
    h.assert_states(
        RunState::Paused,
        ("implement", PhaseState::Failed),
        ("coder", SessionState::FailedNeedsHuman),
    )
    .await;
    h.assert_transcript_captured("coder").await;
}

/// A timeout with a dead session gates with the session marked crashed.
pub async fn timeout_dead_session_gates(store: Arc<dyn Store>) {
    let h = Harness::with_timeout(store, &SOLO, Duration::from_millis(300)).await;
    h.fake.script("coder", [Script::dead()]);
    let (_, error) = needs_human(h.execute(&IMPLEMENT).await.expect("phase runs"));
    assert_eq!(error.code(), ErrorCode::SessionLost);
    h.assert_events(&seq(&[
        CREATE,
        BEGIN_FIRST,
        NEW_SESSION_BUSY,
        SENT,
        &["artifact.timeout"],
        GATE_CRASHED,
    ]))
    .await;
    let session = h.session("coder").await;
    assert_eq!(
        (session.state, session.recovery_attempts),
        (SessionState::FailedNeedsHuman, 1)
    );
}

/// A rebootstrap that keeps failing gates with `rebootstrap_failed`.
pub async fn rebootstrap_failure_gates(store: Arc<dyn Store>) {
    let h = Harness::with_timeout(store, &SOLO, Duration::from_millis(300)).await;
    h.fake.script("coder", [Script::rebootstrap_fails()]);
    let (_, error) = needs_human(h.execute(&IMPLEMENT).await.expect("phase runs"));
    assert_eq!(error.code(), ErrorCode::RebootstrapFailed);
    h.assert_events(&seq(&[
        CREATE,
        BEGIN_FIRST,
        NEW_SESSION_BUSY,
        SENT,
        &["artifact.timeout"],
        GATE,
    ]))
    .await;
}

/// Recoverable send failures within the budget are retried; beyond it they gate.
pub async fn send_failures(store: Arc<dyn Store>) {
    let h = Harness::new(store.clone(), &SOLO).await;
    h.fake.script(
        "coder",
        [Script::send_fails(2).then(Script::valid(valid_impl()))],
    );
    completed(
        h.execute(&IMPLEMENT)
            .await
            .expect("two failures are within the budget"),
    );
    assert_eq!(h.fake.prompts().len(), 3);
    assert_eq!(h.fake.deliveries().len(), 1);

    let h = Harness::new(store, &SOLO).await;
    h.fake.script(
        "coder",
        [Script::send_fails(3).then(Script::valid(valid_impl()))],
    );
    let (approval, error) = needs_human(h.execute(&IMPLEMENT).await.expect("phase runs"));
    assert_eq!(error.code(), ErrorCode::PromptSendExhausted);
    assert_eq!(approval.gate.as_str(), "prompt_send_exhausted");
    assert!(h.fake.deliveries().is_empty());
    h.assert_events(&seq(&[CREATE, BEGIN_FIRST, NEW_SESSION_BUSY, GATE_CRASHED]))
        .await;
    h.assert_states(
        RunState::Paused,
        ("implement", PhaseState::Failed),
        ("coder", SessionState::FailedNeedsHuman),
    )
    .await;
}

/// A fatal send fails the run and every session of it, which are disposed of. Here it hits
/// the repair prompt, so the transcript of the first prompt must still be captured.
pub async fn fatal_send_fails_run(store: Arc<dyn Store>) {
    let h = Harness::new(store, &SOLO).await;
    h.fake.script(
        "coder",
        [Script::schema_invalid(invalid_impl()), Script::send_fatal()],
    );
    let error = h.execute(&IMPLEMENT).await.expect_err("fatal");
    assert_eq!(error.class(), ErrorClass::Fatal);
    assert_eq!(error.run(), Some(h.id()));
    h.assert_events(&seq(&[
        CREATE,
        BEGIN_FIRST,
        NEW_SESSION_BUSY,
        SENT,
        INVALID,
        &["phase.started", "session.busy"],
        &["phase.failed", "run.failed", "session.failed"],
    ]))
    .await;
    h.assert_states(
        RunState::Failed,
        ("implement", PhaseState::Failed),
        ("coder", SessionState::FailedNeedsHuman),
    )
    .await;
    assert!(h.fake.is_disposed(h.session("coder").await.id));
    h.assert_transcript_captured("coder").await;
}

/// Session start: recoverable failures past the budget gate; a fatal one fails the run.
pub async fn session_start_failures(store: Arc<dyn Store>) {
    let h = Harness::new(store.clone(), &SOLO).await;
    h.fake.role("coder").start_fails(3);
    let (approval, error) = needs_human(h.execute(&IMPLEMENT).await.expect("phase runs"));
    assert_eq!(error.code(), ErrorCode::SessionStartFailed);
    assert_eq!(approval.gate.as_str(), "session_start_failed");
    h.assert_events(&seq(&[
        CREATE,
        BEGIN_FIRST,
        &["phase.failed", "run.paused", "approval.requested"],
    ]))
    .await;
    assert_eq!(h.run_now().await.state, RunState::Paused);

    let h = Harness::new(store, &SOLO).await;
    h.fake.role("coder").start_fails_fatally();
    let error = h.execute(&IMPLEMENT).await.expect_err("fatal start");
    assert_eq!(error.class(), ErrorClass::Fatal);
    h.assert_events(&seq(&[
        CREATE,
        BEGIN_FIRST,
        &["phase.failed", "run.failed"],
    ]))
    .await;
    assert_eq!(h.run_now().await.state, RunState::Failed);
}

/// A session marked FAILED_NEEDS_HUMAN (by another engine or a tool) is never resumed: the
/// attempt stops with `session_failed_needs_human` before any session call or prompt.
pub async fn failed_session_not_resumed(store: Arc<dyn Store>) {
    use crate::crash::{CrashSwitch, CrashingStore};
    let h = Harness::new(store.clone(), &FEATURE).await;
    h.fake.script("planner", [Script::valid(valid_plan())]);
    let approval = awaiting(h.execute(&PLAN).await.expect("plan runs"));
    let rework = Decision::Rework {
        feedback: "More detail.".into(),
    };
    h.engine
        .decide(approval.id, rework, "ada", None)
        .await
        .expect("rework");
    // The planner session exists; this engine reads it as FAILED_NEEDS_HUMAN.
    let failed = CrashingStore::new(store, CrashSwitch::never()).with_session_view(|mut s| {
        s.state = SessionState::FailedNeedsHuman;
        s
    });
    let engine = Engine::new(Arc::new(failed), Arc::new(h.fake.clone()))
        .with_options(h.engine.options().clone());
    let calls = h.fake.calls().len();
    let error = engine
        .execute_phase(h.id(), &PLAN, "Plan it.")
        .await
        .expect_err("refused");
    assert_eq!(error.code(), ErrorCode::SessionFailedNeedsHuman, "{error}");
    assert_eq!(error.class(), ErrorClass::HumanRequired);
    assert_eq!(h.fake.calls().len(), calls, "the session was not touched");
    assert_eq!(h.fake.deliveries().len(), 1, "no second prompt");
    let types = h.event_types().await;
    assert_eq!(
        types.last().map(String::as_str),
        Some("phase.started"),
        "{types:?}"
    );
    assert_eq!(h.phase("plan").await.state, PhaseState::Running);
}

/// A failure gate decided *retry*: back to `executing`, a new attempt with a fresh budget.
pub async fn failure_gate_retry(store: Arc<dyn Store>) {
    let h = Harness::new(store, &SOLO).await;
    h.fake.script(
        "coder",
        [
            Script::schema_invalid(invalid_numbered(1)),
            Script::schema_invalid(invalid_numbered(2)),
            Script::schema_invalid(invalid_numbered(3)),
            Script::valid(valid_impl()),
        ],
    );
    let (approval, _) = needs_human(h.execute(&IMPLEMENT).await.expect("phase runs"));
    let decided = h
        .engine
        .decide(approval.id, Decision::Retry, "ops", Some("agent fixed"))
        .await
        .expect("retry");
    assert_eq!(decided.run.state, RunState::Executing);
    assert_eq!(h.phase("implement").await.state, PhaseState::Pending);
    assert_eq!(h.session("coder").await.state, SessionState::Crashed);
    // Fresh budget: the third artifact is invalid too, and still gets a repair prompt.
    let artifact = completed(h.execute(&IMPLEMENT).await.expect("phase runs again"));
    assert_eq!(artifact.attempt, 4);
    assert_eq!(h.fake.deliveries().len(), 4);
    h.assert_events(&seq(&[
        CREATE,
        BEGIN_FIRST,
        NEW_SESSION_BUSY,
        SENT,
        INVALID,
        REPAIRED,
        INVALID,
        GATE,
        &["approval.decided", "session.crashed", "run.resumed"],
        &["phase.started", "session.ready", "session.busy"],
        SENT,
        INVALID,
        REPAIRED,
        COMPLETE_LAST,
    ]))
    .await;
    h.assert_states(
        RunState::Completed,
        ("implement", PhaseState::Completed),
        ("coder", SessionState::Ready),
    )
    .await;
}

/// An operator aborting or pausing the run while the agent works stops the phase with
/// `run_state_changed`, and nothing is written after the state change.
pub async fn run_changed_while_in_flight(store: Arc<dyn Store>) {
    let abort = OperatorAction::Abort {
        reason: "operator".into(),
    };
    let pause = OperatorAction::Pause {
        reason: "operator".into(),
    };
    // The agent either finishes a little later (the store refuses the verdict) or not at all
    // (the engine notices while it waits, long before the 60 s artifact timeout).
    let late = || Script::valid(valid_impl()).after(Duration::from_millis(600));
    for (action, script) in [
        (abort.clone(), late()),
        (pause.clone(), late()),
        (abort, Script::nothing()),
        (pause, Script::nothing()),
    ] {
        let h = Harness::with_timeout(store.clone(), &SOLO, Duration::from_secs(60)).await;
        h.fake.script("coder", [script]);
        let engine = h.engine.clone();
        let run = h.id();
        let phase =
            tokio::spawn(async move { engine.execute_phase(run, &IMPLEMENT, "Do it.").await });
        while h.fake.deliveries().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let stopped = h
            .engine
            .operate(run, action.clone())
            .await
            .expect("operator acts");
        let events_at_change = h.event_types().await;
        let error = tokio::time::timeout(Duration::from_secs(20), phase)
            .await
            .expect("the phase notices the change while it waits")
            .expect("join")
            .expect_err("the phase stops");
        assert_eq!(error.code(), ErrorCode::RunStateChanged, "{error}");
        assert_eq!(
            h.event_types().await,
            events_at_change,
            "nothing is written after the change"
        );
        assert_eq!(h.run_now().await.state, stopped.run.state);
        let expected_phase = match action {
            OperatorAction::Abort { .. } => PhaseState::Failed,
            OperatorAction::Pause { .. } => PhaseState::AwaitingArtifact,
        };
        assert_eq!(h.phase("implement").await.state, expected_phase);
        h.fake.assert_no_duplicate_delivery();
        h.assert_transcript_captured("coder").await;
    }
}

/// The artifact path is confined to the worktree: `..`, absolute and symlinked paths are refused.
pub async fn artifact_paths_confined(store: Arc<dyn Store>) {
    const DOTDOT: PhaseSpec = implement_at("../escape.json");
    const ABSOLUTE: PhaseSpec = implement_at("/tmp/escape.json");
    const LINKED: PhaseSpec = implement_at("link/impl.json");
    const LATE: PhaseSpec = implement_at("late/impl.json");
    const BAD: [WorkflowSpec; 3] = [
        WorkflowSpec::new("bad", &[DOTDOT]),
        WorkflowSpec::new("bad", &[ABSOLUTE]),
        WorkflowSpec::new("bad", &[LINKED]),
    ];
    const LATE_FLOW: WorkflowSpec = WorkflowSpec::new("late", &[LATE]);
    let fake = FakeSessions::new();
    let engine = Engine::new(store, Arc::new(fake));
    let worktree = tempfile::tempdir().expect("worktree");
    let outside = tempfile::tempdir().expect("outside");
    symlink_dir(outside.path(), &worktree.path().join("link"));
    for workflow in BAD {
        let spec = workflow.phases()[0];
        let error = engine
            .create_run(&workflow, "T", worktree.path())
            .await
            .expect_err("refused");
        assert_eq!(
            error.code(),
            ErrorCode::ArtifactOutsideWorktree,
            "{}: {error}",
            spec.artifact()
        );
        assert!(
            error.to_string().contains(spec.artifact()),
            "the error names the path: {error}"
        );
    }
    // A symlink that appears after the run was created is refused at execution.
    let workflow = LATE_FLOW;
    let run = engine
        .create_run(&workflow, "T", worktree.path())
        .await
        .expect("confined at creation");
    symlink_dir(outside.path(), &worktree.path().join("late"));
    let error = engine
        .execute_phase(run.id, &workflow.phases()[0], "Do it.")
        .await
        .expect_err("refused");
    assert_eq!(error.code(), ErrorCode::ArtifactOutsideWorktree);
    assert!(
        std::fs::read_dir(outside.path())
            .expect("outside")
            .next()
            .is_none(),
        "nothing written outside"
    );
}

/// The implement phase with another artifact path.
const fn implement_at(path: &'static str) -> PhaseSpec {
    PhaseSpec::new(
        "implement",
        "coder",
        path,
        "impl.schema.json",
        include_str!("../../schemas/impl.schema.json"),
    )
}

fn symlink_dir(target: &Path, link: &Path) {
    #[cfg(unix)]
    std::os::unix::fs::symlink(target, link).expect("create symlink");
    #[cfg(not(unix))]
    let _ = (target, link);
}

/// A stale artifact is removed before the prompt; an identical pre-existing file is not taken
/// for the new artifact; a slow chunked write is read only once complete.
pub async fn stale_and_slow_artifacts(store: Arc<dyn Store>) {
    // Identical pre-existing bytes, agent writes nothing: a timeout, not a false success.
    let h = Harness::with_timeout(store.clone(), &SOLO_BUDGET_0, Duration::from_millis(300)).await;
    let path = h.worktree.path().join("phaseflow/impl.json");
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&valid_impl()).expect("json"),
    )
    .expect("stale file");
    h.fake.script("coder", [Script::nothing()]);
    let (_, error) = needs_human(h.execute(&IMPLEMENT_BUDGET_0).await.expect("phase runs"));
    assert_eq!(error.code(), ErrorCode::ArtifactTimeoutExhausted);
    assert!(
        !path.exists(),
        "the stale artifact was removed before the prompt"
    );

    // A stale invalid file is removed; the agent's valid one is recorded.
    let h = Harness::new(store.clone(), &SOLO).await;
    let path = h.worktree.path().join("phaseflow/impl.json");
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(&path, b"{ stale").expect("stale file");
    h.fake.script(
        "coder",
        [Script::valid(valid_impl()).after(Duration::from_millis(100))],
    );
    let artifact = completed(h.execute(&IMPLEMENT).await.expect("phase runs"));
    assert_eq!(artifact.content, Some(valid_impl()));
    h.assert_events(&seq(&[
        CREATE,
        BEGIN_FIRST,
        NEW_SESSION_BUSY,
        SENT,
        COMPLETE_LAST,
    ]))
    .await;

    // Written in five chunks with pauses: read once, complete, valid.
    let h = Harness::new(store, &SOLO).await;
    h.fake.script(
        "coder",
        [Script::valid(valid_impl()).in_chunks(5, Duration::from_millis(80))],
    );
    let artifact = completed(h.execute(&IMPLEMENT).await.expect("phase runs"));
    assert_eq!(artifact.content, Some(valid_impl()));
    h.assert_events(&seq(&[
        CREATE,
        BEGIN_FIRST,
        NEW_SESSION_BUSY,
        SENT,
        COMPLETE_LAST,
    ]))
    .await;
}

/// Instantiates every engine scenario as a `#[tokio::test]` for a store built by `$make`
/// (an expression evaluating to a future of `Arc<dyn Store>`).
#[macro_export]
macro_rules! engine_scenario_tests {
    ($make:expr) => {
        $crate::engine_scenario_tests!(@each $make;
            happy_path, gate_then_approve, gate_then_rework, gate_then_reject,
            invalid_then_repaired, invalid_twice_gates, invalid_json_is_invalid,
            repair_budget_zero, repair_budget_three, timeout_recovers_then_valid,
            timeout_twice_gates, timeout_dead_session_gates, rebootstrap_failure_gates,
            send_failures, fatal_send_fails_run, session_start_failures, failure_gate_retry,
            failed_session_not_resumed,
            run_changed_while_in_flight, artifact_paths_confined, stale_and_slow_artifacts,
        );
    };
    (@each $make:expr; $($name:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $crate::scenarios::$name($make.await).await;
            }
        )+
    };
}
