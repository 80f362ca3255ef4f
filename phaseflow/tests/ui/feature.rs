//! The workflow the typestate cases misuse: `Plan` (gated by `plan_review`) then `Implement`.
#![allow(dead_code)]

use phaseflow::prelude::*;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct PlanDoc {
    pub summary: String,
}

#[derive(Debug, Deserialize)]
pub struct ImplReport {
    pub changed_files: Vec<String>,
}

#[derive(Phase)]
#[phase(
    key = "plan",
    role = "planner",
    artifact = "phaseflow/plan.json",
    schema = "../schemas/plan.schema.json",
    output = PlanDoc,
    approval = "plan_review",
)]
pub struct Plan;

#[derive(Phase)]
#[phase(
    key = "implement",
    role = "coder",
    artifact = "phaseflow/impl.json",
    schema = "../schemas/impl.schema.json",
    output = ImplReport,
    repair_budget = 2,
)]
pub struct Implement;

#[derive(Workflow)]
#[workflow(name = "feature", phases(Plan, Implement))]
pub struct Feature;
