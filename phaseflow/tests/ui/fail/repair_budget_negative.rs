//! A repair budget cannot be negative.
use phaseflow::prelude::*;

#[derive(Phase)]
#[phase(
    key = "plan",
    role = "planner",
    artifact = "phaseflow/plan.json",
    schema = "../../schemas/plan.schema.json",
    output = serde_json::Value,
    repair_budget = -1,
)]
pub struct Plan;

fn main() {}
