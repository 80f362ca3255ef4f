//! Everything the derives generate is documented, so a crate with `#![deny(missing_docs)]`
//! can declare workflows.
#![deny(missing_docs)]

use phaseflow::prelude::*;

/// Writes the plan.
#[derive(Phase)]
#[phase(
    key = "plan",
    role = "planner",
    artifact = "phaseflow/plan.json",
    schema = "../../schemas/plan.schema.json",
    output = serde_json::Value,
    approval = "plan_review",
)]
pub struct Plan;

/// Implements it.
#[derive(Phase)]
#[phase(
    key = "implement",
    role = "coder",
    artifact = "phaseflow/impl.json",
    schema = "../../schemas/impl.schema.json",
    output = serde_json::Value,
)]
pub struct Implement;

/// Plan, then implement.
#[derive(Workflow)]
#[workflow(name = "feature", phases(Plan, Implement))]
pub struct Feature;

/// Where a run stands, in one word.
pub fn describe(state: &FeatureState) -> &'static str {
    match state {
        FeatureState::Plan(_) => "planning",
        FeatureState::Implement(_) => "implementing",
        FeatureState::Completed(_) => "done",
        FeatureState::Ended(_) => "stopped",
    }
}

fn main() {
    let _ = describe;
}
