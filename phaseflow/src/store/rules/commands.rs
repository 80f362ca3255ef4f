//! The rules of each store command, applied to a [`Tx`] on the run's snapshot, in the order
//! that fixes which events a command appends and which error it fails with first.

use super::session_not_found;
use super::tx::Tx;
use crate::error::{Error, ErrorCode, Result};
use crate::event::{Decision, EventKind, GateKind, PromptKind};
use crate::ids::SessionId;
use crate::state::{PhaseState, RunState, SessionState};
use crate::store::{
    ApprovalRecord, ArtifactRecord, BeginAttempt, BeginOutcome, Decide, DecisionRecord,
    FinishPhase, Finished, MarkBusy, OperatorAction, PhaseEnd, PhaseRecord, PhaseWork,
    RecordPrompt, RecordVerdict, SessionEvent, SessionOrigin, SessionRecord, TranscriptChunk,
};

pub(super) fn begin_attempt(tx: &mut Tx, cmd: BeginAttempt) -> Result<BeginOutcome> {
    let index = tx.phase_index(&cmd.work.phase)?;
    tx.require_phase_work()?;
    let phase = tx.phase(index).clone();
    if cmd.repair {
        if !matches!(
            phase.state,
            PhaseState::Validating | PhaseState::AwaitingArtifact
        ) {
            return Ok(BeginOutcome::NotStartable(phase));
        }
        tx.require_owner(index, cmd.work.owner)?;
    } else {
        let current = tx.run().current_phase.as_ref() == Some(&phase.key);
        if phase.state != PhaseState::Pending || !current {
            return Ok(BeginOutcome::NotStartable(phase));
        }
        if tx.run().state == RunState::Planning {
            tx.rows.run.state = RunState::Executing;
            tx.append(EventKind::RunStarted);
        }
    }
    let phase = tx.phase_mut(index);
    phase.state = PhaseState::Running;
    phase.attempts += 1;
    phase.repair = cmd.repair;
    phase.instructions = Some(cmd.instructions);
    if cmd.repair {
        phase.round_repairs += 1;
    } else {
        phase.round_repairs = 0;
        phase.feedback = None;
        phase.owner = Some(cmd.work.owner);
    }
    let phase = phase.clone();
    tx.append(EventKind::PhaseStarted {
        phase: phase.key.clone(),
        attempt: phase.attempts,
        repair: cmd.repair,
        reason: cmd.reason,
    });
    Ok(BeginOutcome::Started(phase))
}

pub(super) fn claim_phase(tx: &mut Tx, work: PhaseWork) -> Result<PhaseRecord> {
    let index = tx.phase_index(&work.phase)?;
    tx.require_phase_work()?;
    let phase = tx.phase_mut(index);
    phase.owner = Some(work.owner);
    Ok(phase.clone())
}

pub(super) fn mark_busy(tx: &mut Tx, cmd: MarkBusy) -> Result<SessionRecord> {
    let index = tx.phase_work(&cmd.work)?;
    tx.require_attempt(index, cmd.attempt)?;
    let by_role = tx
        .rows
        .sessions
        .iter()
        .position(|session| session.role == cmd.role);
    if let Some(at) = by_role {
        let session = &tx.rows.sessions[at];
        if session.id == cmd.session
            && session.state == SessionState::Busy
            && session.last_dedup.as_ref() == Some(&cmd.dedup)
        {
            // Already marked with this very prompt: a replay, nothing to write.
            return Ok(session.clone());
        }
    }
    tx.require_phase_state(index, &[PhaseState::Running], "mark a session busy")?;
    let at = match (by_role, cmd.origin) {
        (Some(at), _) if tx.rows.sessions[at].id != cmd.session => {
            let stored = &tx.rows.sessions[at];
            return Err(Error::corruption(format!(
                "role `{}` already has session {}, not {}",
                cmd.role, stored.id, cmd.session
            ))
            .in_phase(tx.run_id(), &cmd.work.phase));
        }
        (Some(at), origin) => {
            tx.refuse_failed_session(at)?;
            if origin == SessionOrigin::Resumed {
                tx.ready_session(at);
            }
            at
        }
        (None, SessionOrigin::Started) => {
            if tx.session_recorded() {
                return Err(Error::corruption(format!(
                    "session {} is already recorded for another run or role",
                    cmd.session
                ))
                .in_phase(tx.run_id(), &cmd.work.phase));
            }
            tx.rows.sessions.push(SessionRecord {
                id: cmd.session,
                run: tx.run_id(),
                role: cmd.role.clone(),
                state: SessionState::Created,
                last_dedup: None,
                last_prompt_at: None,
                recovery_attempts: 0,
                last_capture_seq: 0,
            });
            tx.append(EventKind::SessionCreated {
                session: cmd.session,
                role: cmd.role.clone(),
            });
            let at = tx.rows.sessions.len() - 1;
            tx.ready_session(at);
            at
        }
        (None, SessionOrigin::Resumed | SessionOrigin::Continuing) => {
            return Err(session_not_found(cmd.session).in_phase(tx.run_id(), &cmd.work.phase));
        }
    };
    let now = tx.now;
    let session = tx.session_mut(at);
    session.state = SessionState::Busy;
    session.last_dedup = Some(cmd.dedup.clone());
    session.last_prompt_at = Some(now);
    let session = session.clone();
    tx.append(EventKind::SessionBusy {
        session: session.id,
        dedup: cmd.dedup,
    });
    Ok(session)
}

pub(super) fn record_prompt(tx: &mut Tx, cmd: RecordPrompt) -> Result<()> {
    let index = tx.phase_work(&cmd.work)?;
    tx.require_attempt(index, cmd.attempt)?;
    tx.require_phase_state(
        index,
        &[PhaseState::Running, PhaseState::AwaitingArtifact],
        "record a prompt",
    )?;
    let at = tx.session_index(cmd.session)?;
    if tx.rows.sessions[at].last_dedup.as_ref() != Some(&cmd.dedup) {
        return Err(Error::new(
            ErrorCode::PhaseStateMismatch,
            format!(
                "session {} was not marked busy with prompt {}",
                cmd.session, cmd.dedup
            ),
        )
        .in_phase(tx.run_id(), &cmd.work.phase)
        .with_hint("mark the session busy with the prompt before sending it"));
    }
    let phase = cmd.work.phase;
    tx.append(match cmd.kind {
        PromptKind::Initial => EventKind::PromptSent {
            phase: phase.clone(),
            attempt: cmd.attempt,
            session: cmd.session,
            dedup: cmd.dedup,
        },
        PromptKind::Repair => EventKind::PromptRepaired {
            phase: phase.clone(),
            attempt: cmd.attempt,
            session: cmd.session,
            dedup: cmd.dedup,
        },
    });
    tx.append(EventKind::ArtifactExpected {
        phase,
        attempt: cmd.attempt,
        path: cmd.artifact_path,
        schema: cmd.schema_id,
    });
    tx.phase_mut(index).state = PhaseState::AwaitingArtifact;
    Ok(())
}

pub(super) fn timeout_event(work: &PhaseWork, attempt: u32, path: String) -> EventKind {
    EventKind::ArtifactTimeout {
        phase: work.phase.clone(),
        attempt,
        path,
    }
}

pub(super) fn record_session_event(
    tx: &mut Tx,
    work: PhaseWork,
    session: SessionId,
    event: SessionEvent,
) -> Result<SessionRecord> {
    let index = tx.phase_work(&work)?;
    let at = tx.session_index(session)?;
    match event {
        SessionEvent::ArtifactTimeout { attempt, path } => {
            tx.require_attempt(index, attempt)?;
            let timeout = timeout_event(&work, attempt, path);
            if !tx.has_event(&timeout.idempotency_key()) {
                tx.require_phase_state(
                    index,
                    &[PhaseState::AwaitingArtifact],
                    "record an artifact timeout",
                )?;
                tx.session_mut(at).state = SessionState::ArtifactTimeout;
                tx.append(timeout);
            }
        }
        SessionEvent::Recovered => match tx.rows.sessions[at].state {
            // Recovered already: a replay.
            SessionState::Ready => {}
            SessionState::ArtifactTimeout
            | SessionState::Resuming
            | SessionState::Rebootstrapped
            | SessionState::Crashed => {
                let record = tx.session_mut(at);
                record.state = SessionState::Ready;
                record.recovery_attempts += 1;
                let recovered = EventKind::SessionRecovered {
                    session,
                    recovery_attempts: record.recovery_attempts,
                };
                tx.append(recovered);
            }
            SessionState::FailedNeedsHuman => tx.refuse_failed_session(at)?,
            state => {
                return Err(Error::new(
                    ErrorCode::PhaseStateMismatch,
                    format!(
                        "session {session} is {state}; only a timed-out or crashed session recovers"
                    ),
                )
                .in_phase(tx.run_id(), &work.phase));
            }
        },
    }
    Ok(tx.rows.sessions[at].clone())
}

pub(super) fn record_verdict(tx: &mut Tx, cmd: RecordVerdict) -> Result<ArtifactRecord> {
    let index = tx.phase_work(&cmd.work)?;
    tx.require_attempt(index, cmd.attempt)?;
    tx.require_phase_state(
        index,
        &[PhaseState::AwaitingArtifact, PhaseState::Validating],
        "record an artifact verdict",
    )?;
    let at = tx.session_index(cmd.session)?;
    let record = tx.apply_verdict(index, cmd.attempt, &cmd.artifact)?;
    tx.settle_session(at, &cmd.dedup);
    Ok(record)
}

pub(super) fn finish_phase(tx: &mut Tx, cmd: FinishPhase) -> Result<Finished> {
    let index = tx.phase_index(&cmd.work.phase)?;
    if let Some(done) = finished_before(tx, index, &cmd)? {
        return Ok(done);
    }
    let failing = matches!(cmd.end, PhaseEnd::Fail { .. });
    if failing && tx.run().state.is_terminal() {
        return Ok(Finished {
            run: tx.run().clone(),
            approval: None,
            artifact: None,
            dispose: Vec::new(),
        });
    }
    if !failing {
        tx.require_phase_work()?;
    }
    tx.require_owner(index, cmd.work.owner)?;
    tx.require_attempt(index, cmd.attempt)?;
    let doing = match &cmd.end {
        PhaseEnd::Complete => "complete the phase",
        PhaseEnd::AwaitApproval { .. } => "request approval",
        PhaseEnd::HumanGate { .. } => "raise a human gate",
        PhaseEnd::Fail { .. } => "fail the phase",
    };
    match &cmd.end {
        PhaseEnd::Complete | PhaseEnd::AwaitApproval { .. } => {
            if cmd
                .verdict
                .as_ref()
                .is_some_and(|verdict| !verdict.is_valid())
            {
                return Err(Error::new(
                    ErrorCode::InvalidArgument,
                    format!("cannot {doing} with an invalid artifact"),
                )
                .in_phase(tx.run_id(), &cmd.work.phase)
                .with_hint("record the verdict with record_verdict and repair, or end the phase with a human gate"));
            }
            let allowed: &[PhaseState] = if cmd.verdict.is_some() {
                &[PhaseState::AwaitingArtifact, PhaseState::Validating]
            } else {
                &[PhaseState::Validating]
            };
            tx.require_phase_state(index, allowed, doing)?;
        }
        PhaseEnd::HumanGate { .. } => tx.require_phase_state(
            index,
            &[
                PhaseState::Running,
                PhaseState::AwaitingArtifact,
                PhaseState::Validating,
            ],
            doing,
        )?,
        PhaseEnd::Fail { .. } => {}
    }
    let session = match &cmd.session {
        Some((id, dedup)) => Some((tx.session_index(*id)?, dedup.clone())),
        None => None,
    };
    if let Some((at, _)) = session {
        tx.stage_chunks(at, &cmd.transcript)?;
    } else if !cmd.transcript.is_empty() {
        return Err(Error::new(
            ErrorCode::InvalidArgument,
            "transcript chunks need the session they were captured from",
        )
        .in_phase(tx.run_id(), &cmd.work.phase));
    }
    let artifact = match &cmd.verdict {
        Some(verdict) => Some(tx.apply_verdict(index, cmd.attempt, verdict)?),
        None => None,
    };
    let phase = cmd.work.phase;
    let attempt = cmd.attempt;
    let settle = |tx: &mut Tx| {
        if let Some((at, Some(dedup))) = &session {
            tx.settle_session(*at, dedup);
        }
    };
    let mut approval = None;
    let mut dispose = Vec::new();
    match cmd.end {
        PhaseEnd::Complete => {
            settle(tx);
            tx.phase_mut(index).state = PhaseState::Completed;
            tx.append(EventKind::PhaseCompleted { phase, attempt });
            if let Some((at, _)) = session {
                tx.ready_session(at);
            }
            tx.advance(index, None);
        }
        PhaseEnd::AwaitApproval { gate, payload } => {
            settle(tx);
            let request = tx.file_request(index, attempt, &gate, GateKind::Workflow, &payload)?;
            tx.phase_mut(index).state = PhaseState::AwaitingApproval;
            tx.rows.run.state = RunState::AwaitingApproval;
            if let Some((at, _)) = session {
                tx.session_mut(at).state = SessionState::WaitingForApproval;
            }
            tx.approval_requested(&request);
            approval = Some(request);
        }
        PhaseEnd::HumanGate {
            gate,
            payload,
            crash_session,
        } => {
            if !crash_session {
                settle(tx);
            }
            let request = tx.file_request(index, attempt, &gate, GateKind::Failure, &payload)?;
            tx.phase_mut(index).state = PhaseState::Failed;
            tx.append(EventKind::PhaseFailed {
                phase: phase.clone(),
                attempt,
                reason: gate.to_string(),
            });
            let from = tx.run().state;
            tx.rows.run.state = RunState::Paused;
            tx.rows.run.paused_from = Some(from);
            tx.append(EventKind::RunPaused {
                cause: format!("human_required:{gate}:{phase}:{attempt}"),
                paused_from: from,
            });
            if let Some((at, _)) = session {
                if crash_session {
                    tx.crash_session(at);
                }
                tx.fail_session(at, &phase, attempt);
            }
            tx.approval_requested(&request);
            approval = Some(request);
        }
        PhaseEnd::Fail { reason } => {
            tx.phase_mut(index).state = PhaseState::Failed;
            tx.append(EventKind::PhaseFailed {
                phase: phase.clone(),
                attempt,
                reason: reason.clone(),
            });
            tx.finish_run(RunState::Failed);
            tx.append(EventKind::RunFailed { reason });
            dispose = tx.fail_all_sessions(&phase, attempt);
        }
    }
    Ok(Finished {
        run: tx.run().clone(),
        approval,
        artifact,
        dispose,
    })
}

/// The stored outcome of a [`FinishPhase`] that was already applied, if it was.
fn finished_before(tx: &Tx, index: usize, cmd: &FinishPhase) -> Result<Option<Finished>> {
    let phase = &tx.phase(index).key;
    let approval = match &cmd.end {
        PhaseEnd::Complete => {
            let completed = EventKind::PhaseCompleted {
                phase: phase.clone(),
                attempt: cmd.attempt,
            };
            if !tx.has_event(&completed.idempotency_key()) {
                return Ok(None);
            }
            None
        }
        PhaseEnd::AwaitApproval { gate, payload } | PhaseEnd::HumanGate { gate, payload, .. } => {
            let kind = match cmd.end {
                PhaseEnd::AwaitApproval { .. } => GateKind::Workflow,
                _ => GateKind::Failure,
            };
            let key = ApprovalRecord::key_for(tx.run_id(), gate, phase, cmd.attempt);
            let Some(stored) = tx.approval_by_key(&key) else {
                return Ok(None);
            };
            Some(
                tx.check_request_replay(stored, gate, kind, payload)?
                    .clone(),
            )
        }
        PhaseEnd::Fail { .. } => return Ok(None),
    };
    let artifact = match &cmd.verdict {
        Some(verdict) => match tx.find_artifact(&verdict.path, &verdict.hash) {
            Some(stored) if stored.matches(phase, verdict) => Some(stored.clone()),
            _ => {
                return Err(Error::corruption(format!(
                    "attempt {} of the phase already ended without this verdict ({})",
                    cmd.attempt, verdict.hash
                ))
                .in_phase(tx.run_id(), phase));
            }
        },
        None => None,
    };
    Ok(Some(Finished {
        run: tx.run().clone(),
        approval,
        artifact,
        dispose: Vec::new(),
    }))
}

/// The decisions a gate of that kind takes, for error hints.
fn allowed_decisions(kind: GateKind) -> &'static str {
    match kind {
        GateKind::Workflow => "approve, rework or reject",
        GateKind::Failure => "retry or abort",
    }
}

pub(super) fn decide(tx: &mut Tx, cmd: Decide) -> Result<Finished> {
    let at = tx
        .rows
        .approvals
        .iter()
        .position(|approval| approval.id == cmd.request)
        .ok_or_else(|| {
            Error::corruption(format!(
                "approval request {} is indexed but missing",
                cmd.request
            ))
        })?;
    let request = tx.rows.approvals[at].clone();
    if let Some(done) = &request.decision {
        if done.decision != cmd.decision {
            return Err(Error::new(
                ErrorCode::ApprovalConflict,
                format!(
                    "approval request {} was already decided `{}` by {}; `{}` conflicts",
                    request.key,
                    done.decision.as_str(),
                    done.actor,
                    cmd.decision.as_str()
                ),
            )
            .in_phase(request.run, &request.phase)
            .with_hint("a decision is final; read the run's state instead of deciding again"));
        }
        let dispose = match (done.decision.clone(), tx.run().state) {
            (Decision::Reject | Decision::Abort, RunState::Aborted) => {
                tx.rows.sessions.iter().map(|session| session.id).collect()
            }
            _ => Vec::new(),
        };
        return Ok(Finished {
            run: tx.run().clone(),
            approval: Some(request),
            artifact: None,
            dispose,
        });
    }
    if !cmd.decision.fits(request.kind) {
        return Err(Error::new(
            ErrorCode::ApprovalConflict,
            format!(
                "`{}` does not apply to gate `{}`",
                cmd.decision.as_str(),
                request.gate
            ),
        )
        .in_phase(request.run, &request.phase)
        .with_hint(format!(
            "a {} gate takes {}",
            match request.kind {
                GateKind::Workflow => "workflow",
                GateKind::Failure => "failure",
            },
            allowed_decisions(request.kind)
        )));
    }
    let (run_waits_in, phase_waits_in) = match request.kind {
        GateKind::Workflow => (RunState::AwaitingApproval, PhaseState::AwaitingApproval),
        GateKind::Failure => (RunState::Paused, PhaseState::Failed),
    };
    let state = tx.run().state;
    if state != run_waits_in {
        return Err(Error::run_state_changed(request.run, state).with_phase(request.phase));
    }
    let index = tx.phase_index(&request.phase)?;
    let phase = tx.phase(index);
    if tx.run().current_phase.as_ref() != Some(&phase.key)
        || phase.state != phase_waits_in
        || phase.attempts != request.attempt
    {
        return Err(Error::new(
            ErrorCode::ApprovalConflict,
            format!(
                "approval request {} is superseded: the phase is {} at attempt {}",
                request.key, phase.state, phase.attempts
            ),
        )
        .in_phase(request.run, &request.phase)
        .with_hint("decide the run's newest pending request instead"));
    }
    let decided = DecisionRecord {
        decision: cmd.decision.clone(),
        actor: cmd.actor.clone(),
        note: cmd.note,
        at: tx.now,
    };
    tx.rows.approvals[at].decision = Some(decided);
    tx.append(EventKind::ApprovalDecided {
        request: request.id,
        key: request.key.clone(),
        decision: cmd.decision.clone(),
        actor: cmd.actor,
    });
    let waiting: Vec<usize> = (0..tx.rows.sessions.len())
        .filter(|&i| tx.rows.sessions[i].state == SessionState::WaitingForApproval)
        .collect();
    let mut dispose = Vec::new();
    match cmd.decision {
        Decision::Approve => {
            tx.phase_mut(index).state = PhaseState::Completed;
            tx.append(EventKind::PhaseCompleted {
                phase: request.phase.clone(),
                attempt: request.attempt,
            });
            for at in waiting {
                tx.ready_session(at);
            }
            tx.advance(index, Some(request.id));
        }
        Decision::Rework { feedback } => {
            let phase = tx.phase_mut(index);
            phase.state = PhaseState::Pending;
            phase.feedback = Some(feedback);
            for at in waiting {
                tx.ready_session(at);
            }
            tx.rows.run.state = RunState::Executing;
            tx.append(EventKind::RunResumed {
                request: request.id,
                state: RunState::Executing,
            });
        }
        Decision::Retry => {
            let Some(back_to) = tx.run().paused_from else {
                return Err(Error::corruption(format!(
                    "run {} is paused without a paused_from state",
                    request.run
                ))
                .with_run(request.run));
            };
            tx.phase_mut(index).state = PhaseState::Pending;
            let failed: Vec<usize> = (0..tx.rows.sessions.len())
                .filter(|&i| tx.rows.sessions[i].state == SessionState::FailedNeedsHuman)
                .collect();
            for at in failed {
                tx.crash_session(at);
            }
            tx.rows.run.state = back_to;
            tx.rows.run.paused_from = None;
            tx.append(EventKind::RunResumed {
                request: request.id,
                state: back_to,
            });
        }
        Decision::Reject | Decision::Abort => {
            let reason = format!("{}:{}", cmd.decision.as_str(), request.gate);
            dispose = tx.abort_run(reason);
        }
    }
    Ok(Finished {
        run: tx.run().clone(),
        approval: Some(tx.rows.approvals[at].clone()),
        artifact: None,
        dispose,
    })
}

pub(super) fn operate(tx: &mut Tx, action: OperatorAction) -> Result<Finished> {
    let run = tx.run_id();
    let state = tx.run().state;
    if state.is_terminal() {
        return Err(Error::run_state_changed(run, state));
    }
    let dispose = match action {
        OperatorAction::Pause { reason } => {
            if state != RunState::Paused {
                tx.rows.run.state = RunState::Paused;
                tx.rows.run.paused_from = Some(state);
                tx.append(EventKind::RunPaused {
                    cause: reason,
                    paused_from: state,
                });
            }
            Vec::new()
        }
        OperatorAction::Abort { reason } => tx.abort_run(reason),
    };
    Ok(Finished {
        run: tx.run().clone(),
        approval: None,
        artifact: None,
        dispose,
    })
}

pub(super) fn append_transcript(
    tx: &mut Tx,
    session: SessionId,
    chunks: &[TranscriptChunk],
) -> Result<()> {
    let at = tx.session_index(session)?;
    tx.stage_chunks(at, chunks)
}
