//! The schema file must be a valid JSON Schema.
use phaseflow::prelude::*;

#[derive(Phase)]
#[phase(
    key = "plan",
    role = "planner",
    artifact = "phaseflow/plan.json",
    schema = "../../schemas/invalid.schema.json",
    output = serde_json::Value,
)]
pub struct Plan;

fn main() {}
