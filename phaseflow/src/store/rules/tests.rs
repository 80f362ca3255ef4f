//! What the conformance suite cannot see through a store: the shape of a command's [`Changes`]
//! and how the rules use the [`Snapshot`] they are given.

use super::*;
use crate::event::PromptKind;
use crate::ids::{DedupKey, EngineId, RoleKey};
use crate::state::SessionState;
use crate::store::SessionOrigin;

/// A stored two-phase run whose first phase is `running`, claimed by `owner`.
struct Fixture {
    snapshot: Snapshot,
    work: PhaseWork,
}

fn at(second: i64) -> OffsetDateTime {
    OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(second)
}

/// Folds a command's changes into the snapshot, as a store persisting them would.
fn persist(snapshot: &mut Snapshot, changes: Changes) {
    snapshot.run = changes.run;
    for phase in changes.phases {
        let at = snapshot.phases.iter().position(|p| p.key == phase.key);
        snapshot.phases[at.expect("only stored phases change")] = phase;
    }
    for session in changes.sessions {
        match snapshot.sessions.iter().position(|s| s.id == session.id) {
            Some(at) => snapshot.sessions[at] = session,
            None => snapshot.sessions.push(session),
        }
    }
}

fn running() -> Fixture {
    let new = NewRun {
        id: RunId::new(),
        workflow: "feature".into(),
        subject: "TICKET-42".into(),
        worktree: "/work/tree".into(),
        phases: vec![PhaseKey::new("plan"), PhaseKey::new("build")],
    };
    let created = create_run(&new, at(0)).unwrap();
    let mut snapshot = Snapshot::new(created.run, created.phases, at(1));
    let work = PhaseWork {
        run: new.id,
        phase: PhaseKey::new("plan"),
        owner: EngineId::new(),
    };
    let begin = BeginAttempt {
        work: work.clone(),
        repair: false,
        reason: "initial".into(),
        instructions: "Write the plan.".into(),
    };
    let changes = begin_attempt(snapshot.clone(), begin).unwrap().changes;
    persist(&mut snapshot, changes.unwrap());
    Fixture { snapshot, work }
}

fn busy(work: &PhaseWork, origin: SessionOrigin, session: SessionId) -> MarkBusy {
    MarkBusy {
        work: work.clone(),
        attempt: 1,
        session,
        role: RoleKey::new("planner"),
        origin,
        dedup: DedupKey::from_hex("ab12"),
    }
}

#[test]
fn timestamps_come_from_the_snapshot_clock() {
    let Fixture { mut snapshot, work } = running();
    snapshot.now = at(7);
    let cmd = busy(&work, SessionOrigin::Started, SessionId::new());
    let applied = mark_busy(snapshot, cmd).unwrap();
    assert_eq!(applied.output.last_prompt_at, Some(at(7)));
    assert_eq!(applied.changes.unwrap().at, at(7));
}

#[test]
fn changes_name_only_the_rows_that_changed() {
    let Fixture { mut snapshot, work } = running();
    let session = SessionId::new();
    let started = mark_busy(
        snapshot.clone(),
        busy(&work, SessionOrigin::Started, session),
    )
    .unwrap();
    let changes = started.changes.unwrap();
    // A new session, nothing else: the run and both phases are as they were.
    assert!(!changes.run_changed);
    assert!(changes.phases.is_empty());
    assert_eq!(changes.sessions.len(), 1);
    assert_eq!(changes.sessions[0].state, SessionState::Busy);
    persist(&mut snapshot, changes);

    let prompt = RecordPrompt {
        work: work.clone(),
        attempt: 1,
        session,
        dedup: DedupKey::from_hex("ab12"),
        kind: PromptKind::Initial,
        artifact_path: "/work/tree/plan.json".into(),
        schema_id: "plan".into(),
    };
    let changes = record_prompt(snapshot, prompt).unwrap().changes.unwrap();
    // Only the phase that moved to `awaiting_artifact`; the busy session is not re-written.
    assert!(!changes.run_changed);
    assert_eq!(changes.phases.len(), 1);
    assert_eq!(changes.phases[0].key, work.phase);
    assert_eq!(changes.phases[0].state, PhaseState::AwaitingArtifact);
    assert!(changes.sessions.is_empty());
}

#[test]
fn a_replay_leaves_recorded_events_it_did_not_ask_about_for_the_store_to_skip() {
    let Fixture { mut snapshot, work } = running();
    let session = SessionId::new();
    let started = mark_busy(
        snapshot.clone(),
        busy(&work, SessionOrigin::Started, session),
    )
    .unwrap();
    persist(&mut snapshot, started.changes.unwrap());
    let prompt = RecordPrompt {
        work,
        attempt: 1,
        session,
        dedup: DedupKey::from_hex("ab12"),
        kind: PromptKind::Initial,
        artifact_path: "/work/tree/plan.json".into(),
        schema_id: "plan".into(),
    };
    let first = record_prompt(snapshot.clone(), prompt.clone()).unwrap();
    persist(&mut snapshot, first.changes.unwrap());

    // `record_prompt` needs no event lookups, so its replay rebuilds the same two events and
    // changes no row: the store finds both keys recorded and writes nothing.
    let replay = record_prompt(snapshot, prompt).unwrap().changes.unwrap();
    assert!(!replay.changes_rows());
    let kinds: Vec<&str> = replay.events.iter().map(|(_, k)| k.type_name()).collect();
    assert_eq!(kinds, ["prompt.sent", "artifact.expected"]);
}

#[test]
fn an_event_lookup_the_needs_named_decides_the_replay() {
    let Fixture { mut snapshot, work } = running();
    let timeout = SessionEvent::ArtifactTimeout {
        attempt: 1,
        path: "/work/tree/plan.json".into(),
    };
    let session = SessionId::new();
    let started = mark_busy(
        snapshot.clone(),
        busy(&work, SessionOrigin::Started, session),
    )
    .unwrap();
    persist(&mut snapshot, started.changes.unwrap());
    // The phase is `running`, not `awaiting_artifact`: a first timeout is refused…
    let needs = Needs::session_event(&work, &timeout);
    snapshot.event_keys = needs
        .event_keys
        .iter()
        .map(|k| (k.clone(), false))
        .collect();
    let refused = record_session_event(snapshot.clone(), work.clone(), session, timeout.clone());
    assert_eq!(refused.unwrap_err().code(), ErrorCode::PhaseStateMismatch);
    // …while one the snapshot says is recorded is a replay that writes nothing.
    snapshot.event_keys = needs.event_keys.iter().map(|k| (k.clone(), true)).collect();
    let replay = record_session_event(snapshot, work, session, timeout).unwrap();
    assert_eq!(replay.changes, None);
}

#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "was not in the command's needs")]
fn rules_asking_about_an_event_the_snapshot_lacks_fail_loudly_in_debug_builds() {
    let Fixture { mut snapshot, work } = running();
    let session = SessionId::new();
    let started = mark_busy(
        snapshot.clone(),
        busy(&work, SessionOrigin::Started, session),
    )
    .unwrap();
    persist(&mut snapshot, started.changes.unwrap());
    let timeout = SessionEvent::ArtifactTimeout {
        attempt: 1,
        path: "/work/tree/plan.json".into(),
    };
    // `snapshot.event_keys` lacks what `Needs::session_event` names.
    let _ = record_session_event(snapshot, work, session, timeout);
}
