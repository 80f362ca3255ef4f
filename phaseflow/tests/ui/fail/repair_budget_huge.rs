//! A repair budget is small: every repair re-prompts the agent.
use phaseflow::prelude::*;

#[derive(Phase)]
#[phase(
    key = "plan",
    role = "planner",
    artifact = "phaseflow/plan.json",
    schema = "../../schemas/plan.schema.json",
    output = serde_json::Value,
    repair_budget = 1000,
)]
pub struct Plan;

fn main() {}
