//! The typed API end to end: a three-phase workflow with one approval gate, driven on
//! `MemoryStore` + `FakeSessions`, and `Engine::resume` mapping every persisted state to the
//! right variant of the generated `FeatureState`.

use std::sync::Arc;
use std::time::Duration;

use phaseflow::prelude::*;
use phaseflow::state::{PhaseState, RunState};
use phaseflow::store::{OperatorAction, Store};
use phaseflow_fake::memory::MemoryStore;
use phaseflow_fake::scenarios::{valid_impl, valid_plan};
use phaseflow_fake::sessions::{FakeSessions, Script};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Deserialize)]
struct PlanDoc {
    summary: String,
    steps: Vec<PlanStep>,
}

#[derive(Debug, Deserialize)]
struct PlanStep {
    title: String,
}

#[derive(Debug, Deserialize)]
struct ImplReport {
    changed_files: Vec<String>,
    tests_passed: bool,
}

#[derive(Debug, Deserialize)]
struct ReviewDoc {
    verdict: String,
}

#[derive(Phase)]
#[phase(
    key = "plan",
    role = "planner",
    artifact = "phaseflow/plan.json",
    schema = "tests/schemas/plan.schema.json",
    output = PlanDoc,
    approval = "plan_review",
)]
struct Plan;

#[derive(Phase)]
#[phase(
    key = "implement",
    role = "coder",
    artifact = "phaseflow/impl.json",
    schema = "tests/schemas/impl.schema.json",
    output = ImplReport,
    repair_budget = 0,
)]
struct Implement;

#[derive(Phase)]
#[phase(
    key = "review",
    role = "reviewer",
    artifact = "phaseflow/review.json",
    schema = "tests/schemas/review.schema.json",
    output = ReviewDoc,
)]
struct Review;

#[derive(Workflow)]
#[workflow(name = "feature", phases(Plan, Implement, Review))]
struct Feature;

#[derive(Phase)]
#[phase(
    key = "solo",
    role = "coder",
    artifact = "phaseflow/impl.json",
    schema = "tests/schemas/impl.schema.json",
    output = ImplReport,
)]
struct Solo;

#[derive(Workflow)]
#[workflow(name = "solo", phases(Solo))]
struct OnePhase;

/// Stricter than its schema: the schema does not require `reviewer`.
#[derive(Debug, Deserialize)]
struct StrictReport {
    #[allow(dead_code)]
    reviewer: String,
}

#[derive(Phase)]
#[phase(
    key = "strict",
    role = "coder",
    artifact = "phaseflow/impl.json",
    schema = "tests/schemas/impl.schema.json",
    output = StrictReport,
)]
struct Strict;

#[derive(Workflow)]
#[workflow(name = "strict", phases(Strict))]
struct StrictFlow;

fn valid_review() -> Value {
    json!({ "verdict": "approve", "comments": [] })
}

/// One store, one fake agent world, one worktree; engines come and go over them.
struct World {
    store: Arc<MemoryStore>,
    fake: FakeSessions,
    engine: Engine,
    worktree: tempfile::TempDir,
}

impl World {
    fn new() -> Self {
        let store = Arc::new(MemoryStore::new());
        let fake = FakeSessions::new();
        let worktree = tempfile::tempdir().expect("create a worktree");
        let engine = Self::engine_over(&store, &fake);
        Self {
            store,
            fake,
            engine,
            worktree,
        }
    }

    fn engine_over(store: &Arc<MemoryStore>, fake: &FakeSessions) -> Engine {
        Engine::new(store.clone(), Arc::new(fake.clone()))
            .with_options(EngineOptions::default().with_artifact_timeout(Duration::from_secs(10)))
    }

    /// Another orchestrator process: a new engine identity over the same store and agents.
    fn restarted_engine(&self) -> Engine {
        Self::engine_over(&self.store, &self.fake)
    }

    async fn start(&self) -> Run<Feature, Ready<Plan>> {
        self.engine
            .start::<Feature>(StartRun::new("TICKET-42", self.worktree.path()))
            .await
            .expect("start the run")
    }

    async fn run_state(&self, id: RunId) -> RunState {
        self.store.run(id).await.expect("read the run").state
    }

    async fn phase_state(&self, id: RunId, key: &str) -> PhaseState {
        phaseflow::store::phase_of(self.store.as_ref(), id, &key.into())
            .await
            .expect("read the phase")
            .state
    }
}

fn valid<W: Workflow, P: phaseflow::typestate::InWorkflow<W>>(
    executed: Executed<W, P>,
) -> Run<W, Validated<P>> {
    match executed {
        Executed::Valid(run) => run,
        Executed::NeedsHuman(paused) => {
            panic!("expected a valid artifact, the run paused: {paused:?}")
        }
    }
}

/// Drives a run to the plan gate and files the request.
async fn to_plan_gate(world: &World) -> Run<Feature, AwaitingApproval<Plan>> {
    world.fake.script("planner", [Script::valid(valid_plan())]);
    let plan = valid(
        world
            .start()
            .await
            .execute("Plan TICKET-42.")
            .await
            .expect("execute plan"),
    );
    plan.request_approval().expect("plan has a gate")
}

#[tokio::test]
async fn the_typed_api_drives_three_phases_through_a_gate_to_completion() {
    let world = World::new();
    world.fake.script("planner", [Script::valid(valid_plan())]);
    world.fake.script("coder", [Script::valid(valid_impl())]);
    world
        .fake
        .script("reviewer", [Script::valid(valid_review())]);

    let run = world.start().await;
    let id = run.id();
    let plan = valid(run.execute("Plan TICKET-42.").await.unwrap());
    assert_eq!(plan.output().summary, "Add the flag");
    assert_eq!(plan.output().steps[0].title, "Wire it");
    assert!(plan.artifact().is_valid());

    let waiting = plan.request_approval().unwrap();
    assert_eq!(waiting.approval().gate.as_str(), "plan_review");
    assert_eq!(world.run_state(id).await, RunState::AwaitingApproval);
    assert_eq!(waiting.decision().await.unwrap(), None);

    let implement: Run<Feature, Ready<Implement>> =
        waiting.approve("alice", Some("go")).await.unwrap();
    assert_eq!(world.phase_state(id, "plan").await, PhaseState::Completed);

    let implemented = valid(implement.execute("Implement the plan.").await.unwrap());
    assert!(implemented.output().tests_passed);
    assert_eq!(implemented.output().changed_files, ["src/flag.rs"]);
    let review: Run<Feature, Ready<Review>> = implemented.complete().unwrap();

    let reviewed = valid(review.execute("Review the change.").await.unwrap());
    assert_eq!(reviewed.output().verdict, "approve");
    let done: Run<Feature, Completed> = reviewed.complete().unwrap();

    assert_eq!(done.record().await.unwrap().state, RunState::Completed);
    assert_eq!(world.fake.deliveries().len(), 3, "one prompt per phase");
    world.fake.assert_no_duplicate_delivery();
    world.fake.assert_scripts_consumed();
}

#[tokio::test]
async fn rework_sends_the_phase_back_with_the_feedback_in_its_next_prompt() {
    let world = World::new();
    let waiting = to_plan_gate(&world).await;
    world.fake.script("planner", [Script::valid(valid_plan())]);

    let again = waiting
        .rework("split step 1 in two", "alice")
        .await
        .unwrap();
    assert_eq!(again.feedback(), Some("split step 1 in two"));
    assert_eq!(
        world.phase_state(again.id(), "plan").await,
        PhaseState::Pending
    );

    let replanned = valid(again.execute("Plan TICKET-42.").await.unwrap());
    let prompts = world.fake.deliveries();
    assert_eq!(prompts.len(), 2);
    assert!(prompts[1].instructions.starts_with("Plan TICKET-42."));
    assert!(
        prompts[1].instructions.contains("split step 1 in two"),
        "{}",
        prompts[1].instructions
    );
    replanned.request_approval().unwrap();
}

#[tokio::test]
async fn reject_aborts_the_run() {
    let world = World::new();
    let waiting = to_plan_gate(&world).await;
    let ended: Run<Feature, Ended> = waiting.reject("alice", Some("out of scope")).await.unwrap();
    assert_eq!(ended.record().await.unwrap().state, RunState::Aborted);
}

#[tokio::test]
async fn decide_refuses_a_failure_gate_decision_at_a_workflow_gate() {
    let world = World::new();
    let waiting = to_plan_gate(&world).await;
    let id = waiting.id();
    let err = waiting
        .decide(Decision::Retry, "alice", None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
    assert_eq!(
        world.run_state(id).await,
        RunState::AwaitingApproval,
        "nothing was decided"
    );
}

#[tokio::test]
async fn wait_decision_follows_a_decision_made_by_another_process() {
    let world = World::new();
    let waiting = to_plan_gate(&world).await;
    let request = waiting.approval().id;
    let operator = world.restarted_engine();
    let decided = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        operator
            .decide(request, Decision::Approve, "bob", None)
            .await
    });
    match waiting
        .wait_decision(Duration::from_millis(10))
        .await
        .unwrap()
    {
        AfterDecision::Approved(implement) => {
            let _: Run<Feature, Ready<Implement>> = implement;
        }
        other => panic!("expected an approval, got {other:?}"),
    }
    decided.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_spent_repair_budget_pauses_the_run_and_retry_makes_the_phase_ready_again() {
    let world = World::new();
    let waiting = to_plan_gate(&world).await;
    world.fake.script(
        "coder",
        [Script::schema_invalid(json!({ "changed_files": [] }))],
    );
    let implement = waiting.approve("alice", None).await.unwrap();

    let paused = match implement.execute("Implement the plan.").await.unwrap() {
        Executed::NeedsHuman(paused) => paused,
        Executed::Valid(run) => {
            panic!("an invalid artifact with repair_budget = 0 validated: {run:?}")
        }
    };
    let gate = paused.gate().expect("a failure request was filed");
    assert_eq!(gate.gate.as_str(), "artifact_invalid_after_repair");
    assert_eq!(
        paused.error().map(Error::code),
        Some(ErrorCode::ArtifactInvalidAfterRepair)
    );
    assert_eq!(world.run_state(paused.id()).await, RunState::Paused);

    world.fake.script("coder", [Script::valid(valid_impl())]);
    let ready = paused.retry("alice", Some("try again")).await.unwrap();
    let implemented = valid(ready.execute("Implement the plan.").await.unwrap());
    let _: Run<Feature, Ready<Review>> = implemented.complete().unwrap();
}

#[tokio::test]
async fn abort_at_a_failure_gate_ends_the_run() {
    let world = World::new();
    let waiting = to_plan_gate(&world).await;
    world
        .fake
        .script("coder", [Script::schema_invalid(json!({}))]);
    let implement = waiting.approve("alice", None).await.unwrap();
    let Executed::NeedsHuman(paused) = implement.execute("Implement.").await.unwrap() else {
        panic!("expected the failure gate");
    };
    let ended = paused.abort("alice", Some("not worth it")).await.unwrap();
    assert_eq!(ended.record().await.unwrap().state, RunState::Aborted);
}

#[tokio::test]
async fn resume_returns_the_variant_of_each_persisted_state() {
    let world = World::new();

    // planning, plan pending
    let id = world.start().await.id();
    assert!(matches!(
        world.engine.resume::<Feature>(id).await.unwrap(),
        FeatureState::Plan(PhaseAt::Ready(ref run)) if run.feedback().is_none()
    ));

    // awaiting approval of the plan
    world.fake.script("planner", [Script::valid(valid_plan())]);
    let FeatureState::Plan(PhaseAt::Ready(plan)) =
        world.engine.resume::<Feature>(id).await.unwrap()
    else {
        panic!("plan should be ready");
    };
    valid(plan.execute("Plan TICKET-42.").await.unwrap())
        .request_approval()
        .unwrap();
    let waiting = match world
        .restarted_engine()
        .resume::<Feature>(id)
        .await
        .unwrap()
    {
        FeatureState::Plan(PhaseAt::AwaitingApproval(waiting)) => waiting,
        other => panic!("expected the plan gate, got {other:?}"),
    };
    assert_eq!(waiting.approval().gate.as_str(), "plan_review");

    // rework decided elsewhere: the plan is ready again, with its feedback
    world
        .engine
        .decide(
            waiting.approval().id,
            Decision::Rework {
                feedback: "smaller".into(),
            },
            "bob",
            None,
        )
        .await
        .unwrap();
    match world.engine.resume::<Feature>(id).await.unwrap() {
        FeatureState::Plan(PhaseAt::Ready(run)) => assert_eq!(run.feedback(), Some("smaller")),
        other => panic!("expected the plan ready for rework, got {other:?}"),
    }

    // approved: implement is ready
    world.fake.script("planner", [Script::valid(valid_plan())]);
    let FeatureState::Plan(PhaseAt::Ready(plan)) =
        world.engine.resume::<Feature>(id).await.unwrap()
    else {
        panic!("plan should be ready");
    };
    let waiting = valid(plan.execute("Plan TICKET-42.").await.unwrap())
        .request_approval()
        .unwrap();
    waiting.approve("alice", None).await.unwrap();
    assert!(matches!(
        world.engine.resume::<Feature>(id).await.unwrap(),
        FeatureState::Implement(PhaseAt::Ready(_))
    ));

    // paused at a failure gate of implement
    world
        .fake
        .script("coder", [Script::schema_invalid(json!({}))]);
    let FeatureState::Implement(PhaseAt::Ready(implement)) =
        world.engine.resume::<Feature>(id).await.unwrap()
    else {
        panic!("implement should be ready");
    };
    assert!(matches!(
        implement.execute("Implement.").await.unwrap(),
        Executed::NeedsHuman(_)
    ));
    let paused = match world
        .restarted_engine()
        .resume::<Feature>(id)
        .await
        .unwrap()
    {
        FeatureState::Implement(PhaseAt::Paused(paused)) => paused,
        other => panic!("expected implement paused, got {other:?}"),
    };
    assert_eq!(
        paused.gate().map(|g| g.gate.as_str()),
        Some("artifact_invalid_after_repair")
    );
    assert!(
        paused.error().is_none(),
        "the error is only known to the process that hit it"
    );

    // retried, then completed through review
    world.fake.script("coder", [Script::valid(valid_impl())]);
    world
        .fake
        .script("reviewer", [Script::valid(valid_review())]);
    let implement = paused.retry("alice", None).await.unwrap();
    let review = valid(implement.execute("Implement.").await.unwrap())
        .complete()
        .unwrap();
    assert!(matches!(
        world.engine.resume::<Feature>(id).await.unwrap(),
        FeatureState::Review(PhaseAt::Ready(_))
    ));
    valid(review.execute("Review.").await.unwrap())
        .complete()
        .unwrap();
    assert!(matches!(
        world.engine.resume::<Feature>(id).await.unwrap(),
        FeatureState::Completed(_)
    ));
    world.fake.assert_no_duplicate_delivery();
}

#[tokio::test]
async fn resume_maps_aborted_and_failed_runs_to_ended() {
    let world = World::new();
    let waiting = to_plan_gate(&world).await;
    let id = waiting.id();
    waiting.reject("alice", None).await.unwrap();
    assert!(matches!(
        world.engine.resume::<Feature>(id).await.unwrap(),
        FeatureState::Ended(_)
    ));

    let failed = world.start().await;
    let id = failed.id();
    world.fake.script("planner", [Script::send_fatal()]);
    let err = failed.execute("Plan.").await.unwrap_err();
    assert_eq!(err.class(), phaseflow::ErrorClass::Fatal);
    assert_eq!(world.run_state(id).await, RunState::Failed);
    assert!(matches!(
        world.engine.resume::<Feature>(id).await.unwrap(),
        FeatureState::Ended(_)
    ));
}

#[tokio::test]
async fn an_operator_pause_resumes_as_paused_without_a_request() {
    let world = World::new();
    let id = world.start().await.id();
    world
        .engine
        .operate(
            id,
            OperatorAction::Pause {
                reason: "maintenance".into(),
            },
        )
        .await
        .unwrap();
    let paused = match world.engine.resume::<Feature>(id).await.unwrap() {
        FeatureState::Plan(PhaseAt::Paused(paused)) => paused,
        other => panic!("expected the plan paused, got {other:?}"),
    };
    assert!(paused.gate().is_none());
    let ended = paused.abort("ops", Some("cancelled")).await.unwrap();
    assert_eq!(ended.record().await.unwrap().state, RunState::Aborted);
}

#[tokio::test]
async fn an_in_flight_phase_resumes_as_ready_and_continues_without_prompting_twice() {
    let world = World::new();
    world.fake.script(
        "planner",
        [Script::valid(valid_plan()).after(Duration::from_millis(300))],
    );
    let plan = world.start().await;
    let id = plan.id();
    // The first orchestrator dies while the agent works on the prompt.
    let first = tokio::spawn(plan.execute("Plan TICKET-42."));
    while world.phase_state(id, "plan").await != PhaseState::AwaitingArtifact {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.abort();
    let _ = first.await;

    let engine = world.restarted_engine();
    let plan = match engine.resume::<Feature>(id).await.unwrap() {
        FeatureState::Plan(PhaseAt::Ready(plan)) => plan,
        other => panic!("expected the in-flight plan as ready, got {other:?}"),
    };
    let plan = valid(plan.execute("Plan TICKET-42.").await.unwrap());
    assert_eq!(plan.output().summary, "Add the flag");
    assert_eq!(
        world.fake.deliveries().len(),
        1,
        "the prompt was delivered once"
    );
    world.fake.assert_no_duplicate_delivery();
}

#[tokio::test]
async fn resume_refuses_a_run_of_another_workflow() {
    let world = World::new();
    let id = world.start().await.id();
    let err = world.engine.resume::<OnePhase>(id).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
    assert!(
        err.message().contains("is a `feature` run, not `solo`"),
        "{err}"
    );
}

#[test]
fn the_derives_emit_the_declared_specs() {
    let plan = <Plan as Phase>::SPEC;
    assert_eq!(plan.key_str(), "plan");
    assert_eq!(plan.role().as_str(), "planner");
    assert_eq!(plan.artifact(), "phaseflow/plan.json");
    assert_eq!(plan.schema_id(), "plan.schema.json");
    assert_eq!(plan.schema(), include_str!("schemas/plan.schema.json"));
    assert_eq!(plan.repair_budget(), 1);
    assert_eq!(
        plan.approval().map(|g| g.to_string()).as_deref(),
        Some("plan_review")
    );
    assert_eq!(<Implement as Phase>::SPEC.repair_budget(), 0);
    assert_eq!(<Implement as Phase>::SPEC.approval(), None);
    let feature = <Feature as Workflow>::SPEC;
    assert_eq!(feature.name(), "feature");
    assert_eq!(
        feature.phases(),
        [plan, <Implement as Phase>::SPEC, <Review as Phase>::SPEC]
    );
}

#[tokio::test]
async fn an_output_type_that_disagrees_with_the_schema_is_an_output_decode_error() {
    let world = World::new();
    world.fake.script("coder", [Script::valid(valid_impl())]);
    let run = world
        .engine
        .start::<StrictFlow>(StartRun::new("TICKET-7", world.worktree.path()))
        .await
        .unwrap();
    let err = run.execute("Implement.").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::OutputDecode);
    assert!(
        err.message()
            .contains("satisfies schema `impl.schema.json` but does not decode into"),
        "{err}"
    );
    assert!(err.message().contains("missing field `reviewer`"), "{err}");
    assert_eq!(err.phase().map(|p| p.as_str()), Some("strict"));
}
