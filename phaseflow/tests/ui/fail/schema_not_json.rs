//! The schema file must be JSON.
use phaseflow::prelude::*;

#[derive(Phase)]
#[phase(
    key = "plan",
    role = "planner",
    artifact = "phaseflow/plan.json",
    schema = "../../schemas/not-json.schema.json",
    output = serde_json::Value,
)]
pub struct Plan;

fn main() {}
