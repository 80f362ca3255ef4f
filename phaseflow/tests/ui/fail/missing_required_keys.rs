//! `role` and `output` are required.
use phaseflow::prelude::*;

#[derive(Phase)]
#[phase(
    key = "plan",
    artifact = "phaseflow/plan.json",
    schema = "../../schemas/plan.schema.json"
)]
pub struct Plan;

fn main() {}
