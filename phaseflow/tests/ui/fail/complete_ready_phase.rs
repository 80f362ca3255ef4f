//! A ready phase has not produced a validated artifact: it cannot be completed.
#[path = "../feature.rs"]
mod feature;

use feature::{Feature, Implement};
use phaseflow::prelude::*;

fn skip_implementation(implement: Run<Feature, Ready<Implement>>) {
    let _ = implement.complete();
}

fn main() {}
