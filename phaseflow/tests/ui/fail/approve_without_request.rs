//! A validated plan must go through `request_approval()` before anyone can approve it.
#[path = "../feature.rs"]
mod feature;

use feature::{Feature, Plan};
use phaseflow::prelude::*;

async fn approve_directly(plan: Run<Feature, Validated<Plan>>) {
    let _ = plan.approve("alice", None).await;
}

fn main() {}
