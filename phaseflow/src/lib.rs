//! phaseflow drives AI coding agents through a typed, durable, multi-phase workflow.
//!
//! ```
//! use std::sync::Arc;
//!
//! use phaseflow::prelude::*;
//! use serde::Deserialize;
//! # use phaseflow_fake::{memory::MemoryStore, scenarios, sessions::{FakeSessions, Script}};
//!
//! /// What the planner writes (the schema says the same in JSON Schema).
//! #[derive(Debug, Deserialize)]
//! pub struct PlanDoc {
//!     pub summary: String,
//! }
//!
//! #[derive(Debug, Deserialize)]
//! pub struct ImplReport {
//!     pub changed_files: Vec<String>,
//! }
//!
//! #[derive(Phase)]
//! #[phase(
//!     key = "plan",
//!     role = "planner",                          // one agent session per (run, role)
//!     artifact = "phaseflow/plan.json",          // relative to the run's worktree
//!     schema = "tests/schemas/plan.schema.json", // read and compiled at build time
//!     output = PlanDoc,                          // what the valid artifact decodes into
//!     approval = "plan_review",                  // a human reviews every plan
//! )]
//! pub struct Plan;
//!
//! #[derive(Phase)]
//! #[phase(
//!     key = "implement",
//!     role = "coder",
//!     artifact = "phaseflow/impl.json",
//!     schema = "tests/schemas/impl.schema.json",
//!     output = ImplReport,
//!     repair_budget = 2,                         // repair prompts before a human is asked
//! )]
//! pub struct Implement;
//!
//! #[derive(Workflow)]
//! #[workflow(name = "feature", phases(Plan, Implement))]
//! pub struct Feature;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> phaseflow::Result<()> {
//! # let worktree = tempfile::tempdir().expect("a worktree");
//! # let agents = FakeSessions::new();
//! # agents.script("planner", [Script::valid(scenarios::valid_plan())]);
//! # agents.script("coder", [Script::valid(scenarios::valid_impl())]);
//! // A store (MemoryStore here, PgStore in production) and a runtime that reaches the agents.
//! let engine = Engine::new(Arc::new(MemoryStore::new()), Arc::new(agents));
//!
//! let run = engine.start::<Feature>(StartRun::new("TICKET-42", worktree.path())).await?;
//! let id = run.id(); // keep it: any process can `engine.resume::<Feature>(id)` later
//! let plan = match run.execute("Plan TICKET-42: add a --json flag.").await? {
//!     Executed::Valid(plan) => plan,
//!     // The repair budget is spent: the run is paused until a human says retry or abort.
//!     Executed::NeedsHuman(paused) => return Ok(drop(paused.gate())),
//! };
//! let doc: &PlanDoc = plan.output(); // typed, and only reachable once validated
//! println!("plan: {}", doc.summary);
//!
//! // `plan.complete()` does not compile here: "phase `Plan` has an approval gate; call
//! // `request_approval()` instead of `complete()`".
//! let waiting = plan.request_approval()?;
//! // A reviewer decides, here inline; `waiting.wait_decision(every)` instead follows a decision
//! // made by another process (an operator CLI, a web UI).
//! let implement = waiting.approve("alice", Some("ship it")).await?;
//!
//! let done: Run<Feature, Completed> = match implement.execute("Implement the plan.").await? {
//!     Executed::Valid(report) => report.complete()?, // no gate: completing is allowed
//!     Executed::NeedsHuman(paused) => return Ok(drop(paused.abort("ops", None).await?)),
//! };
//!
//! // After a crash, or in another process: pick the run up where it stands.
//! match engine.resume::<Feature>(id).await? {
//!     FeatureState::Completed(run) => assert_eq!(run.id(), done.id()),
//!     FeatureState::Plan(_) | FeatureState::Implement(_) | FeatureState::Ended(_) => {
//!         unreachable!("the run completed")
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Each phase asks one agent session to write one JSON artifact into the run's worktree.
//! phaseflow delivers each prompt at most once, waits for the artifact, hashes and validates it
//! against a JSON Schema, sends repair prompts within a budget, escalates to a human gate when
//! the budget is spent, and records every step in an append-only event log so that a crashed
//! orchestrator resumes without prompting twice.
//!
//! The workflow is declared with [`derive@Phase`] and [`derive@Workflow`]; the [`typestate`]
//! module's [`Run`] handle then makes the compiler refuse what the engine would refuse at run
//! time — skipping a phase, completing a phase whose artifact is not validated, passing an
//! approval gate without a decision — with messages that say what to call instead.

pub mod artifact;
pub mod engine;
pub mod envelope;
pub mod error;
pub mod event;
pub mod ids;
pub mod recovery;
pub mod session;
pub mod spec;
pub mod state;
pub mod store;
pub mod typestate;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

/// Everything a workflow author needs: `use phaseflow::prelude::*;`.
pub mod prelude {
    pub use crate::engine::{Engine, EngineOptions};
    pub use crate::error::{Error, ErrorCode, Result};
    pub use crate::event::Decision;
    pub use crate::ids::RunId;
    pub use crate::typestate::{
        AfterDecision, AfterFailure, AwaitingApproval, Completed, Ended, Executed, Paused, Phase,
        PhaseAt, Ready, Run, StartRun, Validated, Workflow,
    };
    pub use phaseflow_macros::{Phase, Workflow};
}

pub use engine::{Engine, EngineOptions, PhaseOutcome};
pub use error::{Error, ErrorClass, ErrorCode, Result};
pub use phaseflow_macros::{Phase, Workflow};
pub use recovery::RunStatus;
pub use typestate::{Phase, Run, StartRun, Workflow};
