//! The phase executor (being written; this is its public surface).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, ErrorCode, Result};
use crate::event::Decision;
use crate::ids::{ApprovalId, EngineId, RunId};
use crate::session::SessionRuntime;
use crate::spec::{PhaseSpec, WorkflowSpec};
use crate::store::{ApprovalRecord, ArtifactRecord, Finished, RunRecord, Store};

/// Budgets and timeouts of an engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineOptions {
    /// Extra `send_prompt` tries after a recoverable failure (the predecessor's 2).
    pub send_retries: u32,
    /// Extra `resume` tries after a recoverable failure.
    pub resume_retries: u32,
    /// Extra `rebootstrap` tries after a recoverable failure (the predecessor's 1).
    pub rebootstrap_retries: u32,
    /// How long to wait for the artifact.
    pub artifact_timeout: Duration,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            send_retries: 2,
            resume_retries: 2,
            rebootstrap_retries: 1,
            artifact_timeout: Duration::from_secs(600),
        }
    }
}

impl EngineOptions {
    /// Sets the artifact timeout.
    pub fn with_artifact_timeout(mut self, timeout: Duration) -> Self {
        self.artifact_timeout = timeout;
        self
    }
}

/// How a phase execution ended (fatal errors and `run_state_changed` are `Err`).
#[derive(Debug)]
pub enum PhaseOutcome {
    /// Valid artifact, no gate: the phase completed and the run moved on (or completed).
    Completed {
        /// The accepted artifact.
        artifact: ArtifactRecord,
        /// The run afterwards.
        run: RunRecord,
    },
    /// Valid artifact behind a workflow gate: waiting for a human decision.
    AwaitingApproval {
        /// The artifact under review.
        artifact: ArtifactRecord,
        /// The filed request.
        approval: ApprovalRecord,
    },
    /// A failure gate: the run is paused until a human decides retry or abort.
    NeedsHuman {
        /// The filed request.
        approval: ApprovalRecord,
        /// Why.
        error: Error,
    },
}

/// Drives phases of runs against a [`Store`] and a [`SessionRuntime`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Engine {
    id: EngineId,
    store: Arc<dyn Store>,
    sessions: Arc<dyn SessionRuntime>,
    options: EngineOptions,
}

impl Engine {
    /// An engine with default options.
    pub fn new(store: Arc<dyn Store>, sessions: Arc<dyn SessionRuntime>) -> Self {
        Self { id: EngineId::new(), store, sessions, options: EngineOptions::default() }
    }

    /// Replaces the options.
    pub fn with_options(mut self, options: EngineOptions) -> Self {
        self.options = options;
        self
    }

    /// This engine's identity (the owner it claims phases as).
    pub fn id(&self) -> EngineId {
        self.id
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The session runtime.
    pub fn sessions(&self) -> &Arc<dyn SessionRuntime> {
        &self.sessions
    }

    /// Creates a run of `workflow` about `subject` in `worktree`.
    pub async fn create_run(&self, workflow: &WorkflowSpec, subject: &str, worktree: &Path) -> Result<RunRecord> {
        let _ = (workflow, subject, worktree);
        Err(Error::new(ErrorCode::InvalidArgument, "engine not yet implemented"))
    }

    /// Executes one phase (or replays it if this engine already started it).
    pub async fn execute_phase(&self, run: RunId, spec: &PhaseSpec, instructions: &str) -> Result<PhaseOutcome> {
        let _ = (run, spec, instructions);
        Err(Error::new(ErrorCode::InvalidArgument, "engine not yet implemented"))
    }

    /// Claims the phase for this engine and continues it from its persisted state.
    pub async fn resume_phase(&self, run: RunId, spec: &PhaseSpec, instructions: &str) -> Result<PhaseOutcome> {
        let _ = (run, spec, instructions);
        Err(Error::new(ErrorCode::InvalidArgument, "engine not yet implemented"))
    }

    /// Records a human decision and disposes of sessions it stopped.
    pub async fn decide(&self, request: ApprovalId, decision: Decision, actor: &str, note: Option<&str>) -> Result<Finished> {
        let _ = (request, decision, actor, note);
        Err(Error::new(ErrorCode::InvalidArgument, "engine not yet implemented"))
    }
}
