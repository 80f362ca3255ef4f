//! Derive macros for [phaseflow](https://docs.rs/phaseflow): `#[derive(Phase)]` and
//! `#[derive(Workflow)]`. Use them through `phaseflow` (`use phaseflow::prelude::*;`), which
//! re-exports both; this crate is an implementation detail.
//!
//! The macros are organised as parse (`ast`: syn to plain structs) → validate (`valid`, `schema`:
//! keys, paths, budgets, the schema file, the phase list) → expand (`expand`, `fallback`). Every
//! problem is a spanned error, all problems are reported together, and an input with errors still
//! gets stub impls so one mistake is one error.

mod ast;
mod errors;
mod expand;
mod fallback;
mod schema;
mod valid;

use proc_macro::TokenStream;
use syn::{DeriveInput, parse_macro_input};

/// Declares a phase: one agent role producing one JSON artifact checked against a JSON Schema.
///
/// ```text
/// #[derive(Phase)]
/// #[phase(
///     key = "plan",                          // unique in the workflow
///     role = "planner",                      // one agent session per (run, role)
///     artifact = "phaseflow/plan.json",      // relative to the run's worktree
///     schema = "schemas/plan.schema.json",   // read and compiled at build time
///     output = PlanDoc,                      // serde type the valid artifact decodes into
///     repair_budget = 1,                     // optional, 0..=16, default 1
///     approval = "plan_review",              // optional workflow gate
/// )]
/// pub struct Plan;
/// ```
///
/// - `key`, `role`, `approval`: ASCII letters, digits, `_`, `-`, `.`; at most 64 bytes.
/// - `artifact`: a relative file path without `..` components.
/// - `schema`: resolved relative to `CARGO_MANIFEST_DIR` (the directory of the `Cargo.toml` of
///   the crate using the derive). A path starting with `./` or `../` is instead relative to the
///   source file that contains the derive, like `include_str!`; an absolute path is used as is.
///   The file must exist, be JSON and compile as a JSON Schema, or the build fails with an error
///   on the `schema` value. It is embedded with `include_str!`, so editing it rebuilds the crate.
///   Its schema id is its `$id` when that is a string, else its file name.
///
/// Emits `impl phaseflow::Phase` (a `const SPEC: PhaseSpec` and `type Output`) and one gate
/// marker: `HasApproval` with `approval`, `NoApproval` without. The markers decide at compile time
/// whether a validated run offers `request_approval()` or `complete()`.
#[proc_macro_derive(Phase, attributes(phase))]
pub fn derive_phase(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    let env = schema::Env {
        manifest_dir: std::env::var_os("CARGO_MANIFEST_DIR").map(Into::into),
        source_file: proc_macro::Span::call_site().local_file(),
    };
    expand::derive_phase(&input, &env).into()
}

/// Declares a workflow: a name and its phases in order.
///
/// ```text
/// #[derive(Workflow)]
/// #[workflow(name = "feature", phases(Plan, Implement, Review))]
/// pub struct Feature;
/// ```
///
/// The phase list must be non-empty, without duplicates, and the phases' keys must be unique
/// (checked by a const assertion, since keys live in each phase's `SPEC`). Emits:
/// - `impl phaseflow::Workflow` with `const SPEC: WorkflowSpec`, `type First` and `type State`;
/// - `impl phaseflow::InWorkflow<Feature>` for each phase, whose `Next` is the state that finishing
///   it leads to (`Ready<NextPhase>`, or `Completed` after the last phase);
/// - `pub enum FeatureState` (named `<Workflow>State`, with the workflow's visibility): one
///   variant per phase holding a `PhaseAt<Feature, Phase>`, plus `Completed` and `Ended`. It is
///   what `Engine::resume::<Feature>()` returns, so matching on it is exhaustive. Phase types named
///   `Completed` or `Ended` are refused because they would clash with those variants.
#[proc_macro_derive(Workflow, attributes(workflow))]
pub fn derive_workflow(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::derive_workflow(&input).into()
}
