//! A paused phase waits for retry or abort, not for an approval.
#[path = "../feature.rs"]
mod feature;

use feature::{Feature, Plan};
use phaseflow::prelude::*;

async fn approve_failure(plan: Run<Feature, Paused<Plan>>) {
    let _ = plan.approve("alice", None).await;
}

fn main() {}
