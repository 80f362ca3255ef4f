//! A repair budget is an integer, not a string.
use phaseflow::prelude::*;

#[derive(Phase)]
#[phase(
    key = "plan",
    role = "planner",
    artifact = "phaseflow/plan.json",
    schema = "../../schemas/plan.schema.json",
    output = serde_json::Value,
    repair_budget = "2",
)]
pub struct Plan;

fn main() {}
