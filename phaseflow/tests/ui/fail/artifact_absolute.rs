//! An artifact path is relative to the run's worktree.
use phaseflow::prelude::*;

#[derive(Phase)]
#[phase(
    key = "plan",
    role = "planner",
    artifact = "/tmp/plan.json",
    schema = "../../schemas/plan.schema.json",
    output = serde_json::Value,
)]
pub struct Plan;

fn main() {}
