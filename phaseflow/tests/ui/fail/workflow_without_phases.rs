//! A workflow has at least one phase.
use phaseflow::prelude::*;

#[derive(Workflow)]
#[workflow(name = "empty", phases())]
pub struct Empty;

fn main() {}
