//! An artifact path cannot leave the worktree through `..`.
use phaseflow::prelude::*;

#[derive(Phase)]
#[phase(
    key = "plan",
    role = "planner",
    artifact = "phaseflow/../../plan.json",
    schema = "../../schemas/plan.schema.json",
    output = serde_json::Value,
)]
pub struct Plan;

fn main() {}
