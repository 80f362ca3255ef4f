//! The one error type of phaseflow: a class that drives the failure policy, a stable code,
//! the run and phase it concerns, and a hint that says what to do next.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{PhaseKey, RunId};

/// How an error is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Worth retrying within a budget (a busy pane, a dropped connection).
    Recoverable,
    /// A human has to look: file an approval request and pause the run.
    HumanRequired,
    /// Nothing sensible can continue: fail the run and its sessions.
    Fatal,
}

impl ErrorClass {
    /// The stable snake_case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Recoverable => "recoverable",
            ErrorClass::HumanRequired => "human_required",
            ErrorClass::Fatal => "fatal",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident => $text:literal, $class:ident; )+) => {
        /// A stable, machine-readable error code. The string form never changes once released.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        #[non_exhaustive]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant, )+
        }

        impl ErrorCode {
            /// The stable snake_case code.
            pub const fn as_str(self) -> &'static str {
                match self { $( ErrorCode::$variant => $text, )+ }
            }

            /// The class an error with this code has unless its producer says otherwise.
            pub const fn default_class(self) -> ErrorClass {
                match self { $( ErrorCode::$variant => ErrorClass::$class, )+ }
            }

            /// Parses a stored code.
            pub fn parse(code: &str) -> Option<Self> {
                match code { $( $text => Some(ErrorCode::$variant), )+ _ => None }
            }
        }
    };
}

error_codes! {
    /// The run left `planning`/`executing` (an operator paused or aborted it); nothing was written.
    RunStateChanged => "run_state_changed", HumanRequired;
    /// Another engine claimed this phase; this one stopped without writing.
    PhaseClaimed => "phase_claimed", HumanRequired;
    /// Persisted state contradicts itself or a replay; never guessed around.
    InternalStateCorruption => "internal_state_corruption", Fatal;
    /// No run with that id.
    RunNotFound => "run_not_found", Fatal;
    /// The run has no phase with that key.
    PhaseNotFound => "phase_not_found", Fatal;
    /// No approval request with that id or key.
    ApprovalNotFound => "approval_not_found", Fatal;
    /// The approval request was already decided differently, or the decision does not fit the gate.
    ApprovalConflict => "approval_conflict", HumanRequired;
    /// The phase is not in a state where this operation applies.
    PhaseStateMismatch => "phase_state_mismatch", Fatal;
    /// The artifact path is absolute, escapes the worktree, or resolves outside it via a symlink.
    ArtifactOutsideWorktree => "artifact_outside_worktree", Fatal;
    /// The artifact is larger than the configured cap.
    ArtifactTooLarge => "artifact_too_large", HumanRequired;
    /// Reading, writing or removing a file in the worktree failed.
    WorkspacePermissions => "workspace_permissions", Fatal;
    /// The artifact did not appear (or was not complete) before the timeout, repairs exhausted.
    ArtifactTimeoutExhausted => "artifact_timeout_exhausted", HumanRequired;
    /// The artifact was still invalid after the repair budget was spent.
    ArtifactInvalidAfterRepair => "artifact_invalid_after_repair", HumanRequired;
    /// A JSON Schema could not be compiled, or a schema id is unknown.
    SchemaInvalid => "schema_invalid", Fatal;
    /// The session runtime could not deliver a prompt (a single failure).
    PromptSendFailed => "prompt_send_failed", Recoverable;
    /// Prompt delivery kept failing with recoverable errors until the retry budget was spent.
    PromptSendExhausted => "prompt_send_exhausted", HumanRequired;
    /// The session runtime could not start a session.
    SessionStartFailed => "session_start_failed", Recoverable;
    /// The session runtime could not resume a session.
    SessionResumeFailed => "session_resume_failed", Recoverable;
    /// The session is marked FAILED_NEEDS_HUMAN and is never resumed automatically.
    SessionFailedNeedsHuman => "session_failed_needs_human", HumanRequired;
    /// The session runtime does not know the session.
    SessionNotFound => "session_not_found", Fatal;
    /// After an artifact timeout the session was found dead.
    SessionLost => "session_lost", HumanRequired;
    /// Re-bootstrapping a session after a timeout failed.
    RebootstrapFailed => "rebootstrap_failed", HumanRequired;
    /// The session runtime failed in a way it could not classify.
    SessionRuntime => "session_runtime", Fatal;
    /// The store could not be reached or a statement failed.
    StoreUnavailable => "store_unavailable", Recoverable;
    /// A value read from the store could not be decoded.
    StoreDecode => "store_decode", Fatal;
    /// A validated artifact could not be decoded into the phase's output type.
    OutputDecode => "output_decode", Fatal;
    /// The caller passed an argument that cannot work (an empty key, a zero timeout…).
    InvalidArgument => "invalid_argument", Fatal;
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A phaseflow error: what happened, to which run and phase, and what to do next.
///
/// Match on [`Error::code`] (stable) and [`Error::class`]; the message is for humans.
#[derive(Debug, thiserror::Error)]
pub struct Error {
    class: ErrorClass,
    code: ErrorCode,
    message: String,
    run: Option<RunId>,
    phase: Option<PhaseKey>,
    hint: Option<String>,
    #[source]
    source: Option<Source>,
}

impl Error {
    /// An error with the code's default class.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            class: code.default_class(),
            code,
            message: message.into(),
            run: None,
            phase: None,
            hint: None,
            source: None,
        }
    }

    /// `internal_state_corruption`: persisted state that cannot be reconciled.
    pub fn corruption(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InternalStateCorruption, message).with_hint(
            "the store holds state phaseflow did not write this way; inspect the run's event log before touching it",
        )
    }

    /// `run_state_changed`: the run is no longer planning/executing.
    pub fn run_state_changed(run: RunId, state: crate::state::RunState) -> Self {
        Self::new(
            ErrorCode::RunStateChanged,
            format!("run {run} is {state}; phase work stopped and nothing was written"),
        )
        .with_run(run)
        .with_hint(
            "someone paused, aborted or finished the run; resume it once it is executing again",
        )
    }

    /// Overrides the class.
    pub fn with_class(mut self, class: ErrorClass) -> Self {
        self.class = class;
        self
    }

    /// Names the run.
    pub fn with_run(mut self, run: RunId) -> Self {
        self.run = Some(run);
        self
    }

    /// Names the phase.
    pub fn with_phase(mut self, phase: PhaseKey) -> Self {
        self.phase = Some(phase);
        self
    }

    /// Names run and phase unless already named.
    pub fn in_phase(mut self, run: RunId, phase: &PhaseKey) -> Self {
        self.run.get_or_insert(run);
        if self.phase.is_none() {
            self.phase = Some(phase.clone());
        }
        self
    }

    /// Says what to do next.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Keeps the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// How the error is handled.
    pub fn class(&self) -> ErrorClass {
        self.class
    }

    /// The stable code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The human-readable message (without hint or ids).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The run concerned, if known.
    pub fn run(&self) -> Option<RunId> {
        self.run
    }

    /// The phase concerned, if known.
    pub fn phase(&self) -> Option<&PhaseKey> {
        self.phase.as_ref()
    }

    /// What to do next, if known.
    pub fn hint(&self) -> Option<&str> {
        self.hint.as_deref()
    }

    /// True for `recoverable` errors.
    pub fn is_recoverable(&self) -> bool {
        self.class == ErrorClass::Recoverable
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, {})", self.message, self.code, self.class)?;
        match (&self.run, &self.phase) {
            (Some(run), Some(phase)) => write!(f, " [run {run}, phase {phase}]")?,
            (Some(run), None) => write!(f, " [run {run}]")?,
            (None, Some(phase)) => write!(f, " [phase {phase}]")?,
            (None, None) => {}
        }
        if let Some(hint) = &self.hint {
            write!(f, "; {hint}")?;
        }
        Ok(())
    }
}

/// `Result` with phaseflow's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_says_what_code_class_where_and_what_next() {
        let run = RunId::new();
        let err = Error::new(
            ErrorCode::ArtifactTooLarge,
            "artifact is 9 MiB, cap is 4 MiB",
        )
        .in_phase(run, &PhaseKey::new("plan"))
        .with_hint("raise the cap or ask the agent for a smaller artifact");
        assert_eq!(
            err.to_string(),
            format!(
                "artifact is 9 MiB, cap is 4 MiB (artifact_too_large, human_required) [run {run}, phase plan]; raise the cap or ask the agent for a smaller artifact"
            )
        );
    }

    #[test]
    fn codes_round_trip() {
        for code in [
            ErrorCode::RunStateChanged,
            ErrorCode::InternalStateCorruption,
        ] {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::parse("nope"), None);
    }
}
