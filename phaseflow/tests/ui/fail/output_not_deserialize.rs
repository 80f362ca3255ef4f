//! `output` names the type the validated artifact is decoded into: it must be `Deserialize`.
use phaseflow::prelude::*;

pub struct PlanDoc {
    pub summary: String,
}

#[derive(Phase)]
#[phase(
    key = "plan",
    role = "planner",
    artifact = "phaseflow/plan.json",
    schema = "../../schemas/plan.schema.json",
    output = PlanDoc,
)]
pub struct Plan;

fn main() {}
