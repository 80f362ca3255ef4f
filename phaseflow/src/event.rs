//! The append-only event log: one typed event per step, each with a deterministic idempotency key.
//!
//! Appending an event whose key the run already has is a no-op, which is what makes every store
//! command safe to replay after a crash.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ids::{
    ApprovalId, ArtifactId, ContentHash, DedupKey, GateKey, PhaseKey, RoleKey, RunId, SessionId,
};
use crate::state::RunState;

/// One problem an artifact has: where in the document, and what.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ValidationIssue {
    /// JSON Pointer into the artifact (`""` for the document itself, `/steps/0/title`, …).
    pub instance_path: String,
    /// What is wrong there.
    pub message: String,
}

/// Whether a gate is a workflow approval or a failure escalation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateKind {
    /// Declared with `approval = "…"`: a human reviews a valid artifact.
    Workflow,
    /// Raised by a failure (budget spent, session lost…): a human decides retry or abort.
    Failure,
}

/// A human's decision on an approval request.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// Workflow gate: accept the artifact; the phase completes.
    Approve,
    /// Workflow gate: run the phase again with this feedback in the instructions.
    Rework {
        /// What to change.
        feedback: String,
    },
    /// Workflow gate: stop the run (`aborted`).
    Reject,
    /// Failure gate: go back to the paused-from state and try a new attempt with a fresh budget.
    Retry,
    /// Failure gate: stop the run (`aborted`) and dispose of its sessions.
    Abort,
}

impl Decision {
    /// The stable snake_case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Decision::Approve => "approve",
            Decision::Rework { .. } => "rework",
            Decision::Reject => "reject",
            Decision::Retry => "retry",
            Decision::Abort => "abort",
        }
    }

    /// Whether this decision applies to a gate of that kind.
    pub fn fits(&self, kind: GateKind) -> bool {
        match self {
            Decision::Approve | Decision::Rework { .. } | Decision::Reject => {
                kind == GateKind::Workflow
            }
            Decision::Retry | Decision::Abort => kind == GateKind::Failure,
        }
    }
}

/// Why a prompt was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptKind {
    /// The first prompt of an attempt that is not a repair.
    Initial,
    /// A repair prompt after an invalid or missing artifact.
    Repair,
}

/// Everything that happens to a run, one variant per event type.
///
/// Serialised with a `type` tag such as `"phase.started"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum EventKind {
    /// The run was created with its phases in order.
    #[serde(rename = "run.created")]
    RunCreated {
        /// Workflow name.
        workflow: String,
        /// Phase keys in execution order.
        phases: Vec<PhaseKey>,
    },
    /// The first attempt of the first phase moved the run from planning to executing.
    #[serde(rename = "run.started")]
    RunStarted,
    /// An attempt of a phase started.
    #[serde(rename = "phase.started")]
    PhaseStarted {
        /// Phase.
        phase: PhaseKey,
        /// Attempt number.
        attempt: u32,
        /// True for repair attempts.
        repair: bool,
        /// Why this attempt exists (`initial`, `artifact_invalid`, `artifact_timeout`, `rework`, `retry`).
        reason: String,
    },
    /// A session was started for a role.
    #[serde(rename = "session.created")]
    SessionCreated {
        /// Session.
        session: SessionId,
        /// Role.
        role: RoleKey,
    },
    /// A session became ready to take prompts.
    #[serde(rename = "session.ready")]
    SessionReady {
        /// Session.
        session: SessionId,
        /// Role.
        role: RoleKey,
        /// How often it was recovered so far.
        recovery_attempts: u32,
    },
    /// A session was marked busy with a prompt, before the prompt was sent.
    #[serde(rename = "session.busy")]
    SessionBusy {
        /// Session.
        session: SessionId,
        /// Prompt dedup key.
        dedup: DedupKey,
    },
    /// A prompt was delivered (or acknowledged as already delivered).
    #[serde(rename = "prompt.sent")]
    PromptSent {
        /// Phase.
        phase: PhaseKey,
        /// Attempt.
        attempt: u32,
        /// Session.
        session: SessionId,
        /// Dedup key.
        dedup: DedupKey,
    },
    /// A repair prompt was delivered.
    #[serde(rename = "prompt.repaired")]
    PromptRepaired {
        /// Phase.
        phase: PhaseKey,
        /// Attempt.
        attempt: u32,
        /// Session.
        session: SessionId,
        /// Dedup key.
        dedup: DedupKey,
    },
    /// The phase now waits for its artifact.
    #[serde(rename = "artifact.expected")]
    ArtifactExpected {
        /// Phase.
        phase: PhaseKey,
        /// Attempt.
        attempt: u32,
        /// Canonical artifact path.
        path: String,
        /// Schema id.
        schema: String,
    },
    /// The artifact did not appear in time.
    #[serde(rename = "artifact.timeout")]
    ArtifactTimeout {
        /// Phase.
        phase: PhaseKey,
        /// Attempt.
        attempt: u32,
        /// Canonical artifact path.
        path: String,
    },
    /// The artifact satisfied its schema.
    #[serde(rename = "artifact.validated")]
    ArtifactValidated {
        /// Phase.
        phase: PhaseKey,
        /// Artifact row.
        artifact: ArtifactId,
        /// Canonical artifact path.
        path: String,
        /// sha256 of its bytes.
        hash: ContentHash,
        /// Schema id.
        schema: String,
    },
    /// The artifact was not valid JSON or did not satisfy its schema.
    #[serde(rename = "artifact.invalid")]
    ArtifactInvalid {
        /// Phase.
        phase: PhaseKey,
        /// Artifact row.
        artifact: ArtifactId,
        /// Canonical artifact path.
        path: String,
        /// sha256 of its bytes.
        hash: ContentHash,
        /// Schema id.
        schema: String,
        /// Every problem, with its instance path.
        errors: Vec<ValidationIssue>,
    },
    /// The session finished a prompt and is idle again.
    #[serde(rename = "session.idle")]
    SessionIdle {
        /// Session.
        session: SessionId,
        /// The prompt it finished.
        dedup: DedupKey,
    },
    /// The session was found dead.
    #[serde(rename = "session.crashed")]
    SessionCrashed {
        /// Session.
        session: SessionId,
        /// Recovery count after this crash.
        recovery_attempts: u32,
    },
    /// The session was re-bootstrapped after a timeout and is ready again.
    #[serde(rename = "session.recovered")]
    SessionRecovered {
        /// Session.
        session: SessionId,
        /// Recovery count including this one.
        recovery_attempts: u32,
    },
    /// The session stopped for good until a human decides.
    #[serde(rename = "session.failed")]
    SessionFailed {
        /// Session.
        session: SessionId,
        /// Role.
        role: RoleKey,
        /// The phase whose failure stopped it.
        phase: PhaseKey,
        /// The attempt whose failure stopped it.
        attempt: u32,
    },
    /// A phase completed.
    #[serde(rename = "phase.completed")]
    PhaseCompleted {
        /// Phase.
        phase: PhaseKey,
        /// The attempt that produced the accepted artifact.
        attempt: u32,
    },
    /// A phase failed.
    #[serde(rename = "phase.failed")]
    PhaseFailed {
        /// Phase.
        phase: PhaseKey,
        /// Attempt.
        attempt: u32,
        /// Error code that caused it.
        reason: String,
    },
    /// An approval request was filed.
    #[serde(rename = "approval.requested")]
    ApprovalRequested {
        /// Request id.
        request: ApprovalId,
        /// `{run}:{gate}:{phase}:{attempt}`.
        key: String,
        /// Gate.
        gate: GateKey,
        /// Workflow or failure gate.
        kind: GateKind,
        /// Phase.
        phase: PhaseKey,
        /// Attempt.
        attempt: u32,
    },
    /// A human decided an approval request.
    #[serde(rename = "approval.decided")]
    ApprovalDecided {
        /// Request id.
        request: ApprovalId,
        /// Request idempotency key.
        key: String,
        /// The decision.
        decision: Decision,
        /// Who decided.
        actor: String,
    },
    /// The run paused (failure gate or operator).
    #[serde(rename = "run.paused")]
    RunPaused {
        /// Why (`human_required:{gate}:{phase}:{attempt}` or an operator's reason).
        cause: String,
        /// The state it will return to on retry.
        paused_from: RunState,
    },
    /// The run went back to work after a decision.
    #[serde(rename = "run.resumed")]
    RunResumed {
        /// The approval request whose decision resumed it.
        request: ApprovalId,
        /// The state it returned to.
        state: RunState,
    },
    /// Every phase completed.
    #[serde(rename = "run.completed")]
    RunCompleted,
    /// A fatal error ended the run.
    #[serde(rename = "run.failed")]
    RunFailed {
        /// Error code.
        reason: String,
    },
    /// A human stopped the run.
    #[serde(rename = "run.aborted")]
    RunAborted {
        /// Why.
        reason: String,
    },
}

impl EventKind {
    /// The `type` tag, e.g. `"phase.started"`.
    pub fn type_name(&self) -> &'static str {
        match self {
            EventKind::RunCreated { .. } => "run.created",
            EventKind::RunStarted => "run.started",
            EventKind::PhaseStarted { .. } => "phase.started",
            EventKind::SessionCreated { .. } => "session.created",
            EventKind::SessionReady { .. } => "session.ready",
            EventKind::SessionBusy { .. } => "session.busy",
            EventKind::PromptSent { .. } => "prompt.sent",
            EventKind::PromptRepaired { .. } => "prompt.repaired",
            EventKind::ArtifactExpected { .. } => "artifact.expected",
            EventKind::ArtifactTimeout { .. } => "artifact.timeout",
            EventKind::ArtifactValidated { .. } => "artifact.validated",
            EventKind::ArtifactInvalid { .. } => "artifact.invalid",
            EventKind::SessionIdle { .. } => "session.idle",
            EventKind::SessionCrashed { .. } => "session.crashed",
            EventKind::SessionRecovered { .. } => "session.recovered",
            EventKind::SessionFailed { .. } => "session.failed",
            EventKind::PhaseCompleted { .. } => "phase.completed",
            EventKind::PhaseFailed { .. } => "phase.failed",
            EventKind::ApprovalRequested { .. } => "approval.requested",
            EventKind::ApprovalDecided { .. } => "approval.decided",
            EventKind::RunPaused { .. } => "run.paused",
            EventKind::RunResumed { .. } => "run.resumed",
            EventKind::RunCompleted => "run.completed",
            EventKind::RunFailed { .. } => "run.failed",
            EventKind::RunAborted { .. } => "run.aborted",
        }
    }

    /// The deterministic idempotency key (unique within a run).
    pub fn idempotency_key(&self) -> String {
        let ty = self.type_name();
        match self {
            EventKind::RunCreated { .. }
            | EventKind::RunStarted
            | EventKind::RunCompleted
            | EventKind::RunFailed { .. }
            | EventKind::RunAborted { .. } => ty.to_owned(),
            EventKind::PhaseStarted { phase, attempt, .. }
            | EventKind::PhaseCompleted { phase, attempt }
            | EventKind::PhaseFailed { phase, attempt, .. } => format!("{ty}:{phase}:{attempt}"),
            EventKind::SessionCreated { session, .. } => format!("{ty}:{session}"),
            EventKind::SessionReady {
                session,
                recovery_attempts,
                ..
            }
            | EventKind::SessionCrashed {
                session,
                recovery_attempts,
            }
            | EventKind::SessionRecovered {
                session,
                recovery_attempts,
            } => {
                format!("{ty}:{session}:{recovery_attempts}")
            }
            EventKind::SessionBusy { session, dedup }
            | EventKind::SessionIdle { session, dedup } => {
                format!("{ty}:{session}:{dedup}")
            }
            EventKind::SessionFailed {
                session,
                phase,
                attempt,
                ..
            } => {
                format!("{ty}:{session}:{phase}:{attempt}")
            }
            EventKind::PromptSent { dedup, .. } | EventKind::PromptRepaired { dedup, .. } => {
                format!("{ty}:{dedup}")
            }
            EventKind::ArtifactExpected {
                phase,
                attempt,
                path,
                ..
            }
            | EventKind::ArtifactTimeout {
                phase,
                attempt,
                path,
            } => {
                format!("{ty}:{phase}:{attempt}:{path}")
            }
            EventKind::ArtifactValidated {
                phase, path, hash, ..
            }
            | EventKind::ArtifactInvalid {
                phase, path, hash, ..
            } => {
                format!("{ty}:{phase}:{path}:{hash}")
            }
            EventKind::ApprovalRequested { key, .. } | EventKind::ApprovalDecided { key, .. } => {
                format!("{ty}:{key}")
            }
            EventKind::RunPaused { cause, .. } => format!("{ty}:{cause}"),
            EventKind::RunResumed { request, .. } => format!("{ty}:{request}"),
        }
    }

    /// The phase the event concerns, if any.
    pub fn phase(&self) -> Option<&PhaseKey> {
        match self {
            EventKind::PhaseStarted { phase, .. }
            | EventKind::PromptSent { phase, .. }
            | EventKind::PromptRepaired { phase, .. }
            | EventKind::ArtifactExpected { phase, .. }
            | EventKind::ArtifactTimeout { phase, .. }
            | EventKind::ArtifactValidated { phase, .. }
            | EventKind::ArtifactInvalid { phase, .. }
            | EventKind::SessionFailed { phase, .. }
            | EventKind::PhaseCompleted { phase, .. }
            | EventKind::PhaseFailed { phase, .. }
            | EventKind::ApprovalRequested { phase, .. } => Some(phase),
            _ => None,
        }
    }
}

/// One stored event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the run's log, starting at 1, without gaps.
    pub seq: u64,
    /// The run.
    pub run: RunId,
    /// When it was appended.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// `kind.idempotency_key()`, as stored.
    pub key: String,
    /// What happened.
    pub kind: EventKind,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialise_with_a_dotted_type_tag() {
        let event = EventKind::PhaseStarted {
            phase: "plan".into(),
            attempt: 2,
            repair: true,
            reason: "artifact_invalid".into(),
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["type"], "phase.started");
        assert_eq!(json["attempt"], 2);
        assert_eq!(serde_json::from_value::<EventKind>(json).unwrap(), event);
        assert_eq!(event.idempotency_key(), "phase.started:plan:2");
    }

    #[test]
    fn type_name_matches_the_serde_tag_for_unit_variants() {
        for event in [EventKind::RunStarted, EventKind::RunCompleted] {
            let json = serde_json::to_value(&event).unwrap();
            assert_eq!(json["type"], event.type_name());
        }
    }

    #[test]
    fn decisions_fit_only_their_gate_kind() {
        assert!(Decision::Approve.fits(GateKind::Workflow));
        assert!(!Decision::Approve.fits(GateKind::Failure));
        assert!(Decision::Retry.fits(GateKind::Failure));
        assert!(
            !Decision::Rework {
                feedback: "x".into()
            }
            .fits(GateKind::Failure)
        );
    }
}
