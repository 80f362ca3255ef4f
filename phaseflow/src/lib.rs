//! phaseflow drives AI coding agents through a typed, durable, multi-phase workflow.
//!
//! Each phase asks one agent session to write one JSON artifact into the run's worktree.
//! phaseflow delivers each prompt at most once, waits for the artifact, hashes and validates it
//! against a JSON Schema, sends repair prompts within a budget, escalates to a human gate when
//! the budget is spent, and records every step in an append-only event log so that a crashed
//! orchestrator resumes without prompting twice.

pub mod artifact;
pub mod engine;
pub mod envelope;
pub mod error;
pub mod event;
pub mod ids;
pub mod recovery;
pub mod session;
pub mod spec;
pub mod state;
pub mod store;
pub mod typestate;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

/// Everything a workflow author needs: `use phaseflow::prelude::*;`.
pub mod prelude {
    pub use crate::engine::{Engine, EngineOptions};
    pub use crate::error::{Error, ErrorCode, Result};
    pub use crate::event::Decision;
    pub use crate::ids::RunId;
    pub use crate::typestate::{
        AfterDecision, AfterFailure, AwaitingApproval, Completed, Ended, Executed, Paused, Phase,
        PhaseAt, Ready, Run, StartRun, Validated, Workflow,
    };
    pub use phaseflow_macros::{Phase, Workflow};
}

pub use engine::{Engine, EngineOptions, PhaseOutcome};
pub use error::{Error, ErrorClass, ErrorCode, Result};
pub use phaseflow_macros::{Phase, Workflow};
pub use recovery::RunStatus;
pub use typestate::{Phase, Run, StartRun, Workflow};
