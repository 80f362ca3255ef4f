//! `repair_budget = 0`: an invalid artifact goes straight to a human.
use phaseflow::prelude::*;

#[derive(Phase)]
#[phase(
    key = "plan",
    role = "planner",
    artifact = "phaseflow/plan.json",
    schema = "../../schemas/plan.schema.json",
    output = serde_json::Value,
    repair_budget = 0,
)]
pub struct Plan;

#[derive(Workflow)]
#[workflow(name = "strict", phases(Plan))]
pub struct Strict;

fn main() {
    assert_eq!(<Plan as Phase>::SPEC.repair_budget(), 0);
    assert_eq!(<Plan as Phase>::SPEC.approval(), None);
    assert_eq!(<Strict as Workflow>::SPEC.phases().len(), 1);
}
