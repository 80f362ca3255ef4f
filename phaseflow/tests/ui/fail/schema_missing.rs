//! The schema file must exist.
use phaseflow::prelude::*;

#[derive(Phase)]
#[phase(
    key = "plan",
    role = "planner",
    artifact = "phaseflow/plan.json",
    schema = "../../schemas/missing.schema.json",
    output = serde_json::Value,
)]
pub struct Plan;

fn main() {}
