//! A misspelt key is an error with a suggestion, not silently ignored.
use phaseflow::prelude::*;

#[derive(Phase)]
#[phase(
    key = "plan",
    role = "planner",
    artifact = "phaseflow/plan.json",
    schema = "../../schemas/plan.schema.json",
    output = serde_json::Value,
    aproval = "plan_review",
)]
pub struct Plan;

fn main() {}
