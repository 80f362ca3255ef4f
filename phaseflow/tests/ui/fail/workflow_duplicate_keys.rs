//! Phase keys identify phases in the store: two phases cannot share one.
use phaseflow::prelude::*;

#[derive(Phase)]
#[phase(
    key = "plan",
    role = "planner",
    artifact = "phaseflow/plan.json",
    schema = "../../schemas/plan.schema.json",
    output = serde_json::Value,
)]
pub struct Plan;

#[derive(Phase)]
#[phase(
    key = "plan",
    role = "reviewer",
    artifact = "phaseflow/review.json",
    schema = "../../schemas/review.schema.json",
    output = serde_json::Value,
)]
pub struct Review;

#[derive(Workflow)]
#[workflow(name = "feature", phases(Plan, Review))]
pub struct Feature;

fn main() {}
