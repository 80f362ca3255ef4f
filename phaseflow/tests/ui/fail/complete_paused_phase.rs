//! A phase paused at a failure gate has no valid artifact: it cannot be completed.
#[path = "../feature.rs"]
mod feature;

use feature::{Feature, Implement};
use phaseflow::prelude::*;

fn force_through(implement: Run<Feature, Paused<Implement>>) {
    let _ = implement.complete();
}

fn main() {}
