//! Resuming any run from the store: the entry point after an orchestrator restart.
//!
//! [`Engine::resume_any`] needs no workflow type, only the workflow registered with
//! [`Engine::with_workflow`]. It reads where the run stands and, when its current phase is in
//! flight, continues it through the replay table of the phase executor (re-send the same
//! envelope, continue the wait, replay a recorded verdict, validate the file on disk, or refuse
//! with `internal_state_corruption`). It never starts a phase that has not started: that needs
//! instructions, which only the caller has.

use crate::engine::{Engine, PhaseOutcome};
use crate::error::{Error, ErrorCode, Result};
use crate::ids::RunId;
use crate::spec::{PhaseSpec, WorkflowSpec};
use crate::state::{PhaseState, RunState};
use crate::store::{ApprovalRecord, RunRecord, phase_of};

/// Where a run stands after [`Engine::resume_any`].
#[derive(Debug)]
pub enum RunStatus {
    /// The current phase has not started (or was sent back by a rework or retry decision):
    /// execute it with [`Engine::execute_phase`].
    Ready {
        /// The run.
        run: RunRecord,
        /// The phase to execute.
        phase: PhaseSpec,
    },
    /// The current phase was in flight; it has been continued to this outcome.
    Resumed {
        /// The run.
        run: RunId,
        /// The phase that was continued.
        phase: PhaseSpec,
        /// How it ended this time.
        outcome: PhaseOutcome,
    },
    /// A workflow gate waits for a decision.
    AwaitingApproval {
        /// The run.
        run: RunRecord,
        /// The pending request.
        approval: ApprovalRecord,
    },
    /// Paused at a failure gate (with its request) or by an operator (without one).
    Paused {
        /// The run.
        run: RunRecord,
        /// The pending failure request, if a gate paused it.
        approval: Option<ApprovalRecord>,
    },
    /// Completed, failed or aborted: nothing more will happen.
    Finished(RunRecord),
}

impl Engine {
    /// Continues a run from its persisted state; see the [module docs](self).
    pub async fn resume_any(&self, run: RunId) -> Result<RunStatus> {
        let record = self.store().run(run).await?;
        let workflow = *self.workflow(&record.workflow).ok_or_else(|| {
            Error::new(
                ErrorCode::InvalidArgument,
                format!(
                    "run {run} belongs to workflow `{}`, which this engine does not know",
                    record.workflow
                ),
            )
            .with_run(run)
            .with_hint("register the workflow with Engine::with_workflow before resuming its runs")
        })?;
        let pending = || async {
            let approvals = self.store().approvals(run).await?;
            Ok::<_, Error>(approvals.into_iter().rev().find(|a| a.decision.is_none()))
        };
        match record.state {
            RunState::Completed | RunState::Failed | RunState::Aborted => {
                Ok(RunStatus::Finished(record))
            }
            RunState::Paused => Ok(RunStatus::Paused {
                approval: pending().await?,
                run: record,
            }),
            RunState::AwaitingApproval => match pending().await? {
                Some(approval) => Ok(RunStatus::AwaitingApproval {
                    run: record,
                    approval,
                }),
                None => Err(Error::corruption(format!(
                    "run {run} awaits approval but has no pending request"
                ))
                .with_run(run)),
            },
            RunState::Planning | RunState::Executing => {
                let spec = current_phase(&workflow, &record)?;
                let phase = phase_of(self.store().as_ref(), run, &spec.key()).await?;
                if phase.state == PhaseState::Pending {
                    return Ok(RunStatus::Ready {
                        run: record,
                        phase: spec,
                    });
                }
                // Instructions are only used for a new attempt; an in-flight one re-sends its own.
                let outcome = self.resume_phase(run, &spec, "").await?;
                Ok(RunStatus::Resumed {
                    run,
                    phase: spec,
                    outcome,
                })
            }
        }
    }
}

fn current_phase(workflow: &WorkflowSpec, run: &RunRecord) -> Result<PhaseSpec> {
    let key = run.current_phase.as_ref().ok_or_else(|| {
        Error::corruption(format!(
            "run {} is {} but has no current phase",
            run.id, run.state
        ))
        .with_run(run.id)
    })?;
    workflow.phase(key.as_str()).copied().ok_or_else(|| {
        Error::new(
            ErrorCode::PhaseNotFound,
            format!(
                "run {} is at phase `{key}`, which workflow `{}` does not declare",
                run.id,
                workflow.name()
            ),
        )
        .with_run(run.id)
        .with_hint("the registered workflow differs from the one the run was created with")
    })
}
