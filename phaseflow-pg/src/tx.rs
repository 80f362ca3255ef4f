//! One store command = one transaction, in four round trips:
//!
//! 1. `BEGIN; SELECT 1 FROM phaseflow.runs WHERE id = '…' FOR UPDATE` — one simple-query message
//!    that opens the transaction and takes the run's row lock (every writer takes it first, so
//!    commands on one run are serialised, and concurrent engines queue here);
//! 2. [`load`]: one statement, started after the lock was granted so it sees every earlier
//!    command's commit, reads the run, its phases and sessions (and, when the command needs them,
//!    its approval requests, the artifact with the command's path and hash, the transcript chunks
//!    it re-sends, whether some event keys exist, whether a session id is recorded anywhere);
//! 3. the command's rules run in Rust on a [`Tx`], a working copy of those rows (the same rules,
//!    written the same way, as `MemoryStore`'s);
//! 4. [`apply`]: one statement writes every changed row and appends the events, then `COMMIT`.
//!
//! Idempotent inserts compare with the stored row *before* writing rather than after: the
//! stored artifact, approval request or transcript chunk was read in step 2 under the run lock,
//! and every writer holds that lock, so nothing can appear between the read and the insert.
//! The inserts still say `ON CONFLICT DO NOTHING`, and event keys are filtered against
//! `run_events` inside the insert itself, so a replayed event is never appended twice. Event
//! seqs are `last_seq + 1, + 2, …` over the events actually inserted, and `runs.last_seq` is
//! advanced by the same count in the same statement: gapless, because the run row is locked.

use std::collections::{HashMap, HashSet};

use phaseflow::error::{Error, ErrorCode, Result};
use phaseflow::event::{EventKind, GateKind};
use phaseflow::ids::{
    ApprovalId, ArtifactId, ContentHash, DedupKey, EngineId, GateKey, PhaseKey, RunId, SessionId,
};
use phaseflow::state::{PhaseState, RunState, SessionState};
use phaseflow::store::{
    ApprovalRecord, ArtifactRecord, NewArtifact, PhaseRecord, PhaseWork, RunRecord, SessionRecord,
    TranscriptChunk,
};
use serde_json::Value;
use sqlx::{PgConnection, Postgres, Transaction};
use time::OffsetDateTime;

use crate::{db_error, decode};

/// How a command finds the run it locks.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Target {
    Run(RunId),
    Session(SessionId),
    Approval(ApprovalId),
}

impl Target {
    /// Step 1: the statement that opens the transaction and locks the run row. Ids are uuids
    /// formatted by `uuid` (hex digits and dashes), so splicing them into the SQL is safe.
    ///
    /// `plan_cache_mode = force_generic_plan` (for this transaction only) makes PostgreSQL plan
    /// the load and write statements once per connection instead of once per execution: both
    /// are driven by primary and unique keys, so the generic plan is the right one, and
    /// re-planning the nine-part write statement costs more than executing it.
    pub(crate) fn begin_sql(self) -> String {
        let run = match self {
            Target::Run(run) => format!("'{run}'"),
            Target::Session(session) => {
                format!("(SELECT run_id FROM phaseflow.sessions WHERE id = '{session}')")
            }
            Target::Approval(request) => {
                format!("(SELECT run_id FROM phaseflow.approval_requests WHERE id = '{request}')")
            }
        };
        format!(
            "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; \
             SELECT 1 FROM phaseflow.runs WHERE id = {run} FOR UPDATE"
        )
    }

    fn not_found(self) -> Error {
        match self {
            Target::Run(run) => run_not_found(run),
            Target::Session(session) => session_not_found(session),
            Target::Approval(request) => approval_not_found(request),
        }
    }
}

/// What a command needs read besides the run, its phases and sessions.
#[derive(Debug, Default)]
pub(crate) struct Probes {
    /// Event keys whose presence the command's rules ask about.
    pub(crate) keys: Vec<String>,
    /// The artifact stored under this (path, hash), if any.
    pub(crate) artifact: Option<(String, ContentHash)>,
    /// Whether this session id is recorded for any run.
    pub(crate) session: Option<SessionId>,
    /// Stored transcript chunks of this session with these seqs.
    pub(crate) chunks: Option<(SessionId, Vec<u64>)>,
    /// The run's approval requests.
    pub(crate) approvals: bool,
}

/// The rows commands update in place; a command works on a copy of them.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Rows {
    pub(crate) run: RunRecord,
    pub(crate) phases: Vec<PhaseRecord>,
    pub(crate) sessions: Vec<SessionRecord>,
    pub(crate) approvals: Vec<ApprovalRecord>,
}

/// The working state of one command on one locked run.
pub(crate) struct Tx {
    pub(crate) now: OffsetDateTime,
    last_seq: u64,
    stored: Rows,
    pub(crate) rows: Rows,
    probed_keys: HashSet<String>,
    stored_keys: HashSet<String>,
    events: Vec<(String, EventKind)>,
    keys: HashSet<String>,
    stored_artifact: Option<ArtifactRecord>,
    artifacts: Vec<ArtifactRecord>,
    session_recorded: bool,
    stored_chunks: HashMap<(SessionId, u64), String>,
    chunks: Vec<(SessionId, TranscriptChunk)>,
}

/// `now`, at the microsecond precision PostgreSQL keeps, so a returned record equals its re-read.
pub(crate) fn now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000 * 1_000)
        .unwrap_or(now)
}

fn to_i64(value: u64, what: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| {
        Error::new(
            ErrorCode::InvalidArgument,
            format!("{what} {value} exceeds the store's range (i64)"),
        )
    })
}

/// Step 2: reads what the command works on (see the module docs).
pub(crate) async fn load(conn: &mut PgConnection, target: Target, probes: &Probes) -> Result<Tx> {
    let (run, session, approval) = match target {
        Target::Run(run) => (Some(run.as_uuid()), None, None),
        Target::Session(session) => (None, Some(session.as_uuid()), None),
        Target::Approval(request) => (None, None, Some(request.as_uuid())),
    };
    let (artifact_path, artifact_hash) = match &probes.artifact {
        Some((path, hash)) => (Some(path.as_str()), Some(hash.as_str())),
        None => (None, None),
    };
    let (chunk_session, chunk_seqs) = match &probes.chunks {
        Some((session, seqs)) => (
            Some(session.as_uuid()),
            seqs.iter()
                .map(|seq| to_i64(*seq, "transcript seq"))
                .collect::<Result<Vec<_>>>()?,
        ),
        None => (None, Vec::new()),
    };
    #[allow(clippy::type_complexity)]
    let row: Option<(
        Value,
        Option<Value>,
        Option<Value>,
        Option<Value>,
        Vec<String>,
        Option<Value>,
        bool,
        Option<Value>,
    )> = sqlx::query_as(LOAD_SQL)
        .bind(run)
        .bind(session)
        .bind(approval)
        .bind(probes.approvals)
        .bind(&probes.keys)
        .bind(artifact_path)
        .bind(artifact_hash)
        .bind(probes.session.map(|s| s.as_uuid()))
        .bind(chunk_session)
        .bind(&chunk_seqs)
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| db_error("reading the run", e))?;
    let Some((run, phases, sessions, approvals, keys, artifact, session_recorded, chunks)) = row
    else {
        return Err(target.not_found());
    };
    let last_seq = decode::last_seq(&run)?;
    let stored = Rows {
        run: decode::run(&run)?,
        phases: decode::list("run_phases", &phases.unwrap_or_default(), decode::phase)?,
        sessions: decode::list("sessions", &sessions.unwrap_or_default(), decode::session)?,
        approvals: match &approvals {
            Some(list) => decode::list("approval_requests", list, decode::approval)?,
            None => Vec::new(),
        },
    };
    let stored_chunks = decode::list(
        "transcript_chunks",
        &chunks.unwrap_or_default(),
        decode::chunk,
    )?
    .into_iter()
    .map(|(session, chunk)| ((session, chunk.seq), chunk.text))
    .collect();
    Ok(Tx {
        now: now(),
        last_seq,
        rows: stored.clone(),
        stored,
        probed_keys: probes.keys.iter().cloned().collect(),
        stored_keys: keys.into_iter().collect(),
        events: Vec::new(),
        keys: HashSet::new(),
        stored_artifact: artifact.as_ref().map(decode::artifact).transpose()?,
        artifacts: Vec::new(),
        session_recorded,
        stored_chunks,
        chunks: Vec::new(),
    })
}

const LOAD_SQL: &str = "
SELECT to_jsonb(r) AS run,
       (SELECT jsonb_agg(to_jsonb(p) ORDER BY p.position)
          FROM phaseflow.run_phases p WHERE p.run_id = r.id) AS phases,
       (SELECT jsonb_agg(to_jsonb(s) ORDER BY s.created_seq)
          FROM phaseflow.sessions s WHERE s.run_id = r.id) AS sessions,
       CASE WHEN $4 THEN
           (SELECT coalesce(jsonb_agg(to_jsonb(q) ORDER BY q.created_seq), '[]'::jsonb)
              FROM phaseflow.approval_requests q WHERE q.run_id = r.id)
       END AS approvals,
       ARRAY(SELECT e.key FROM phaseflow.run_events e
              WHERE e.run_id = r.id AND e.key = ANY($5::text[])) AS keys,
       (SELECT to_jsonb(a) FROM phaseflow.artifacts a
         WHERE a.run_id = r.id AND a.path = $6 AND a.hash = $7) AS artifact,
       EXISTS (SELECT 1 FROM phaseflow.sessions s WHERE s.id = $8) AS session_recorded,
       (SELECT jsonb_agg(to_jsonb(c)) FROM phaseflow.transcript_chunks c
         WHERE c.session_id = $9 AND c.seq = ANY($10::int8[])) AS chunks
  FROM phaseflow.runs r
 WHERE r.id = coalesce($1::uuid,
                       (SELECT run_id FROM phaseflow.sessions WHERE id = $2::uuid),
                       (SELECT run_id FROM phaseflow.approval_requests WHERE id = $3::uuid))";

/// What a successful command writes.
pub(crate) struct Changes {
    run: RunId,
    at: OffsetDateTime,
    last_seq: u64,
    stored_run: RunRecord,
    run_row: RunRecord,
    phases: Vec<PhaseRecord>,
    sessions: Vec<SessionRecord>,
    approvals: Vec<ApprovalRecord>,
    events: Vec<(String, EventKind)>,
    artifacts: Vec<ArtifactRecord>,
    chunks: Vec<(SessionId, TranscriptChunk)>,
}

impl Tx {
    /// The changes to write, or `None` when the command wrote nothing.
    pub(crate) fn into_changes(self) -> Option<Changes> {
        let phases = changed(&self.rows.phases, &self.stored.phases);
        let sessions = changed(&self.rows.sessions, &self.stored.sessions);
        let approvals = changed(&self.rows.approvals, &self.stored.approvals);
        let wrote = self.rows.run != self.stored.run
            || !phases.is_empty()
            || !sessions.is_empty()
            || !approvals.is_empty()
            || !self.events.is_empty()
            || !self.artifacts.is_empty()
            || !self.chunks.is_empty();
        wrote.then_some(Changes {
            run: self.rows.run.id,
            at: self.now,
            last_seq: self.last_seq,
            stored_run: self.stored.run,
            run_row: self.rows.run,
            phases,
            sessions,
            approvals,
            events: self.events,
            artifacts: self.artifacts,
            chunks: self.chunks,
        })
    }

    pub(crate) fn run_id(&self) -> RunId {
        self.rows.run.id
    }

    pub(crate) fn run(&self) -> &RunRecord {
        &self.rows.run
    }

    /// Whether the run has the event `key`. Only keys listed in [`Probes::keys`] were read.
    pub(crate) fn has_event(&self, key: &str) -> bool {
        debug_assert!(
            self.probed_keys.contains(key) || self.keys.contains(key),
            "event key `{key}` was not probed"
        );
        self.stored_keys.contains(key) || self.keys.contains(key)
    }

    /// Appends an event unless the run already has its idempotency key (keys this command did
    /// not probe are filtered against `run_events` when the events are inserted).
    pub(crate) fn append(&mut self, kind: EventKind) {
        let key = kind.idempotency_key();
        if !self.stored_keys.contains(&key) && self.keys.insert(key.clone()) {
            self.events.push((key, kind));
        }
    }

    // ---- phases and the rules every phase-work command follows ----

    pub(crate) fn phase_index(&self, key: &PhaseKey) -> Result<usize> {
        self.rows
            .phases
            .iter()
            .position(|phase| &phase.key == key)
            .ok_or_else(|| phase_not_found(self.run_id(), key))
    }

    pub(crate) fn phase(&self, index: usize) -> &PhaseRecord {
        &self.rows.phases[index]
    }

    pub(crate) fn phase_mut(&mut self, index: usize) -> &mut PhaseRecord {
        &mut self.rows.phases[index]
    }

    pub(crate) fn require_phase_work(&self) -> Result<()> {
        let run = self.run();
        if run.state.allows_phase_work() {
            Ok(())
        } else {
            Err(Error::run_state_changed(run.id, run.state))
        }
    }

    pub(crate) fn require_owner(&self, index: usize, owner: EngineId) -> Result<()> {
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
    pub(crate) fn phase_work(&self, work: &PhaseWork) -> Result<usize> {
        let index = self.phase_index(&work.phase)?;
        self.require_phase_work()?;
        self.require_owner(index, work.owner)?;
        Ok(index)
    }

    pub(crate) fn require_attempt(&self, index: usize, attempt: u32) -> Result<()> {
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

    pub(crate) fn require_phase_state(
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
    pub(crate) fn advance(&mut self, index: usize, resumed_by: Option<ApprovalId>) {
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

    pub(crate) fn finish_run(&mut self, state: RunState) {
        let run = &mut self.rows.run;
        run.state = state;
        run.current_phase = None;
        run.paused_from = None;
    }

    /// Aborts the run: the phase in flight fails, every session stops for good.
    pub(crate) fn abort_run(&mut self, reason: String) -> Vec<SessionId> {
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

    pub(crate) fn session_index(&self, id: SessionId) -> Result<usize> {
        self.rows
            .sessions
            .iter()
            .position(|session| session.id == id)
            .ok_or_else(|| session_not_found(id).with_run(self.run_id()))
    }

    pub(crate) fn session_mut(&mut self, index: usize) -> &mut SessionRecord {
        &mut self.rows.sessions[index]
    }

    /// Whether the session id is recorded for any run (the id in [`Probes::session`]).
    pub(crate) fn session_recorded(&self) -> bool {
        self.session_recorded
    }

    /// The session finished the prompt `dedup`: `READY`, `session.idle`.
    pub(crate) fn settle_session(&mut self, index: usize, dedup: &DedupKey) {
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

    pub(crate) fn ready_session(&mut self, index: usize) {
        let session = self.session_mut(index);
        session.state = SessionState::Ready;
        let event = EventKind::SessionReady {
            session: session.id,
            role: session.role.clone(),
            recovery_attempts: session.recovery_attempts,
        };
        self.append(event);
    }

    pub(crate) fn crash_session(&mut self, index: usize) {
        let session = self.session_mut(index);
        session.state = SessionState::Crashed;
        session.recovery_attempts += 1;
        let event = EventKind::SessionCrashed {
            session: session.id,
            recovery_attempts: session.recovery_attempts,
        };
        self.append(event);
    }

    pub(crate) fn fail_session(&mut self, index: usize, phase: &PhaseKey, attempt: u32) {
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
    pub(crate) fn fail_all_sessions(&mut self, phase: &PhaseKey, attempt: u32) -> Vec<SessionId> {
        for index in 0..self.rows.sessions.len() {
            self.fail_session(index, phase, attempt);
        }
        self.rows
            .sessions
            .iter()
            .map(|session| session.id)
            .collect()
    }

    pub(crate) fn refuse_failed_session(&self, index: usize) -> Result<()> {
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
    pub(crate) fn apply_verdict(
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
    /// [`Probes::artifact`] was read.
    pub(crate) fn find_artifact(&self, path: &str, hash: &ContentHash) -> Option<&ArtifactRecord> {
        self.stored_artifact
            .iter()
            .chain(&self.artifacts)
            .find(|artifact| artifact.path == path && &artifact.hash == hash)
    }

    // ---- approval requests ----

    pub(crate) fn approval_by_key(&self, key: &str) -> Option<&ApprovalRecord> {
        self.rows
            .approvals
            .iter()
            .find(|approval| approval.key == key)
    }

    /// Files an approval request idempotently on its key.
    pub(crate) fn file_request(
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

    pub(crate) fn check_request_replay<'r>(
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

    pub(crate) fn approval_requested(&mut self, approval: &ApprovalRecord) {
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
    /// [`Probes::chunks`] were read.
    pub(crate) fn stage_chunks(&mut self, index: usize, chunks: &[TranscriptChunk]) -> Result<()> {
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

impl Changes {
    /// Whether a row other than an event changes (events may all turn out to be recorded).
    fn changes_rows(&self) -> bool {
        !self.phases.is_empty()
            || !self.sessions.is_empty()
            || !self.approvals.is_empty()
            || !self.artifacts.is_empty()
            || !self.chunks.is_empty()
            || self.run_row != self.stored_run
    }
}

/// Step 4: writes the changes in one statement (see [`APPLY_SQL`]). Returns whether anything
/// was written: `false` when every event was already recorded and no row changed (a replay),
/// and the caller rolls back instead of committing.
pub(crate) async fn apply(
    tx: &mut Transaction<'static, Postgres>,
    changes: Changes,
) -> Result<bool> {
    let changes_rows = changes.changes_rows();
    let Changes {
        run,
        at,
        last_seq,
        run_row,
        phases,
        sessions,
        approvals,
        events,
        artifacts,
        chunks,
        ..
    } = changes;
    let mut event_keys = Vec::with_capacity(events.len());
    let mut event_types = Vec::with_capacity(events.len());
    let mut event_phases = Vec::with_capacity(events.len());
    let mut event_payloads = Vec::with_capacity(events.len());
    for (key, kind) in events {
        event_types.push(kind.type_name());
        event_phases.push(kind.phase().map(|phase| phase.as_str().to_owned()));
        event_payloads.push(serde_json::to_value(&kind).map_err(|e| {
            Error::new(
                ErrorCode::InternalStateCorruption,
                format!("cannot serialise event {key}: {e}"),
            )
        })?);
        event_keys.push(key);
    }
    let counter = |value: u64, what: &str| to_i64(value, what);
    let seq_chunks: Vec<i64> = chunks
        .iter()
        .map(|(_, c)| counter(c.seq, "transcript seq"))
        .collect::<Result<_>>()?;
    let session_captures: Vec<i64> = sessions
        .iter()
        .map(|s| counter(s.last_capture_seq, "last_capture_seq"))
        .collect::<Result<_>>()?;
    let artifact_sizes: Vec<i64> = artifacts
        .iter()
        .map(|a| counter(a.size, "artifact size"))
        .collect::<Result<_>>()?;
    let decisions: Vec<Option<Value>> = approvals
        .iter()
        .map(|a| {
            a.decision
                .as_ref()
                .map(|d| serde_json::to_value(&d.decision))
                .transpose()
                .map_err(|e| {
                    Error::new(
                        ErrorCode::InvalidArgument,
                        format!("cannot serialise a decision: {e}"),
                    )
                })
        })
        .collect::<Result<_>>()?;
    let gate_kinds: Vec<&str> = approvals
        .iter()
        .map(|a| match a.kind {
            GateKind::Workflow => "workflow",
            GateKind::Failure => "failure",
        })
        .collect();

    let inserted_events: i64 = sqlx::query_scalar(APPLY_SQL)
        // runs + events
        .bind(run.as_uuid())
        .bind(to_i64(last_seq, "last_seq")?)
        .bind(at)
        .bind(run_row.state.as_str())
        .bind(run_row.paused_from.map(RunState::as_str))
        .bind(run_row.current_phase.as_ref().map(PhaseKey::as_str))
        .bind(&event_keys)
        .bind(&event_types)
        .bind(&event_phases)
        .bind(&event_payloads)
        // run_phases
        .bind(phases.iter().map(|p| p.key.as_str()).collect::<Vec<_>>())
        .bind(phases.iter().map(|p| p.state.as_str()).collect::<Vec<_>>())
        .bind(
            phases
                .iter()
                .map(|p| i64::from(p.attempts))
                .collect::<Vec<_>>(),
        )
        .bind(
            phases
                .iter()
                .map(|p| i64::from(p.round_repairs))
                .collect::<Vec<_>>(),
        )
        .bind(phases.iter().map(|p| p.repair).collect::<Vec<_>>())
        .bind(
            phases
                .iter()
                .map(|p| p.instructions.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            phases
                .iter()
                .map(|p| p.feedback.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            phases
                .iter()
                .map(|p| p.owner.map(|o| o.as_uuid()))
                .collect::<Vec<_>>(),
        )
        // sessions
        .bind(sessions.iter().map(|s| s.id.as_uuid()).collect::<Vec<_>>())
        .bind(sessions.iter().map(|s| s.role.as_str()).collect::<Vec<_>>())
        .bind(
            sessions
                .iter()
                .map(|s| s.state.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            sessions
                .iter()
                .map(|s| s.last_dedup.as_ref().map(DedupKey::as_str))
                .collect::<Vec<_>>(),
        )
        .bind(
            sessions
                .iter()
                .map(|s| s.last_prompt_at)
                .collect::<Vec<_>>(),
        )
        .bind(
            sessions
                .iter()
                .map(|s| i64::from(s.recovery_attempts))
                .collect::<Vec<_>>(),
        )
        .bind(&session_captures)
        // artifacts
        .bind(artifacts.iter().map(|a| a.id.as_uuid()).collect::<Vec<_>>())
        .bind(
            artifacts
                .iter()
                .map(|a| a.phase.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            artifacts
                .iter()
                .map(|a| i64::from(a.attempt))
                .collect::<Vec<_>>(),
        )
        .bind(
            artifacts
                .iter()
                .map(|a| a.path.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            artifacts
                .iter()
                .map(|a| a.hash.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            artifacts
                .iter()
                .map(|a| a.schema_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(&artifact_sizes)
        .bind(
            artifacts
                .iter()
                .map(|a| a.content.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            artifacts
                .iter()
                .map(|a| serde_json::to_value(&a.errors).unwrap_or(Value::Null))
                .collect::<Vec<_>>(),
        )
        .bind(artifacts.iter().map(|a| a.recorded_at).collect::<Vec<_>>())
        // approval_requests
        .bind(approvals.iter().map(|a| a.id.as_uuid()).collect::<Vec<_>>())
        .bind(
            approvals
                .iter()
                .map(|a| a.phase.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            approvals
                .iter()
                .map(|a| i64::from(a.attempt))
                .collect::<Vec<_>>(),
        )
        .bind(
            approvals
                .iter()
                .map(|a| a.gate.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(&gate_kinds)
        .bind(approvals.iter().map(|a| a.key.as_str()).collect::<Vec<_>>())
        .bind(
            approvals
                .iter()
                .map(|a| a.payload.clone())
                .collect::<Vec<_>>(),
        )
        .bind(&decisions)
        .bind(
            approvals
                .iter()
                .map(|a| a.decision.as_ref().map(|d| d.actor.as_str()))
                .collect::<Vec<_>>(),
        )
        .bind(
            approvals
                .iter()
                .map(|a| a.decision.as_ref().and_then(|d| d.note.as_deref()))
                .collect::<Vec<_>>(),
        )
        .bind(
            approvals
                .iter()
                .map(|a| a.decision.as_ref().map(|d| d.at))
                .collect::<Vec<_>>(),
        )
        .bind(approvals.iter().map(|a| a.created_at).collect::<Vec<_>>())
        // transcript_chunks
        .bind(chunks.iter().map(|(s, _)| s.as_uuid()).collect::<Vec<_>>())
        .bind(&seq_chunks)
        .bind(
            chunks
                .iter()
                .map(|(_, c)| c.text.as_str())
                .collect::<Vec<_>>(),
        )
        .fetch_one(&mut **tx)
        .await
        .map_err(|e| db_error("writing the command's rows", e).with_run(run))?;
    Ok(changes_rows || inserted_events > 0)
}

/// Every write of a command in one statement. Data-modifying CTEs all run (whether or not the
/// final SELECT reads them) on the snapshot taken after the run lock was granted; an empty array
/// writes nothing. Rows are written whole: the Rust side decided their new content.
const APPLY_SQL: &str = "
WITH new_events AS (
    SELECT e.ord, e.key, e.type, e.phase, e.payload
      FROM unnest($7::text[], $8::text[], $9::text[], $10::jsonb[])
           WITH ORDINALITY AS e(key, type, phase, payload, ord)
     WHERE NOT EXISTS (SELECT 1 FROM phaseflow.run_events x WHERE x.run_id = $1 AND x.key = e.key)
), numbered AS (
    SELECT row_number() OVER (ORDER BY ord) AS n, key, type, phase, payload FROM new_events
), event_insert AS (
    INSERT INTO phaseflow.run_events (run_id, seq, key, type, phase, payload, at)
    SELECT $1, $2 + n, key, type, phase, payload, $3 FROM numbered
), run_update AS (
    UPDATE phaseflow.runs
       SET state = $4, paused_from = $5, current_phase = $6,
           last_seq = $2 + (SELECT count(*) FROM numbered), updated_at = $3
     WHERE id = $1
), phase_update AS (
    UPDATE phaseflow.run_phases p
       SET state = u.state, attempts = u.attempts, round_repairs = u.round_repairs,
           repair = u.repair, instructions = u.instructions, feedback = u.feedback, owner = u.owner
      FROM unnest($11::text[], $12::text[], $13::int8[], $14::int8[], $15::bool[], $16::text[],
                  $17::text[], $18::uuid[])
           AS u(key, state, attempts, round_repairs, repair, instructions, feedback, owner)
     WHERE p.run_id = $1 AND p.key = u.key
), session_upsert AS (
    INSERT INTO phaseflow.sessions
           (id, run_id, role, state, last_dedup, last_prompt_at, recovery_attempts, last_capture_seq)
    SELECT u.id, $1, u.role, u.state, u.last_dedup, u.last_prompt_at, u.recovery_attempts,
           u.last_capture_seq
      FROM unnest($19::uuid[], $20::text[], $21::text[], $22::text[], $23::timestamptz[],
                  $24::int8[], $25::int8[])
           WITH ORDINALITY AS u(id, role, state, last_dedup, last_prompt_at, recovery_attempts,
                                last_capture_seq, ord)
     ORDER BY u.ord
    ON CONFLICT (id) DO UPDATE
       SET state = excluded.state, last_dedup = excluded.last_dedup,
           last_prompt_at = excluded.last_prompt_at,
           recovery_attempts = excluded.recovery_attempts,
           last_capture_seq = excluded.last_capture_seq
), artifact_insert AS (
    INSERT INTO phaseflow.artifacts
           (id, run_id, phase, attempt, path, hash, schema_id, size, content, errors, recorded_at)
    SELECT u.id, $1, u.phase, u.attempt, u.path, u.hash, u.schema_id, u.size, u.content, u.errors,
           u.recorded_at
      FROM unnest($26::uuid[], $27::text[], $28::int8[], $29::text[], $30::text[], $31::text[],
                  $32::int8[], $33::jsonb[], $34::jsonb[], $35::timestamptz[])
           WITH ORDINALITY AS u(id, phase, attempt, path, hash, schema_id, size, content, errors,
                                recorded_at, ord)
     ORDER BY u.ord
    ON CONFLICT (run_id, path, hash) DO NOTHING
), approval_upsert AS (
    INSERT INTO phaseflow.approval_requests
           (id, run_id, phase, attempt, gate, kind, key, payload, decision, decided_by,
            decision_note, decided_at, created_at)
    SELECT u.id, $1, u.phase, u.attempt, u.gate, u.kind, u.key, u.payload, u.decision,
           u.decided_by, u.decision_note, u.decided_at, u.created_at
      FROM unnest($36::uuid[], $37::text[], $38::int8[], $39::text[], $40::text[], $41::text[],
                  $42::jsonb[], $43::jsonb[], $44::text[], $45::text[], $46::timestamptz[],
                  $47::timestamptz[])
           WITH ORDINALITY AS u(id, phase, attempt, gate, kind, key, payload, decision, decided_by,
                                decision_note, decided_at, created_at, ord)
     ORDER BY u.ord
    ON CONFLICT (id) DO UPDATE
       SET decision = excluded.decision, decided_by = excluded.decided_by,
           decision_note = excluded.decision_note, decided_at = excluded.decided_at
), chunk_insert AS (
    INSERT INTO phaseflow.transcript_chunks (session_id, seq, text)
    SELECT * FROM unnest($48::uuid[], $49::int8[], $50::text[])
    ON CONFLICT (session_id, seq) DO NOTHING
)
SELECT count(*) FROM numbered";

pub(crate) fn run_not_found(run: RunId) -> Error {
    Error::new(ErrorCode::RunNotFound, format!("no run {run}"))
        .with_run(run)
        .with_hint("check the run id; runs exist once create_run returned")
}

pub(crate) fn phase_not_found(run: RunId, phase: &PhaseKey) -> Error {
    Error::new(
        ErrorCode::PhaseNotFound,
        format!("run {run} has no phase `{phase}`"),
    )
    .in_phase(run, phase)
    .with_hint("check that the workflow passed to the engine is the one the run was created with")
}

pub(crate) fn session_not_found(session: SessionId) -> Error {
    Error::new(
        ErrorCode::SessionNotFound,
        format!("the store has no session {session}"),
    )
    .with_hint(
        "a session is recorded by mark_busy with origin `Started`; record it before using it",
    )
}

pub(crate) fn approval_not_found(request: ApprovalId) -> Error {
    Error::new(
        ErrorCode::ApprovalNotFound,
        format!("no approval request {request}"),
    )
    .with_hint("list the run's pending requests and decide one of those")
}
