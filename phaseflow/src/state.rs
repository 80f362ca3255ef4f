//! The persisted states of runs, phases and sessions, and which transitions they allow.
//!
//! Every state has a stable string form (`as_str` / `FromStr`): it is what stores persist and
//! what events carry, so renaming a variant is a data migration, not a refactor.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A state string read from a store that names no known state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} state `{value}`")]
pub struct UnknownState {
    /// Which state machine the string was meant for (`run`, `phase`, `session`, …).
    pub kind: &'static str,
    /// The string that was read.
    pub value: String,
}

macro_rules! state_enum {
    (
        $(#[$doc:meta])* $name:ident, $kind:literal, $case:literal {
            $( $(#[$vdoc:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = $case)]
        pub enum $name {
            $( $(#[$vdoc])* $variant, )+
        }

        impl $name {
            /// Every state, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stable string form stores persist.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownState;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $( $text => Ok($name::$variant), )+
                    other => Err(UnknownState { kind: $kind, value: other.to_owned() }),
                }
            }
        }
    };
}

state_enum! {
    /// The state of a run.
    RunState, "run", "snake_case" {
        /// Created; no phase has started yet.
        Planning => "planning",
        /// A phase is being worked on (or the next one may start).
        Executing => "executing",
        /// A workflow gate waits for a human decision.
        AwaitingApproval => "awaiting_approval",
        /// Stopped at a failure gate or by an operator; `paused_from` says where to go back to.
        Paused => "paused",
        /// Every phase completed.
        Completed => "completed",
        /// A fatal error ended the run.
        Failed => "failed",
        /// A human rejected or aborted the run.
        Aborted => "aborted",
    }
}

impl RunState {
    /// Completed, failed and aborted runs never change again.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            RunState::Completed | RunState::Failed | RunState::Aborted
        )
    }

    /// Phase work may only write while the run is planning or executing; every other state
    /// makes a store command fail with `run_state_changed` and write nothing.
    pub const fn allows_phase_work(self) -> bool {
        matches!(self, RunState::Planning | RunState::Executing)
    }
}

state_enum! {
    /// The state of one phase of a run.
    PhaseState, "phase", "snake_case" {
        /// Not started (or sent back for rework / retry).
        Pending => "pending",
        /// An attempt has started: session start and prompt delivery.
        Running => "running",
        /// The prompt was delivered; waiting for the artifact file.
        AwaitingArtifact => "awaiting_artifact",
        /// The artifact was found and its verdict recorded.
        Validating => "validating",
        /// A valid artifact waits for a workflow gate decision.
        AwaitingApproval => "awaiting_approval",
        /// Done.
        Completed => "completed",
        /// Failed: the run is paused at a failure gate, or failed altogether.
        Failed => "failed",
    }
}

state_enum! {
    /// The state of an agent session (one per run × role).
    SessionState, "session", "SCREAMING_SNAKE_CASE" {
        /// The runtime started it; not yet usable.
        Created => "CREATED",
        /// Being prepared (tooling, context) before the first prompt.
        Bootstrapping => "BOOTSTRAPPING",
        /// Idle and able to take a prompt.
        Ready => "READY",
        /// Working on the prompt recorded in `last_dedup`.
        Busy => "BUSY",
        /// The expected artifact did not appear in time.
        ArtifactTimeout => "ARTIFACT_TIMEOUT",
        /// Being recovered after a timeout.
        Resuming => "RESUMING",
        /// Recovery re-bootstrapped it; about to be ready again.
        Rebootstrapped => "REBOOTSTRAPPED",
        /// Found dead; must be resumed before use.
        Crashed => "CRASHED",
        /// Its artifact waits for a workflow gate decision.
        WaitingForApproval => "WAITING_FOR_APPROVAL",
        /// Stopped for good until a human decides; never resumed automatically.
        FailedNeedsHuman => "FAILED_NEEDS_HUMAN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_round_trips_through_its_string() {
        for state in RunState::ALL {
            assert_eq!(state.as_str().parse::<RunState>().unwrap(), *state);
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
        for state in PhaseState::ALL {
            assert_eq!(state.as_str().parse::<PhaseState>().unwrap(), *state);
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
        for state in SessionState::ALL {
            assert_eq!(state.as_str().parse::<SessionState>().unwrap(), *state);
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
    }

    #[test]
    fn unknown_state_names_the_machine_and_value() {
        let err = "sleeping".parse::<RunState>().unwrap_err();
        assert_eq!(err.to_string(), "unknown run state `sleeping`");
    }

    #[test]
    fn only_planning_and_executing_allow_phase_work() {
        let allowed: Vec<_> = RunState::ALL
            .iter()
            .filter(|s| s.allows_phase_work())
            .collect();
        assert_eq!(allowed, [&RunState::Planning, &RunState::Executing]);
    }
}
