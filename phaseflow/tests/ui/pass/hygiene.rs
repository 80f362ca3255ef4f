//! The generated code's local names cannot be captured by the user's items.
#![allow(non_upper_case_globals, dead_code)]

use phaseflow::prelude::*;

const a: u8 = 1;
const b: u8 = 2;
const at: u8 = 3;
const run: u8 = 4;
struct Result;
struct Option;

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
    key = "review",
    role = "reviewer",
    artifact = "phaseflow/review.json",
    schema = "../../schemas/review.schema.json",
    output = serde_json::Value,
)]
pub struct Review;

#[derive(Workflow)]
#[workflow(name = "feature", phases(Plan, Review))]
pub struct Feature;

fn main() {
    assert_eq!(<Feature as Workflow>::SPEC.phases().len(), 2);
}
