//! The typed output exists only once the artifact is validated.
#[path = "../feature.rs"]
mod feature;

use feature::{Feature, Plan};
use phaseflow::prelude::*;

fn read_plan(plan: &Run<Feature, Ready<Plan>>) {
    let _ = plan.output();
}

fn main() {}
