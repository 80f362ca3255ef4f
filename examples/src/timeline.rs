//! A run's event log as a readable timeline: one line per event with the time since the run was
//! created, the phase, the event type and what matters about it — down to every validation error,
//! with its instance path, that sent a repair prompt.
//!
//! ```text
//!      61 ms  implement  prompt.sent          attempt 1, prompt 946d90c91dd7
//!      61 ms  implement  artifact.expected    attempt 1 waits for phaseflow/impl.json (impl.schema.json)
//!     120 ms  implement  artifact.invalid     phaseflow/impl.json sha256 87abe76c3acc — 2 errors:
//!                                               /changed_files: [] has less than 1 item
//!                                               /tests_passed: "yes" is not of type "boolean"
//! ```
//!
//! [`Timeline::catch_up`] reads the events appended since the last call
//! ([`Store::events`] with `after`), so calling it after each step of a workflow tails the log.

use std::path::Path;
use std::sync::Arc;

use phaseflow::event::{Event, EventKind, ValidationIssue};
use phaseflow::ids::{ContentHash, DedupKey, RunId};
use phaseflow::store::Store;
use time::OffsetDateTime;

/// Tails one run's event log.
#[derive(Debug)]
pub struct Timeline {
    store: Arc<dyn Store>,
    run: RunId,
    after: u64,
    origin: Option<OffsetDateTime>,
    worktree: Option<String>,
    /// The phase of the last event that named one: session and decision events belong to it.
    phase: Option<String>,
}

impl Timeline {
    /// A timeline of `run` that has shown nothing yet.
    pub fn new(store: Arc<dyn Store>, run: RunId) -> Self {
        Self {
            store,
            run,
            after: 0,
            origin: None,
            worktree: None,
            phase: None,
        }
    }

    /// The events appended since the last call, rendered (one or more lines each).
    ///
    /// # Errors
    /// Store errors.
    pub async fn catch_up(&mut self) -> phaseflow::Result<Vec<String>> {
        if self.worktree.is_none() {
            self.worktree = Some(self.store.run(self.run).await?.worktree);
        }
        let events = self.store.events(self.run, self.after).await?;
        let mut lines = Vec::new();
        for event in events {
            self.after = event.seq;
            let origin = *self.origin.get_or_insert(event.at);
            if let Some(phase) = event.kind.phase() {
                self.phase = Some(phase.to_string());
            }
            lines.extend(self.render(&event, origin));
        }
        Ok(lines)
    }

    /// Prints the events appended since the last call to stdout.
    ///
    /// # Errors
    /// Store errors.
    pub async fn print_new(&mut self) -> phaseflow::Result<()> {
        for line in self.catch_up().await? {
            println!("{line}");
        }
        Ok(())
    }

    fn render(&self, event: &Event, origin: OffsetDateTime) -> Vec<String> {
        let elapsed = (event.at - origin).whole_milliseconds().max(0);
        let phase = match &event.kind {
            EventKind::RunCreated { .. }
            | EventKind::RunStarted
            | EventKind::RunPaused { .. }
            | EventKind::RunResumed { .. }
            | EventKind::RunCompleted
            | EventKind::RunFailed { .. }
            | EventKind::RunAborted { .. } => "·",
            _ => self.phase.as_deref().unwrap_or("·"),
        };
        let (detail, issues) = self.detail(&event.kind);
        let head = format!(
            "  {elapsed:>6} ms  {phase:<10} {:<20} {detail}",
            event.kind.type_name()
        );
        let mut lines = vec![head.trim_end().to_owned()];
        lines.extend(issues.iter().map(|issue| {
            format!(
                "{:47}{}: {}",
                "",
                pointer_label(&issue.instance_path),
                issue.message
            )
        }));
        lines
    }

    fn detail<'e>(&self, kind: &'e EventKind) -> (String, &'e [ValidationIssue]) {
        let detail = match kind {
            EventKind::RunCreated { workflow, phases } => {
                let phases: Vec<&str> = phases.iter().map(|p| p.as_str()).collect();
                format!("workflow `{workflow}`: {}", phases.join(" → "))
            }
            EventKind::RunStarted | EventKind::RunCompleted => String::new(),
            EventKind::PhaseStarted {
                attempt,
                repair,
                reason,
                ..
            } => {
                let kind = if *repair { "repair: " } else { "" };
                format!("attempt {attempt} ({kind}{reason})")
            }
            EventKind::SessionCreated { session, role } => {
                format!("role {role}, session {}", &session.to_string()[..8])
            }
            EventKind::SessionReady {
                role,
                recovery_attempts,
                ..
            } => format!("role {role}, recoveries {recovery_attempts}"),
            EventKind::SessionBusy { dedup, .. } => format!("with prompt {}", dedup_label(dedup)),
            EventKind::SessionIdle { dedup, .. } => {
                format!("done with prompt {}", dedup_label(dedup))
            }
            EventKind::PromptSent { attempt, dedup, .. }
            | EventKind::PromptRepaired { attempt, dedup, .. } => {
                format!("attempt {attempt}, prompt {}", dedup_label(dedup))
            }
            EventKind::ArtifactExpected {
                attempt,
                path,
                schema,
                ..
            } => format!(
                "attempt {attempt} waits for {} ({schema})",
                self.relative(path)
            ),
            EventKind::ArtifactTimeout { attempt, path, .. } => {
                format!("attempt {attempt}: nothing at {}", self.relative(path))
            }
            EventKind::ArtifactValidated { path, hash, .. } => {
                format!("{} {} — valid", self.relative(path), hash_label(hash))
            }
            EventKind::ArtifactInvalid {
                path, hash, errors, ..
            } => {
                let count = match errors.len() {
                    1 => "1 error".to_owned(),
                    n => format!("{n} errors"),
                };
                return (
                    format!("{} {} — {count}:", self.relative(path), hash_label(hash)),
                    errors,
                );
            }
            EventKind::SessionCrashed {
                recovery_attempts, ..
            }
            | EventKind::SessionRecovered {
                recovery_attempts, ..
            } => format!("recoveries {recovery_attempts}"),
            EventKind::SessionFailed { role, attempt, .. } => {
                format!("role {role} stopped at attempt {attempt}")
            }
            EventKind::PhaseCompleted { attempt, .. } => format!("with attempt {attempt}"),
            EventKind::PhaseFailed {
                attempt, reason, ..
            } => format!("attempt {attempt}: {reason}"),
            EventKind::ApprovalRequested { gate, kind, .. } => {
                format!("gate `{gate}` ({})", serde_label(kind))
            }
            EventKind::ApprovalDecided {
                decision, actor, ..
            } => format!("{} by {actor}", decision.as_str()),
            EventKind::RunPaused { cause, .. } => cause.clone(),
            EventKind::RunResumed { state, .. } => format!("back to {state}"),
            EventKind::RunFailed { reason } | EventKind::RunAborted { reason } => reason.clone(),
        };
        (detail, &[])
    }

    /// The artifact path relative to the run's worktree, as the phase declares it.
    fn relative<'p>(&self, path: &'p str) -> &'p str {
        self.worktree
            .as_deref()
            .and_then(|worktree| Path::new(path).strip_prefix(worktree).ok())
            .and_then(Path::to_str)
            .unwrap_or(path)
    }
}

/// The first 12 hex digits of a dedup key: enough to tell prompts apart in a timeline.
pub fn dedup_label(dedup: &DedupKey) -> String {
    short(dedup.as_str())
}

fn hash_label(hash: &ContentHash) -> String {
    format!("sha256 {}", short(hash.as_str()))
}

fn short(text: &str) -> String {
    text.chars().take(12).collect()
}

fn pointer_label(pointer: &str) -> &str {
    if pointer.is_empty() {
        "(document)"
    } else {
        pointer
    }
}

fn serde_label<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}
