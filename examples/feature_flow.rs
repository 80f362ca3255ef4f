//! The main example: a feature workflow of three phases — plan (behind an approval gate),
//! implement, review — driven end to end through a scripted agent.
//!
//! ```sh
//! cargo run --example feature_flow                                     # in memory
//! DATABASE_URL=postgres://localhost/app cargo run --example feature_flow  # on PostgreSQL
//! ```
//!
//! The agent is `FakeSessions`, scripted to behave like a real one: it writes a plan; its first
//! implementation report fails the schema, and it fixes the report after the repair prompt that
//! lists the errors; then it writes the review. The plan is approved by a *simulated* reviewer.
//! The example prints the run's event log as a timeline while it goes, and the final artifacts.

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phaseflow::prelude::*;
use phaseflow_examples::backend;
use phaseflow_examples::timeline::Timeline;
use phaseflow_fake::{FakeSessions, Script};
use serde::Deserialize;
use serde_json::json;

/// The planner's plan (`schemas/plan.schema.json`).
#[derive(Debug, Deserialize)]
pub struct PlanDoc {
    /// One line about the change.
    pub summary: String,
    /// The steps, in order.
    pub steps: Vec<PlanStep>,
}

/// One step of a plan.
#[derive(Debug, Deserialize)]
pub struct PlanStep {
    /// What the step does.
    pub title: String,
    /// The files it touches.
    pub files: Vec<String>,
}

/// The coder's report (`schemas/impl.schema.json`).
#[derive(Debug, Deserialize)]
pub struct ImplReport {
    /// Files the change touched.
    pub changed_files: Vec<String>,
    /// Whether the tests passed afterwards.
    pub tests_passed: bool,
}

/// The reviewer's verdict (`schemas/review.schema.json`).
#[derive(Debug, Deserialize)]
pub struct ReviewDoc {
    /// `approve` or `request_changes`.
    pub verdict: String,
    /// Remarks.
    pub comments: Vec<String>,
}

/// The planner writes a plan, which a human approves before anything is implemented.
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

/// The coder implements the plan; one repair prompt is allowed after an invalid report.
#[derive(Debug, Phase)]
#[phase(
    key = "implement",
    role = "coder",
    artifact = "phaseflow/impl.json",
    schema = "schemas/impl.schema.json",
    output = ImplReport,
    repair_budget = 1
)]
pub struct Implement;

/// The reviewer reviews the change.
#[derive(Debug, Phase)]
#[phase(
    key = "review",
    role = "reviewer",
    artifact = "phaseflow/review.json",
    schema = "schemas/review.schema.json",
    output = ReviewDoc
)]
pub struct Review;

/// Plan → implement → review.
#[derive(Debug, Workflow)]
#[workflow(name = "feature", phases(Plan, Implement, Review))]
pub struct Feature;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let clock = Instant::now();
    let backend = backend::from_env().await?;
    let agent = scripted_agent();
    let engine = Engine::new(backend.store.clone(), Arc::new(agent.clone()))
        .with_options(EngineOptions::default().with_artifact_timeout(Duration::from_secs(10)));
    let worktree = tempfile::tempdir()?;

    println!("phaseflow feature_flow");
    println!("store:    {}", backend.description);
    println!("worktree: {}", worktree.path().display());
    let run = engine
        .start::<Feature>(StartRun::new("TICKET-42", worktree.path()))
        .await?;
    let id = run.id();
    println!("run:      {id}");
    let mut timeline = Timeline::new(backend.store.clone(), id);

    section("plan");
    let plan = match run
        .execute("Plan TICKET-42: add a --dry-run flag to `sync`.")
        .await?
    {
        Executed::Valid(plan) => plan,
        Executed::NeedsHuman(paused) => {
            timeline.print_new().await?;
            return Err(parked(paused.gate()));
        }
    };
    timeline.print_new().await?;
    let doc: &PlanDoc = plan.output();
    println!("  the plan: {} ({} steps)", doc.summary, doc.steps.len());
    for step in &doc.steps {
        println!("    - {} [{}]", step.title, step.files.join(", "));
    }
    let waiting = plan.request_approval()?;
    println!(
        "  [simulated reviewer] approves the plan at gate `{}` (a person would, with an operator tool)",
        waiting.approval().gate
    );
    let implement = waiting
        .approve("simulated reviewer", Some("Plan looks right."))
        .await?;
    timeline.print_new().await?;

    section("implement");
    let review = match implement.execute("Implement the approved plan.").await? {
        Executed::Valid(implemented) => {
            timeline.print_new().await?;
            let report: &ImplReport = implemented.output();
            println!(
                "  the report: {} file(s) changed, tests passed: {}",
                report.changed_files.len(),
                report.tests_passed
            );
            implemented.complete()?
        }
        Executed::NeedsHuman(paused) => {
            timeline.print_new().await?;
            return Err(parked(paused.gate()));
        }
    };
    if let Some(repair) = agent
        .deliveries()
        .iter()
        .find(|prompt| prompt.phase.as_str() == "implement" && prompt.attempt == 2)
    {
        println!("  the repair prompt the coder received (attempt 2):");
        for line in repair.instructions.lines() {
            println!("{}", format!("    │ {line}").trim_end());
        }
    }

    section("review");
    let done = match review.execute("Review the change.").await? {
        Executed::Valid(reviewed) => {
            timeline.print_new().await?;
            println!("  the verdict: {}", reviewed.output().verdict);
            reviewed.complete()?
        }
        Executed::NeedsHuman(paused) => {
            timeline.print_new().await?;
            return Err(parked(paused.gate()));
        }
    };

    section("artifacts");
    for phase in <Feature as Workflow>::SPEC.phases() {
        if let Some(artifact) = backend.store.latest_artifact(id, &phase.key()).await? {
            println!("{} (sha256 {}):", phase.artifact(), artifact.hash);
            println!("{:#}", artifact.content.unwrap_or_default());
        }
    }

    agent.assert_no_duplicate_delivery();
    println!(
        "\n✔ run {} is {} after {} ms; {} prompts delivered, none twice",
        done.id(),
        done.record().await?.state,
        clock.elapsed().as_millis(),
        agent.deliveries().len()
    );
    Ok(())
}

/// The agent, scripted prompt by prompt per role.
fn scripted_agent() -> FakeSessions {
    let think = Duration::from_millis(40);
    let agent = FakeSessions::new();
    agent.script(
        "planner",
        [Script::valid(json!({
            "summary": "Add --dry-run to `sync`: report what would change, write nothing",
            "steps": [
                { "title": "Parse the flag", "files": ["src/cli.rs"] },
                { "title": "Skip writes when it is set", "files": ["src/sync.rs"] },
                { "title": "Test both modes", "files": ["tests/sync.rs"] }
            ]
        }))
        .after(think)],
    );
    agent.script(
        "coder",
        [
            // Fails the schema: no changed file, and a string where a boolean belongs.
            Script::schema_invalid(json!({
                "changed_files": [],
                "tests_passed": "yes",
                "notes": "done"
            }))
            .after(think),
            Script::valid(json!({
                "changed_files": ["src/cli.rs", "src/sync.rs", "tests/sync.rs"],
                "tests_passed": true,
                "notes": "--dry-run prints the plan of changes and exits 0"
            }))
            .after(think),
        ],
    );
    agent.script(
        "reviewer",
        [Script::valid(json!({
            "verdict": "approve",
            "comments": ["Both modes are tested.", "The help text mentions the flag."]
        }))
        .after(think)],
    );
    agent
}

fn section(name: &str) {
    println!("\n── {name} {}", "─".repeat(60 - name.len()));
}

/// The run stopped at a failure gate; the scripted agent never leads here.
fn parked(gate: Option<&phaseflow::store::ApprovalRecord>) -> Box<dyn Error> {
    match gate {
        Some(request) => format!(
            "the run is paused at failure gate `{}`: {}",
            request.gate, request.payload
        )
        .into(),
        None => "the run was paused".into(),
    }
}
