//! A phase that is not listed in the workflow cannot appear in its runs.
#[path = "../feature.rs"]
mod feature;

use feature::{Feature, PlanDoc};
use phaseflow::prelude::*;

#[derive(Phase)]
#[phase(
    key = "deploy",
    role = "operator",
    artifact = "phaseflow/deploy.json",
    schema = "../../schemas/plan.schema.json",
    output = PlanDoc,
)]
struct Deploy;

fn deploy(_run: Run<Feature, Ready<Deploy>>) {}

fn main() {}
