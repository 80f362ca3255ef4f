//! `complete()` consumes the handle: the old state cannot be used afterwards.
#[path = "../feature.rs"]
mod feature;

use feature::{Feature, Implement};
use phaseflow::prelude::*;

fn complete_twice(implement: Run<Feature, Validated<Implement>>) {
    let _next = implement.complete();
    let _ = implement.output();
}

fn main() {}
