//! `Plan` has an approval gate: a validated plan cannot simply be completed.
#[path = "../feature.rs"]
mod feature;

use feature::{Feature, Plan};
use phaseflow::prelude::*;

fn finish_plan(plan: Run<Feature, Validated<Plan>>) {
    let _ = plan.complete();
}

fn main() {}
