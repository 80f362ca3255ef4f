//! What phaseflow's runnable examples share (the examples themselves are `feature_flow.rs`,
//! `approval_gate.rs` and `crash_recovery.rs` next to this crate's `Cargo.toml`):
//!
//! - [`timeline`]: prints a run's event log as a readable timeline, tailing it step by step;
//! - [`backend`]: the store an example runs on — in memory, or PostgreSQL when `DATABASE_URL`
//!   is set;
//! - [`agents`]: [`JournaledAgents`](agents::JournaledAgents), a simulated terminal agent whose
//!   memory of delivered prompts is a journal file in the worktree and whose work runs in a
//!   separate process, so both survive the orchestrator being killed;
//! - [`recovery`]: the orchestrator processes of the crash-recovery example and of the
//!   process-kill test — one that is killed mid-phase and one that resumes the run.

pub mod agents;
pub mod backend;
pub mod recovery;
pub mod timeline;

/// The README's quickstart, compiled and run as a doc-test so that it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeQuickstart;
