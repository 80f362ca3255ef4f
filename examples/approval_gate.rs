//! An approval gate decided by an operator: the run parks at the plan's gate, an operator decides
//! through a *second* engine over the same store — as they would from another process, with an
//! operator tool — and the waiting orchestrator continues to completion.
//!
//! ```sh
//! cargo run --example approval_gate
//! ```
//!
//! The operator first sends the plan back for rework with feedback (the planner's next prompt
//! carries it), then approves the revised plan. Runs in memory, or on PostgreSQL when
//! `DATABASE_URL` is set.

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phaseflow::event::Decision;
use phaseflow::prelude::*;
use phaseflow_examples::backend;
use phaseflow_examples::timeline::Timeline;
use phaseflow_fake::{FakeSessions, Script};
use serde::Deserialize;
use serde_json::{Value, json};

/// The planner's plan (`schemas/plan.schema.json`).
#[derive(Debug, Deserialize)]
pub struct PlanDoc {
    /// One line about the change.
    pub summary: String,
    /// The steps, in order.
    pub steps: Vec<Value>,
}

/// The planner plans; a human approves the plan.
#[derive(Debug, Phase)]
#[phase(
    key = "plan",
    role = "planner",
    artifact = "phaseflow/plan.json",
    schema = "schemas/plan.schema.json",
    output = PlanDoc,
    approval = "plan_review"
)]
pub struct Plan;

/// The coder implements it.
#[derive(Debug, Phase)]
#[phase(
    key = "implement",
    role = "coder",
    artifact = "phaseflow/impl.json",
    schema = "schemas/impl.schema.json",
    output = Value
)]
pub struct Implement;

/// Plan (gated) → implement.
#[derive(Debug, Workflow)]
#[workflow(name = "gated_feature", phases(Plan, Implement))]
pub struct GatedFeature;

/// How often the parked orchestrator looks for a decision.
const POLL: Duration = Duration::from_millis(20);

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let clock = Instant::now();
    let backend = backend::from_env().await?;
    let agent = scripted_agent();
    let worktree = tempfile::tempdir()?;
    let options = EngineOptions::default().with_artifact_timeout(Duration::from_secs(10));
    // The orchestrator drives the run; the operator only decides. Two engines, one store.
    let orchestrator =
        Engine::new(backend.store.clone(), Arc::new(agent.clone())).with_options(options);
    let operator = Engine::new(backend.store.clone(), Arc::new(FakeSessions::new()));

    println!("phaseflow approval_gate");
    println!("store:    {}", backend.description);
    println!("worktree: {}", worktree.path().display());
    let mut plan = orchestrator
        .start::<GatedFeature>(StartRun::new("TICKET-51", worktree.path()))
        .await?;
    let id = plan.id();
    println!("run:      {id}");
    let mut timeline = Timeline::new(backend.store.clone(), id);

    let mut round = 0;
    let implement = loop {
        round += 1;
        println!("\n── orchestrator: plan, round {round}");
        let validated = match plan
            .execute("Plan TICKET-51: rate-limit the login endpoint.")
            .await?
        {
            Executed::Valid(validated) => validated,
            Executed::NeedsHuman(_) => return Err("the planner failed; see the timeline".into()),
        };
        timeline.print_new().await?;
        let waiting = validated.request_approval()?;
        println!(
            "  parked at gate `{}` (request {}); waiting for a decision made elsewhere",
            waiting.approval().gate,
            waiting.approval().id
        );
        let parked = tokio::spawn(waiting.wait_decision(POLL));

        operator_decides(&operator, id, round).await?;
        timeline.print_new().await?;

        match parked.await?? {
            AfterDecision::Approved(next) => {
                println!("  orchestrator: approved — moving on");
                break next;
            }
            AfterDecision::Rework(again) => {
                println!(
                    "  orchestrator: sent back with feedback {:?} — planning again",
                    again.feedback().unwrap_or_default()
                );
                plan = again;
            }
            AfterDecision::Rejected(_) => return Err("the operator rejected the plan".into()),
        }
    };

    if let Some(prompt) = agent
        .deliveries()
        .iter()
        .find(|p| p.phase.as_str() == "plan" && p.attempt == 2)
    {
        println!("  the planner's second prompt:");
        for line in prompt.instructions.lines() {
            println!("{}", format!("    │ {line}").trim_end());
        }
    }

    println!("\n── orchestrator: implement");
    let done = match implement.execute("Implement the approved plan.").await? {
        Executed::Valid(implemented) => implemented.complete()?,
        Executed::NeedsHuman(_) => return Err("the coder failed; see the timeline".into()),
    };
    timeline.print_new().await?;

    let feedback_delivered = agent
        .deliveries()
        .iter()
        .any(|p| p.phase.as_str() == "plan" && p.attempt == 2 && p.instructions.contains(FEEDBACK));
    println!(
        "\n✔ run {} is {} after {} ms; the planner's second prompt carried the feedback: {}",
        done.id(),
        done.record().await?.state,
        clock.elapsed().as_millis(),
        if feedback_delivered { "yes" } else { "no" }
    );
    agent.assert_no_duplicate_delivery();
    Ok(())
}

const FEEDBACK: &str = "Add a step that documents the limit in docs/api.md.";

/// The operator's side: find where the run stands, read the plan, decide.
async fn operator_decides(operator: &Engine, id: RunId, round: u32) -> Result<(), Box<dyn Error>> {
    println!("── operator (a second engine over the same store)");
    let GatedFeatureState::Plan(PhaseAt::AwaitingApproval(waiting)) =
        operator.resume::<GatedFeature>(id).await?
    else {
        return Err("the run is not waiting at the plan gate".into());
    };
    let request = waiting.approval();
    let plan = operator
        .store()
        .latest_artifact(id, &request.phase)
        .await?
        .and_then(|artifact| artifact.content)
        .unwrap_or_default();
    println!(
        "  pending: gate `{}`, phase `{}`, attempt {}: {} ({} steps)",
        request.gate,
        request.phase,
        request.attempt,
        plan["summary"].as_str().unwrap_or("?"),
        plan["steps"].as_array().map_or(0, Vec::len)
    );
    let decision = if round == 1 {
        Decision::Rework {
            feedback: FEEDBACK.into(),
        }
    } else {
        Decision::Approve
    };
    println!("  operator decides: {}", decision.as_str());
    waiting.decide(decision, "operator alice", None).await?;
    Ok(())
}

fn scripted_agent() -> FakeSessions {
    let agent = FakeSessions::new();
    let step = |title: &str, file: &str| json!({ "title": title, "files": [file] });
    agent.script(
        "planner",
        [
            Script::valid(json!({
                "summary": "Rate-limit POST /login per client IP",
                "steps": [step("Add a token bucket", "src/limit.rs"), step("Wire it into login", "src/login.rs")]
            })),
            Script::valid(json!({
                "summary": "Rate-limit POST /login per client IP, documented",
                "steps": [
                    step("Add a token bucket", "src/limit.rs"),
                    step("Wire it into login", "src/login.rs"),
                    step("Document the limit", "docs/api.md")
                ]
            })),
        ],
    );
    agent.script(
        "coder",
        [Script::valid(json!({
            "changed_files": ["src/limit.rs", "src/login.rs", "docs/api.md"],
            "tests_passed": true,
            "notes": "10 attempts per minute per IP"
        }))],
    );
    agent
}
