//! Crash injection: a [`Store`] and a [`SessionRuntime`] wrapper that "crash" at the Nth call,
//! before or after the inner call took effect, and a sweep that proves recovery for every N.
//!
//! A crash returns an injected error and poisons the [`CrashSwitch`]: every later call through
//! either wrapper fails too, as if the orchestrator process had died. The sweep then drops that
//! engine, builds a fresh one on the same store and the same fake agent world (files on disk
//! stay, agents keep writing), resumes the run with [`Engine::resume_any`] and drives it to the
//! end, and checks the invariants of DESIGN.md "Targets → Recovery".

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use phaseflow::envelope::PromptEnvelope;
use phaseflow::error::{Error, ErrorClass, ErrorCode, Result};
use phaseflow::event::{Decision, Event, EventKind};
use phaseflow::ids::{ApprovalId, PhaseKey, RoleKey, RunId, SessionId};
use phaseflow::session::{Delivery, Probe, SessionRuntime, StartSession};
use phaseflow::spec::WorkflowSpec;
use phaseflow::state::{PhaseState, RunState, SessionState};
use phaseflow::store::{
    ApprovalRecord, ArtifactRecord, BeginAttempt, BeginOutcome, Decide, FinishPhase, Finished,
    MarkBusy, NewRun, OperatorAction, PhaseRecord, PhaseWork, RecordPrompt, RecordVerdict,
    RunRecord, SessionEvent, SessionRecord, Store, TranscriptChunk,
};
use phaseflow::{Engine, EngineOptions, RunStatus};

use crate::scenarios::{self, FEATURE, SOLO};
use crate::sessions::{FakeSessions, Script};

/// How many crash cases of a sweep run at once.
const CONCURRENT_CASES: usize = 8;

/// Whether the injected crash happens before the inner call or after it took effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CrashPoint {
    /// The inner call never runs.
    Before,
    /// The inner call runs to completion (a commit, a delivery), then the caller dies.
    After,
}

#[derive(Debug, Default)]
struct SwitchState {
    calls: u64,
    at: Option<(u64, CrashPoint)>,
    crashed_in: Option<&'static str>,
}

/// Counts calls through the wrappers sharing it and fires once at the chosen one.
#[derive(Clone, Debug, Default)]
pub struct CrashSwitch(Arc<Mutex<SwitchState>>);

impl CrashSwitch {
    /// A switch that never fires (for counting calls).
    pub fn never() -> Self {
        Self::default()
    }

    /// A switch that fires at the `n`th call (1-based).
    pub fn at(n: u64, point: CrashPoint) -> Self {
        let switch = Self::default();
        switch.state().at = Some((n, point));
        switch
    }

    /// Calls seen so far.
    pub fn calls(&self) -> u64 {
        self.state().calls
    }

    /// The call that crashed, once it has.
    pub fn crashed_in(&self) -> Option<&'static str> {
        self.state().crashed_in
    }

    fn state(&self) -> MutexGuard<'_, SwitchState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn guard<T>(
        &self,
        name: &'static str,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let fire = {
            let mut state = self.state();
            if let Some(crashed) = state.crashed_in {
                return Err(crash_error(name, crashed));
            }
            state.calls += 1;
            match state.at {
                Some((n, point)) if n == state.calls => {
                    state.crashed_in = Some(name);
                    Some(point)
                }
                _ => None,
            }
        };
        match fire {
            None => call.await,
            Some(CrashPoint::Before) => Err(crash_error(name, name)),
            Some(CrashPoint::After) => {
                let _effect = call.await;
                Err(crash_error(name, name))
            }
        }
    }
}

fn crash_error(call: &str, crashed: &str) -> Error {
    Error::new(
        ErrorCode::StoreUnavailable,
        format!("injected crash (at `{crashed}`, refusing `{call}`)"),
    )
    .with_class(ErrorClass::Fatal)
}

/// A [`Store`] whose calls go through a [`CrashSwitch`].
#[derive(Debug)]
pub struct CrashingStore {
    inner: Arc<dyn Store>,
    switch: CrashSwitch,
    session_view: Option<fn(SessionRecord) -> SessionRecord>,
}

impl CrashingStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Store>, switch: CrashSwitch) -> Self {
        Self {
            inner,
            switch,
            session_view: None,
        }
    }

    /// Rewrites every session the store reads back, to simulate state written by someone else
    /// (another engine, an operator's tool) that the engine must refuse to build on.
    pub fn with_session_view(mut self, view: fn(SessionRecord) -> SessionRecord) -> Self {
        self.session_view = Some(view);
        self
    }
}

#[async_trait]
impl Store for CrashingStore {
    async fn create_run(&self, run: NewRun) -> Result<RunRecord> {
        self.switch
            .guard("create_run", self.inner.create_run(run))
            .await
    }
    async fn begin_attempt(&self, cmd: BeginAttempt) -> Result<BeginOutcome> {
        self.switch
            .guard("begin_attempt", self.inner.begin_attempt(cmd))
            .await
    }
    async fn claim_phase(&self, work: PhaseWork) -> Result<PhaseRecord> {
        self.switch
            .guard("claim_phase", self.inner.claim_phase(work))
            .await
    }
    async fn mark_busy(&self, cmd: MarkBusy) -> Result<SessionRecord> {
        self.switch
            .guard("mark_busy", self.inner.mark_busy(cmd))
            .await
    }
    async fn record_prompt(&self, cmd: RecordPrompt) -> Result<()> {
        self.switch
            .guard("record_prompt", self.inner.record_prompt(cmd))
            .await
    }
    async fn record_session_event(
        &self,
        work: PhaseWork,
        session: SessionId,
        event: SessionEvent,
    ) -> Result<SessionRecord> {
        self.switch
            .guard(
                "record_session_event",
                self.inner.record_session_event(work, session, event),
            )
            .await
    }
    async fn record_verdict(&self, cmd: RecordVerdict) -> Result<ArtifactRecord> {
        self.switch
            .guard("record_verdict", self.inner.record_verdict(cmd))
            .await
    }
    async fn finish_phase(&self, cmd: FinishPhase) -> Result<Finished> {
        self.switch
            .guard("finish_phase", self.inner.finish_phase(cmd))
            .await
    }
    async fn decide(&self, cmd: Decide) -> Result<Finished> {
        self.switch.guard("decide", self.inner.decide(cmd)).await
    }
    async fn operate(&self, run: RunId, action: OperatorAction) -> Result<Finished> {
        self.switch
            .guard("operate", self.inner.operate(run, action))
            .await
    }
    async fn append_transcript(
        &self,
        session: SessionId,
        chunks: Vec<TranscriptChunk>,
    ) -> Result<()> {
        self.switch
            .guard(
                "append_transcript",
                self.inner.append_transcript(session, chunks),
            )
            .await
    }
    async fn run(&self, run: RunId) -> Result<RunRecord> {
        self.switch.guard("run", self.inner.run(run)).await
    }
    async fn phases(&self, run: RunId) -> Result<Vec<PhaseRecord>> {
        self.switch.guard("phases", self.inner.phases(run)).await
    }
    async fn session(&self, run: RunId, role: &RoleKey) -> Result<Option<SessionRecord>> {
        let session = self
            .switch
            .guard("session", self.inner.session(run, role))
            .await?;
        Ok(match self.session_view {
            Some(view) => session.map(view),
            None => session,
        })
    }
    async fn sessions(&self, run: RunId) -> Result<Vec<SessionRecord>> {
        self.switch
            .guard("sessions", self.inner.sessions(run))
            .await
    }
    async fn events(&self, run: RunId, after: u64) -> Result<Vec<Event>> {
        self.switch
            .guard("events", self.inner.events(run, after))
            .await
    }
    async fn approvals(&self, run: RunId) -> Result<Vec<ApprovalRecord>> {
        self.switch
            .guard("approvals", self.inner.approvals(run))
            .await
    }
    async fn approval(&self, id: ApprovalId) -> Result<ApprovalRecord> {
        self.switch.guard("approval", self.inner.approval(id)).await
    }
    async fn latest_artifact(
        &self,
        run: RunId,
        phase: &PhaseKey,
    ) -> Result<Option<ArtifactRecord>> {
        self.switch
            .guard("latest_artifact", self.inner.latest_artifact(run, phase))
            .await
    }
    async fn transcript(&self, session: SessionId) -> Result<Vec<TranscriptChunk>> {
        self.switch
            .guard("transcript", self.inner.transcript(session))
            .await
    }
}

/// A [`SessionRuntime`] whose calls go through a [`CrashSwitch`].
#[derive(Debug)]
pub struct CrashingSessions {
    inner: Arc<dyn SessionRuntime>,
    switch: CrashSwitch,
}

impl CrashingSessions {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn SessionRuntime>, switch: CrashSwitch) -> Self {
        Self { inner, switch }
    }
}

#[async_trait]
impl SessionRuntime for CrashingSessions {
    async fn start(&self, request: &StartSession) -> Result<()> {
        self.switch.guard("start", self.inner.start(request)).await
    }
    async fn resume(&self, session: SessionId) -> Result<()> {
        self.switch
            .guard("resume", self.inner.resume(session))
            .await
    }
    async fn send_prompt(&self, session: SessionId, envelope: &PromptEnvelope) -> Result<Delivery> {
        self.switch
            .guard("send_prompt", self.inner.send_prompt(session, envelope))
            .await
    }
    async fn probe(&self, session: SessionId) -> Result<Probe> {
        self.switch.guard("probe", self.inner.probe(session)).await
    }
    async fn rebootstrap(&self, session: SessionId) -> Result<()> {
        self.switch
            .guard("rebootstrap", self.inner.rebootstrap(session))
            .await
    }
    async fn dispose(&self, session: SessionId) -> Result<()> {
        self.switch
            .guard("dispose", self.inner.dispose(session))
            .await
    }
    async fn capture(&self, session: SessionId, from_seq: u64) -> Result<Vec<TranscriptChunk>> {
        self.switch
            .guard("capture", self.inner.capture(session, from_seq))
            .await
    }
}

/// One recovery scenario: a workflow and what the fake agents do.
#[derive(Clone, Copy, Debug)]
pub struct CrashScenario {
    /// Name for reports.
    pub name: &'static str,
    /// The workflow.
    pub workflow: WorkflowSpec,
    /// Scripts the fake agents.
    pub script: fn(&FakeSessions),
    /// Artifact timeout of the engines.
    pub artifact_timeout: Duration,
}

/// The five scenarios of the sweep: happy, gated, invalid → repair, timeout → recovery, and a
/// human gate after the budget.
pub fn crash_scenarios() -> Vec<CrashScenario> {
    let fast = Duration::from_secs(5);
    vec![
        CrashScenario {
            name: "happy",
            workflow: SOLO,
            script: |fake| {
                fake.script("coder", [Script::valid(scenarios::valid_impl())]);
            },
            artifact_timeout: fast,
        },
        CrashScenario {
            name: "gated",
            workflow: FEATURE,
            script: |fake| {
                fake.script("planner", [Script::valid(scenarios::valid_plan())]);
                fake.script("coder", [Script::valid(scenarios::valid_impl())]);
            },
            artifact_timeout: fast,
        },
        CrashScenario {
            name: "invalid_then_repair",
            workflow: SOLO,
            script: |fake| {
                fake.script(
                    "coder",
                    [
                        Script::schema_invalid(scenarios::invalid_impl()),
                        Script::valid(scenarios::valid_impl()),
                    ],
                );
            },
            artifact_timeout: fast,
        },
        CrashScenario {
            name: "timeout_then_recovery",
            workflow: SOLO,
            script: |fake| {
                fake.script(
                    "coder",
                    [Script::nothing(), Script::valid(scenarios::valid_impl())],
                );
            },
            artifact_timeout: Duration::from_millis(600),
        },
        CrashScenario {
            name: "gate_after_budget",
            workflow: SOLO,
            script: |fake| {
                fake.script(
                    "coder",
                    [
                        Script::schema_invalid(scenarios::invalid_numbered(1)),
                        Script::schema_invalid(scenarios::invalid_numbered(2)),
                    ],
                );
            },
            artifact_timeout: fast,
        },
    ]
}

/// Drives a run until it finishes or parks at a failure gate, approving workflow gates as a
/// simulated reviewer. Returns the run's final record.
pub async fn drive_to_rest(engine: &Engine, run: RunId) -> Result<RunRecord> {
    loop {
        match engine.resume_any(run).await? {
            RunStatus::Ready { phase, .. } => {
                engine
                    .execute_phase(run, &phase, "Do the work for TICKET-42.")
                    .await?;
            }
            RunStatus::Resumed { .. } => {}
            RunStatus::AwaitingApproval { approval, .. } => {
                engine
                    .decide(approval.id, Decision::Approve, "simulated reviewer", None)
                    .await?;
            }
            RunStatus::Paused { run, .. } | RunStatus::Finished(run) => return Ok(run),
        }
    }
}

/// What a finished run looks like, for comparing a crashed run with an uncrashed one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOutcome {
    /// Final run state.
    pub run: RunState,
    /// Final phase states in order.
    pub phases: Vec<(PhaseKey, PhaseState)>,
    /// Artifact verdict events as (type, content hash), sorted.
    pub verdicts: Vec<(String, String)>,
}

/// Counts of a sweep.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Crash cases run (each: crash, fresh engine, resume, drive to the end, check).
    pub cases: usize,
    /// Calls the uncrashed scenario makes (the largest N swept).
    pub calls: u64,
}

/// Runs one scenario without a crash, then once per call N and crash point, checking after each
/// crash that the run ends as without it, that no dedup key reached an agent twice, that the
/// event log has no duplicate key or gap, that every artifact verdict was recorded exactly once,
/// and that no session is left BUSY. Panics (it is a test helper) with the failing case.
pub async fn sweep(store: Arc<dyn Store>, scenario: CrashScenario) -> SweepReport {
    let options = EngineOptions::default().with_artifact_timeout(scenario.artifact_timeout);
    let baseline = {
        let switch = CrashSwitch::never();
        let (outcome, _) = crash_case(&store, &scenario, &options, switch.clone()).await;
        let calls = switch.calls();
        (outcome, calls)
    };
    let (expected, calls) = baseline;
    // Cases are independent runs with their own agent world, so they run concurrently; most of
    // their time is spent waiting for artifacts and timeouts.
    let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_CASES));
    let mut cases = tokio::task::JoinSet::new();
    for n in 1..=calls {
        for point in [CrashPoint::Before, CrashPoint::After] {
            let (store, options, slots) = (store.clone(), options.clone(), slots.clone());
            cases.spawn(async move {
                let _slot = slots
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed");
                let switch = CrashSwitch::at(n, point);
                let (outcome, _) = crash_case(&store, &scenario, &options, switch.clone()).await;
                (n, point, switch.crashed_in(), outcome)
            });
        }
    }
    let mut report = SweepReport { cases: 0, calls };
    while let Some(case) = cases.join_next().await {
        let (n, point, crashed_in, outcome) = match case {
            Ok(case) => case,
            Err(panicked) => std::panic::resume_unwind(panicked.into_panic()),
        };
        assert!(
            crashed_in.is_some(),
            "{}: call {n} was never reached",
            scenario.name
        );
        assert_eq!(
            outcome,
            expected,
            "{}: crash {point:?} call {n} (`{}`) changed the outcome",
            scenario.name,
            crashed_in.unwrap_or("?")
        );
        report.cases += 1;
    }
    report
}

/// One case: create a run, drive it through engines wired to `switch` until it rests or crashes,
/// then (after a crash) finish it with a fresh engine, and check the invariants.
async fn crash_case(
    store: &Arc<dyn Store>,
    scenario: &CrashScenario,
    options: &EngineOptions,
    switch: CrashSwitch,
) -> (RunOutcome, RunId) {
    let world = FakeSessions::new();
    (scenario.script)(&world);
    let worktree = tempfile::tempdir().expect("worktree");
    let plain = Engine::new(store.clone(), Arc::new(world.clone()))
        .with_options(options.clone())
        .with_workflow(scenario.workflow);
    let run = plain
        .create_run(&scenario.workflow, "TICKET-42", worktree.path())
        .await
        .expect("create run")
        .id;
    let doomed = Engine::new(
        Arc::new(CrashingStore::new(store.clone(), switch.clone())),
        Arc::new(CrashingSessions::new(
            Arc::new(world.clone()),
            switch.clone(),
        )),
    )
    .with_options(options.clone())
    .with_workflow(scenario.workflow);
    let first = drive_to_rest(&doomed, run).await;
    drop(doomed);
    match (first, switch.crashed_in()) {
        (Ok(_), None) => {}
        (Err(error), None) => panic!("{}: the run failed without a crash: {error}", scenario.name),
        (_, Some(_)) => {
            let fresh = Engine::new(store.clone(), Arc::new(world.clone()))
                .with_options(options.clone())
                .with_workflow(scenario.workflow);
            if let Err(error) = drive_to_rest(&fresh, run).await {
                panic!(
                    "{}: resuming after a crash at call {} (`{}`) failed: {error}",
                    scenario.name,
                    switch.calls(),
                    switch.crashed_in().unwrap_or("?")
                );
            }
        }
    }
    world.settle().await;
    world.assert_no_duplicate_delivery();
    (
        check_invariants(store.as_ref(), run, scenario.name).await,
        run,
    )
}

async fn check_invariants(store: &dyn Store, run: RunId, scenario: &str) -> RunOutcome {
    let events = store.events(run, 0).await.expect("events");
    crate::conformance::assert_event_log(&events);
    let sessions = store.sessions(run).await.expect("sessions");
    assert!(
        sessions.iter().all(|s| s.state != SessionState::Busy),
        "{scenario}: a session was left BUSY: {sessions:?}"
    );
    let mut verdicts: Vec<(String, String)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::ArtifactValidated { hash, .. } | EventKind::ArtifactInvalid { hash, .. } => {
                Some((e.kind.type_name().to_owned(), hash.as_str().to_owned()))
            }
            _ => None,
        })
        .collect();
    verdicts.sort();
    let record = store.run(run).await.expect("run");
    let phases = store
        .phases(run)
        .await
        .expect("phases")
        .into_iter()
        .map(|p| (p.key, p.state))
        .collect();
    RunOutcome {
        run: record.state,
        phases,
        verdicts,
    }
}
