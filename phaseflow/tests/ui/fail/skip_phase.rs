//! A handle on `Plan` does not turn into a handle on `Implement`.
#[path = "../feature.rs"]
mod feature;

use feature::{Feature, Implement, Plan};
use phaseflow::prelude::*;

fn skip_plan(plan: Run<Feature, Ready<Plan>>) -> Run<Feature, Ready<Implement>> {
    plan.into()
}

fn main() {}
