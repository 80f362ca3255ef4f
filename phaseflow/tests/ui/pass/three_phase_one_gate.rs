//! A three-phase workflow with one approval gate, driven through every transition the types allow.
use std::path::Path;
use std::time::Duration;

use phaseflow::prelude::*;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct PlanDoc {
    pub summary: String,
}

#[derive(Debug, Deserialize)]
pub struct ImplReport {
    pub changed_files: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct ReviewDoc {
    pub verdict: String,
}

#[derive(Phase)]
#[phase(
    key = "plan",
    role = "planner",
    artifact = "phaseflow/plan.json",
    schema = "../../schemas/plan.schema.json",
    output = PlanDoc,
    approval = "plan_review",
)]
pub struct Plan;

#[derive(Phase)]
#[phase(
    key = "implement",
    role = "coder",
    artifact = "phaseflow/impl.json",
    schema = "../../schemas/impl.schema.json",
    output = ImplReport,
    repair_budget = 2,
)]
pub struct Implement;

#[derive(Phase)]
#[phase(
    key = "review",
    role = "reviewer",
    artifact = "phaseflow/review.json",
    schema = "../../schemas/review.schema.json",
    output = ReviewDoc,
)]
pub struct Review;

#[derive(Workflow)]
#[workflow(name = "feature", phases(Plan, Implement, Review))]
pub struct Feature;

/// Runs the whole workflow, asking a human at the plan gate.
async fn drive(engine: &Engine, worktree: &Path) -> Result<Option<RunId>> {
    let mut plan = engine
        .start::<Feature>(StartRun::new("TICKET-42", worktree))
        .await?;
    let implement = loop {
        let validated = match plan.execute("Plan the feature.").await? {
            Executed::Valid(run) => run,
            Executed::NeedsHuman(paused) => {
                let _ = (paused.gate(), paused.error());
                plan = paused.retry("ops", Some("agent restarted")).await?;
                continue;
            }
        };
        let doc: &PlanDoc = validated.output();
        assert!(!doc.summary.is_empty());
        let waiting = validated.request_approval()?;
        let _ = waiting.approval();
        match waiting.wait_decision(Duration::from_millis(50)).await? {
            AfterDecision::Approved(next) => break next,
            AfterDecision::Rework(again) => plan = again,
            AfterDecision::Rejected(ended) => {
                let _: Run<Feature, Ended> = ended;
                return Ok(None);
            }
        }
    };
    let review = match implement.execute("Implement the plan.").await? {
        Executed::Valid(run) => {
            let _: &ImplReport = run.output();
            run.complete()?
        }
        Executed::NeedsHuman(paused) => {
            let id = paused.id();
            paused.abort("ops", None).await?;
            return Ok(Some(id));
        }
    };
    let done: Run<Feature, Completed> = match review.execute("Review the change.").await? {
        Executed::Valid(run) => run.complete()?,
        Executed::NeedsHuman(paused) => match paused.wait_decision(Duration::from_secs(1)).await? {
            AfterFailure::Retried(_ready) => return Ok(None),
            AfterFailure::Aborted(_ended) => return Ok(None),
        },
    };
    Ok(Some(done.id()))
}

/// Another process picks the run up wherever it stands; the match is exhaustive.
async fn resume(engine: &Engine, id: RunId) -> Result<()> {
    match engine.resume::<Feature>(id).await? {
        FeatureState::Plan(PhaseAt::Ready(run)) => drop(run.execute("Plan the feature.").await?),
        FeatureState::Plan(PhaseAt::AwaitingApproval(run)) => {
            let _: Run<Feature, Ready<Implement>> =
                run.approve("alice", Some("looks good")).await?;
        }
        FeatureState::Plan(PhaseAt::Paused(run)) => drop(run.retry("alice", None).await?),
        FeatureState::Implement(PhaseAt::Ready(run)) => drop(run.execute("Implement it.").await?),
        FeatureState::Implement(PhaseAt::AwaitingApproval(run)) => drop(run.decision().await?),
        FeatureState::Implement(PhaseAt::Paused(run)) => drop(run.abort("alice", None).await?),
        FeatureState::Review(PhaseAt::Ready(run)) => drop(run.feedback().map(str::to_owned)),
        FeatureState::Review(PhaseAt::AwaitingApproval(run)) => drop(run),
        FeatureState::Review(PhaseAt::Paused(run)) => drop(run),
        FeatureState::Completed(run) => drop(run.record().await?),
        FeatureState::Ended(run) => drop(run),
    }
    Ok(())
}

/// Rework and reject are the other outcomes of the gate.
async fn send_back(waiting: Run<Feature, AwaitingApproval<Plan>>, reject: bool) -> Result<()> {
    if reject {
        let _: Run<Feature, Ended> = waiting.reject("alice", Some("out of scope")).await?;
    } else {
        let again: Run<Feature, Ready<Plan>> = waiting.rework("split step 2", "alice").await?;
        assert_eq!(again.feedback(), Some("split step 2"));
    }
    Ok(())
}

fn main() {
    let _ = (drive, resume, send_back);
    assert_eq!(<Feature as Workflow>::SPEC.name(), "feature");
    let keys: Vec<&str> = <Feature as Workflow>::SPEC
        .phases()
        .iter()
        .map(|p| p.key_str())
        .collect();
    assert_eq!(keys, ["plan", "implement", "review"]);
    assert_eq!(
        <Plan as Phase>::SPEC
            .approval()
            .map(|g| g.to_string())
            .as_deref(),
        Some("plan_review")
    );
    assert_eq!(<Implement as Phase>::SPEC.repair_budget(), 2);
    assert_eq!(<Review as Phase>::SPEC.repair_budget(), 1);
    assert_eq!(<Plan as Phase>::SPEC.schema_id(), "plan.schema.json");
}
