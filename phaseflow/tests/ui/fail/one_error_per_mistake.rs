//! A phase with an invalid attribute still gets stub impls: its workflow and the typed API keep
//! compiling, so the one mistake is the one error.
use phaseflow::prelude::*;

#[derive(Phase)]
#[phase(
    key = "plan",
    role = "planner",
    artifact = "/plan.json",
    schema = "../../schemas/plan.schema.json",
    output = serde_json::Value,
)]
pub struct Plan;

#[derive(Workflow)]
#[workflow(name = "solo", phases(Plan))]
pub struct Solo;

fn finish(plan: Run<Solo, Validated<Plan>>) -> Result<Run<Solo, Completed>> {
    let _: &serde_json::Value = plan.output();
    plan.complete()
}

fn main() {
    let _ = finish;
}
