//! `Implement` has no approval gate: there is no approval to request.
#[path = "../feature.rs"]
mod feature;

use feature::{Feature, Implement};
use phaseflow::prelude::*;

fn review_implementation(implement: Run<Feature, Validated<Implement>>) {
    let _ = implement.request_approval();
}

fn main() {}
