//! The working copy of one command on one run's [`Snapshot`]: the helpers every command's rules
//! are written with.

use std::collections::{HashMap, HashSet};

use serde_json::Value;
use time::OffsetDateTime;

use super::{Changes, Snapshot, phase_not_found, session_not_found};
use crate::error::{Error, ErrorCode, Result};
use crate::event::{EventKind, GateKind};
use crate::ids::{
    ApprovalId, ArtifactId, ContentHash, DedupKey, EngineId, GateKey, PhaseKey, RunId, SessionId,
};
use crate::state::{PhaseState, RunState, SessionState};
use crate::store::{
    ApprovalRecord, ArtifactRecord, NewArtifact, PhaseRecord, PhaseWork, RunRecord, SessionRecord,
    TranscriptChunk,
};

/// The rows commands update in place; a command works on a copy of them.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Rows {
    pub(super) run: RunRecord,
    pub(super) phases: Vec<PhaseRecord>,
    pub(super) sessions: Vec<SessionRecord>,
    pub(super) approvals: Vec<ApprovalRecord>,
}

/// The working state of one command on one locked run.
#[derive(Debug)]
pub(super) struct Tx {
    pub(super) now: OffsetDateTime,
    stored: Rows,
    pub(super) rows: Rows,
    event_keys: HashMap<String, bool>,
    events: Vec<(String, EventKind)>,
    keys: HashSet<String>,
    stored_artifact: Option<ArtifactRecord>,
    artifacts: Vec<ArtifactRecord>,
    session_recorded: bool,
    stored_chunks: HashMap<(SessionId, u64), String>,
    chunks: Vec<(SessionId, TranscriptChunk)>,
}

impl Tx {
    /// Starts a command on a snapshot.
    pub(super) fn begin(snapshot: Snapshot) -> Self {
        let stored = Rows {
            run: snapshot.run,
            phases: snapshot.phases,
            sessions: snapshot.sessions,
            approvals: snapshot.approvals,
        };
        Self {
            now: snapshot.now,
            rows: stored.clone(),
            stored,
            event_keys: snapshot.event_keys,
            events: Vec::new(),
            keys: HashSet::new(),
            stored_artifact: snapshot.artifact,
            artifacts: Vec::new(),
            session_recorded: snapshot.session_recorded,
            stored_chunks: snapshot
                .chunks
                .into_iter()
                .map(|(session, chunk)| ((session, chunk.seq), chunk.text))
                .collect(),
            chunks: Vec::new(),
        }
    }

    /// The changes to write, or `None` when the command wrote nothing.
    pub(super) fn into_changes(self) -> Option<Changes> {
        let phases = changed(&self.rows.phases, &self.stored.phases);
        let sessions = changed(&self.rows.sessions, &self.stored.sessions);
        let approvals = changed(&self.rows.approvals, &self.stored.approvals);
        let run_changed = self.rows.run != self.stored.run;
        let wrote = run_changed
            || !phases.is_empty()
            || !sessions.is_empty()
            || !approvals.is_empty()
            || !self.events.is_empty()
            || !self.artifacts.is_empty()
            || !self.chunks.is_empty();
        wrote.then_some(Changes {
            at: self.now,
            run: self.rows.run,
            run_changed,
            phases,
            sessions,
            approvals,
            events: self.events,
            artifacts: self.artifacts,
            chunks: self.chunks,
        })
    }

    pub(super) fn run_id(&self) -> RunId {
        self.rows.run.id
    }

    pub(super) fn run(&self) -> &RunRecord {
        &self.rows.run
    }

    /// Whether the run has the event `key`. Only keys listed in
    /// [`Needs::event_keys`](super::Needs::event_keys) were read.
    pub(super) fn has_event(&self, key: &str) -> bool {
        debug_assert!(
            self.event_keys.contains_key(key) || self.keys.contains(key),
            "event key `{key}` was not in the command's needs"
        );
        self.recorded(key) || self.keys.contains(key)
    }

    /// Whether the snapshot says the run has the event `key`.
    fn recorded(&self, key: &str) -> bool {
        self.event_keys.get(key).copied().unwrap_or(false)
    }

    /// Appends an event unless the run already has its idempotency key (keys this command did
    /// not read are filtered out by the store when it appends the events).
    pub(super) fn append(&mut self, kind: EventKind) {
        let key = kind.idempotency_key();
        if !self.recorded(&key) && self.keys.insert(key.clone()) {
            self.events.push((key, kind));
        }
    }

    // ---- phases and the rules every phase-work command follows ----

    pub(super) fn phase_index(&self, key: &PhaseKey) -> Result<usize> {
        self.rows
            .phases
            .iter()
            .position(|phase| &phase.key == key)
            .ok_or_else(|| phase_not_found(self.run_id(), key))
    }

    pub(super) fn phase(&self, index: usize) -> &PhaseRecord {
        &self.rows.phases[index]
    }

    pub(super) fn phase_mut(&mut self, index: usize) -> &mut PhaseRecord {
        &mut self.rows.phases[index]
    }

    pub(super) fn require_phase_work(&self) -> Result<()> {
        let run = self.run();
        if run.state.allows_phase_work() {
            Ok(())
        } else {
            Err(Error::run_state_changed(run.id, run.state))
        }
    }

    pub(super) fn require_owner(&self, index: usize, owner: EngineId) -> Result<()> {
        let phase = self.phase(index);
        if phase.owner == Some(owner) {
            return Ok(());
        }
        let holder = phase
            .owner
            .map_or_else(|| "no engine".to_owned(), |id| format!("engine {id}"));
        Err(Error::new(
            ErrorCode::PhaseClaimed,
            format!("engine {owner} does not own this phase; {holder} does"),
        )
        .in_phase(self.run_id(), &phase.key)
        .with_hint("another engine took the phase over; stop here, or claim it again to resume"))
    }

    /// Steps 2–4 of every phase-work command: phase exists, run allows work, caller owns it.
    pub(super) fn phase_work(&self, work: &PhaseWork) -> Result<usize> {
        let index = self.phase_index(&work.phase)?;
        self.require_phase_work()?;
        self.require_owner(index, work.owner)?;
        Ok(index)
    }

    pub(super) fn require_attempt(&self, index: usize, attempt: u32) -> Result<()> {
        let phase = self.phase(index);
        if phase.attempts == attempt {
            return Ok(());
        }
        Err(Error::new(
            ErrorCode::PhaseStateMismatch,
            format!(
                "attempt {attempt} is not the phase's current attempt {}",
                phase.attempts
            ),
        )
        .in_phase(self.run_id(), &phase.key)
        .with_hint("reload the phase and continue from its current attempt"))
    }

    pub(super) fn require_phase_state(
        &self,
        index: usize,
        allowed: &[PhaseState],
        doing: &str,
    ) -> Result<()> {
        let phase = self.phase(index);
        if allowed.contains(&phase.state) {
            return Ok(());
        }
        let allowed: Vec<&str> = allowed.iter().map(|state| state.as_str()).collect();
        Err(Error::new(
            ErrorCode::PhaseStateMismatch,
            format!(
                "cannot {doing} while the phase is {} (needs {})",
                phase.state,
                allowed.join(" or ")
            ),
        )
        .in_phase(self.run_id(), &phase.key)
        .with_hint("reload the phase and resume from its persisted state"))
    }

    /// After phase `index` completed: the run moves to the next phase, or completes.
    /// `resumed_by` names the approval request whose decision let the run go on.
    pub(super) fn advance(&mut self, index: usize, resumed_by: Option<ApprovalId>) {
        match self.rows.phases.get(index + 1).map(|next| next.key.clone()) {
            Some(next) => {
                let run = &mut self.rows.run;
                run.current_phase = Some(next);
                run.state = RunState::Executing;
                run.paused_from = None;
                if let Some(request) = resumed_by {
                    self.append(EventKind::RunResumed {
                        request,
                        state: RunState::Executing,
                    });
                }
            }
            None => {
                self.finish_run(RunState::Completed);
                self.append(EventKind::RunCompleted);
            }
        }
    }

    pub(super) fn finish_run(&mut self, state: RunState) {
        let run = &mut self.rows.run;
        run.state = state;
        run.current_phase = None;
        run.paused_from = None;
    }

    /// Aborts the run: the phase in flight fails, every session stops for good.
    pub(super) fn abort_run(&mut self, reason: String) -> Vec<SessionId> {
        let current = self.run().current_phase.clone();
        let at = current
            .as_ref()
            .and_then(|key| self.rows.phases.iter().position(|phase| &phase.key == key));
        let mut failed_at = None;
        if let Some(index) = at {
            let phase = self.phase_mut(index);
            let in_flight = matches!(
                phase.state,
                PhaseState::Running
                    | PhaseState::AwaitingArtifact
                    | PhaseState::Validating
                    | PhaseState::AwaitingApproval
            );
            let (key, attempt) = (phase.key.clone(), phase.attempts);
            if in_flight {
                phase.state = PhaseState::Failed;
                self.append(EventKind::PhaseFailed {
                    phase: key.clone(),
                    attempt,
                    reason: reason.clone(),
                });
            }
            failed_at = Some((key, attempt));
        }
        self.finish_run(RunState::Aborted);
        self.append(EventKind::RunAborted { reason });
        match failed_at {
            Some((phase, attempt)) => self.fail_all_sessions(&phase, attempt),
            None => self
                .rows
                .sessions
                .iter()
                .map(|session| session.id)
                .collect(),
        }
    }

    // ---- sessions ----

    pub(super) fn session_index(&self, id: SessionId) -> Result<usize> {
        self.rows
            .sessions
            .iter()
            .position(|session| session.id == id)
            .ok_or_else(|| session_not_found(id).with_run(self.run_id()))
    }

    pub(super) fn session_mut(&mut self, index: usize) -> &mut SessionRecord {
        &mut self.rows.sessions[index]
    }

    /// Whether the session id is recorded for any run (the id in
    /// [`Needs::session`](super::Needs::session)).
    pub(super) fn session_recorded(&self) -> bool {
        self.session_recorded
    }

    /// The session finished the prompt `dedup`: `READY`, `session.idle`.
    pub(super) fn settle_session(&mut self, index: usize, dedup: &DedupKey) {
        let session = self.session_mut(index);
        if session.state == SessionState::Busy && session.last_dedup.as_ref() == Some(dedup) {
            session.state = SessionState::Ready;
            let id = session.id;
            self.append(EventKind::SessionIdle {
                session: id,
                dedup: dedup.clone(),
            });
        }
    }

    pub(super) fn ready_session(&mut self, index: usize) {
        let session = self.session_mut(index);
        session.state = SessionState::Ready;
        let event = EventKind::SessionReady {
            session: session.id,
            role: session.role.clone(),
            recovery_attempts: session.recovery_attempts,
        };
        self.append(event);
    }

    pub(super) fn crash_session(&mut self, index: usize) {
        let session = self.session_mut(index);
        session.state = SessionState::Crashed;
        session.recovery_attempts += 1;
        let event = EventKind::SessionCrashed {
            session: session.id,
            recovery_attempts: session.recovery_attempts,
        };
        self.append(event);
    }

    pub(super) fn fail_session(&mut self, index: usize, phase: &PhaseKey, attempt: u32) {
        let session = self.session_mut(index);
        if session.state == SessionState::FailedNeedsHuman {
            return;
        }
        session.state = SessionState::FailedNeedsHuman;
        let event = EventKind::SessionFailed {
            session: session.id,
            role: session.role.clone(),
            phase: phase.clone(),
            attempt,
        };
        self.append(event);
    }

    /// Stops every session of the run for good; returns all of them for disposal.
    pub(super) fn fail_all_sessions(&mut self, phase: &PhaseKey, attempt: u32) -> Vec<SessionId> {
        for index in 0..self.rows.sessions.len() {
            self.fail_session(index, phase, attempt);
        }
        self.rows
            .sessions
            .iter()
            .map(|session| session.id)
            .collect()
    }

    pub(super) fn refuse_failed_session(&self, index: usize) -> Result<()> {
        let session = &self.rows.sessions[index];
        if session.state != SessionState::FailedNeedsHuman {
            return Ok(());
        }
        Err(Error::new(
            ErrorCode::SessionFailedNeedsHuman,
            format!(
                "session {} ({}) is FAILED_NEEDS_HUMAN and is never reused automatically",
                session.id, session.role
            ),
        )
        .with_run(self.run_id())
        .with_hint("decide the run's pending failure gate (retry or abort) first"))
    }

    // ---- artifacts ----

    /// Inserts the artifact idempotently on (run, path, hash), appends its verdict event and
    /// moves the phase to `validating`.
    pub(super) fn apply_verdict(
        &mut self,
        index: usize,
        attempt: u32,
        new: &NewArtifact,
    ) -> Result<ArtifactRecord> {
        let phase = self.phase(index).key.clone();
        let record = match self.find_artifact(&new.path, &new.hash) {
            Some(stored) if stored.matches(&phase, new) => stored.clone(),
            Some(stored) => {
                return Err(Error::corruption(format!(
                    "artifact {} ({}) was recorded for phase `{}` with another verdict; the replay for phase `{phase}` differs",
                    stored.path, stored.hash, stored.phase
                ))
                .in_phase(self.run_id(), &phase));
            }
            None => {
                let record = ArtifactRecord {
                    id: ArtifactId::new(),
                    run: self.run_id(),
                    phase: phase.clone(),
                    attempt,
                    path: new.path.clone(),
                    hash: new.hash.clone(),
                    schema_id: new.schema_id.clone(),
                    size: new.size,
                    content: new.content.clone(),
                    errors: new.errors.clone(),
                    recorded_at: self.now,
                };
                self.artifacts.push(record.clone());
                record
            }
        };
        let event = if record.is_valid() {
            EventKind::ArtifactValidated {
                phase,
                artifact: record.id,
                path: record.path.clone(),
                hash: record.hash.clone(),
                schema: record.schema_id.clone(),
            }
        } else {
            EventKind::ArtifactInvalid {
                phase,
                artifact: record.id,
                path: record.path.clone(),
                hash: record.hash.clone(),
                schema: record.schema_id.clone(),
                errors: record.errors.clone(),
            }
        };
        self.append(event);
        self.phase_mut(index).state = PhaseState::Validating;
        Ok(record)
    }

    /// The artifact stored (or staged) under (path, hash); only the pair in
    /// [`Needs::artifact`](super::Needs::artifact) was read.
    pub(super) fn find_artifact(&self, path: &str, hash: &ContentHash) -> Option<&ArtifactRecord> {
        self.stored_artifact
            .iter()
            .chain(&self.artifacts)
            .find(|artifact| artifact.path == path && &artifact.hash == hash)
    }

    // ---- approval requests ----

    pub(super) fn approval_by_key(&self, key: &str) -> Option<&ApprovalRecord> {
        self.rows
            .approvals
            .iter()
            .find(|approval| approval.key == key)
    }

    /// Files an approval request idempotently on its key.
    pub(super) fn file_request(
        &mut self,
        index: usize,
        attempt: u32,
        gate: &GateKey,
        kind: GateKind,
        payload: &Value,
    ) -> Result<ApprovalRecord> {
        let phase = self.phase(index).key.clone();
        let key = ApprovalRecord::key_for(self.run_id(), gate, &phase, attempt);
        if let Some(stored) = self.approval_by_key(&key) {
            return self
                .check_request_replay(stored, gate, kind, payload)
                .cloned();
        }
        let record = ApprovalRecord {
            id: ApprovalId::new(),
            run: self.run_id(),
            phase,
            attempt,
            gate: gate.clone(),
            kind,
            key,
            payload: payload.clone(),
            decision: None,
            created_at: self.now,
        };
        self.rows.approvals.push(record.clone());
        Ok(record)
    }

    pub(super) fn check_request_replay<'r>(
        &self,
        stored: &'r ApprovalRecord,
        gate: &GateKey,
        kind: GateKind,
        payload: &Value,
    ) -> Result<&'r ApprovalRecord> {
        if &stored.gate == gate && stored.kind == kind && &stored.payload == payload {
            return Ok(stored);
        }
        Err(Error::corruption(format!(
            "approval request {} was filed with other content than this replay",
            stored.key
        ))
        .in_phase(self.run_id(), &stored.phase))
    }

    pub(super) fn approval_requested(&mut self, approval: &ApprovalRecord) {
        self.append(EventKind::ApprovalRequested {
            request: approval.id,
            key: approval.key.clone(),
            gate: approval.gate.clone(),
            kind: approval.kind,
            phase: approval.phase.clone(),
            attempt: approval.attempt,
        });
    }

    // ---- transcripts ----

    /// Stages transcript chunks idempotently on (session, seq); only the chunks in
    /// [`Needs::chunks`](super::Needs::chunks) were read.
    pub(super) fn stage_chunks(&mut self, index: usize, chunks: &[TranscriptChunk]) -> Result<()> {
        let session = self.rows.sessions[index].id;
        for chunk in chunks {
            if chunk.seq == 0 {
                return Err(Error::new(
                    ErrorCode::InvalidArgument,
                    format!("transcript chunk of session {session} has seq 0"),
                )
                .with_run(self.run_id())
                .with_hint("transcript sequence numbers start at 1"));
            }
            let known = self.stored_chunks.get(&(session, chunk.seq)).or_else(|| {
                self.chunks
                    .iter()
                    .find(|(id, staged)| *id == session && staged.seq == chunk.seq)
                    .map(|(_, staged)| &staged.text)
            });
            match known {
                Some(text) if text == &chunk.text => {}
                Some(_) => {
                    return Err(Error::corruption(format!(
                        "transcript chunk {} of session {session} was stored with other text",
                        chunk.seq
                    ))
                    .with_run(self.run_id()));
                }
                None => self.chunks.push((session, chunk.clone())),
            }
        }
        let last = chunks.iter().map(|chunk| chunk.seq).max().unwrap_or(0);
        let record = self.session_mut(index);
        record.last_capture_seq = record.last_capture_seq.max(last);
        Ok(())
    }
}

/// The rows of `now` that are new or differ from `stored`.
fn changed<T: Clone + PartialEq>(now: &[T], stored: &[T]) -> Vec<T> {
    now.iter()
        .filter(|row| !stored.contains(row))
        .cloned()
        .collect()
}
