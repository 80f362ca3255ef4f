//! Each key is given once.
use phaseflow::prelude::*;

#[derive(Phase)]
#[phase(
    key = "plan",
    role = "planner",
    artifact = "phaseflow/plan.json",
    schema = "../../schemas/plan.schema.json",
    output = serde_json::Value,
    repair_budget = 1,
    repair_budget = 3,
)]
pub struct Plan;

fn main() {}
