//! The store conformance suite on [`MemoryStore`], plus what only the memory store can show:
//! its commit counter and its behaviour under concurrent commands.

use std::sync::Arc;

use phaseflow::event::PromptKind;
use phaseflow::ids::{ContentHash, DedupKey, EngineId, PhaseKey, RoleKey, RunId, SessionId};
use phaseflow::state::RunState;
use phaseflow::store::{
    BeginAttempt, BeginOutcome, FinishPhase, MarkBusy, NewArtifact, NewRun, PhaseEnd, PhaseWork,
    RecordPrompt, SessionOrigin, Store, TranscriptChunk,
};
use phaseflow_fake::memory::MemoryStore;

mod conformance {
    phaseflow_fake::store_conformance_tests!(phaseflow_fake::memory::MemoryStore::new());
}

#[tokio::test]
async fn run_all_passes_on_memory_store() {
    phaseflow_fake::conformance::run_all(|| async { MemoryStore::new() }).await;
}

#[test]
fn every_case_is_listed_once() {
    let names: Vec<&str> = phaseflow_fake::conformance::CASES
        .iter()
        .map(|(name, _)| *name)
        .collect();
    let mut unique = names.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), names.len());
    assert!(names.iter().all(|name| name.starts_with("case_")));
}

fn new_run(phases: &[&str]) -> NewRun {
    NewRun {
        id: RunId::new(),
        workflow: "feature".into(),
        subject: "TICKET-42".into(),
        worktree: "/work/tree".into(),
        phases: phases.iter().map(|key| PhaseKey::new(*key)).collect(),
    }
}

/// The four commands of a happy-path phase, as the engine issues them.
async fn happy_phase(store: &dyn Store, run: RunId, phase: &str, owner: EngineId, first: bool) {
    let work = PhaseWork {
        run,
        phase: PhaseKey::new(phase),
        owner,
    };
    let begin = BeginAttempt {
        work: work.clone(),
        repair: false,
        reason: "initial".into(),
        instructions: format!("write {phase}"),
    };
    let BeginOutcome::Started(started) = store.begin_attempt(begin).await.unwrap() else {
        panic!("the phase should start");
    };
    let (session, captured) = match store.session(run, &RoleKey::new("agent")).await.unwrap() {
        Some(session) => (session.id, session.last_capture_seq),
        None => (SessionId::new(), 0),
    };
    let dedup = DedupKey::from_hex(format!("{phase}-{}", started.attempts));
    let busy = MarkBusy {
        work: work.clone(),
        attempt: started.attempts,
        session,
        role: RoleKey::new("agent"),
        origin: if first {
            SessionOrigin::Started
        } else {
            SessionOrigin::Resumed
        },
        dedup: dedup.clone(),
    };
    store.mark_busy(busy).await.unwrap();
    let prompt = RecordPrompt {
        work: work.clone(),
        attempt: started.attempts,
        session,
        dedup: dedup.clone(),
        kind: PromptKind::Initial,
        artifact_path: format!("/work/tree/{phase}.json"),
        schema_id: format!("{phase}.schema.json"),
    };
    store.record_prompt(prompt).await.unwrap();
    let body = format!(r#"{{"phase":"{phase}"}}"#);
    let finish = FinishPhase {
        work,
        attempt: started.attempts,
        session: Some((session, Some(dedup))),
        verdict: Some(NewArtifact {
            path: format!("/work/tree/{phase}.json"),
            hash: ContentHash::of(body.as_bytes()),
            schema_id: format!("{phase}.schema.json"),
            size: body.len() as u64,
            content: serde_json::from_str(&body).ok(),
            errors: Vec::new(),
        }),
        end: PhaseEnd::Complete,
        transcript: vec![TranscriptChunk {
            seq: captured + 1,
            text: format!("{phase} done"),
        }],
    };
    store.finish_phase(finish).await.unwrap();
}

#[tokio::test]
async fn a_happy_path_phase_takes_four_commits_and_replays_take_none() {
    let store = MemoryStore::new();
    let new = new_run(&["plan", "implement"]);
    store.create_run(new.clone()).await.unwrap();
    assert_eq!(store.commands(), 1);
    let owner = EngineId::new();

    happy_phase(&store, new.id, "plan", owner, true).await;
    assert_eq!(store.commands(), 1 + 4);
    happy_phase(&store, new.id, "implement", owner, false).await;
    assert_eq!(store.commands(), 1 + 8);
    assert_eq!(store.run(new.id).await.unwrap().state, RunState::Completed);

    store.create_run(new.clone()).await.unwrap();
    let refused = store
        .begin_attempt(BeginAttempt {
            work: PhaseWork {
                run: new.id,
                phase: PhaseKey::new("plan"),
                owner,
            },
            repair: false,
            reason: "initial".into(),
            instructions: "again".into(),
        })
        .await;
    assert!(refused.is_err());
    assert_eq!(
        store.commands(),
        1 + 8,
        "replays and refusals commit nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_runs_do_not_interfere() {
    let store = Arc::new(MemoryStore::new());
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let new = new_run(&["plan", "implement"]);
            store.create_run(new.clone()).await.unwrap();
            let owner = EngineId::new();
            happy_phase(store.as_ref(), new.id, "plan", owner, true).await;
            happy_phase(store.as_ref(), new.id, "implement", owner, false).await;
            new.id
        }));
    }
    for task in tasks {
        let run = task.await.unwrap();
        let events = store.events(run, 0).await.unwrap();
        assert!(events.iter().zip(1..).all(|(event, seq)| event.seq == seq));
        assert_eq!(store.run(run).await.unwrap().state, RunState::Completed);
    }
    assert_eq!(store.commands(), 32 * 9);
}

#[test]
fn debug_output_summarises_instead_of_dumping_tables() {
    let store = MemoryStore::new();
    assert_eq!(format!("{store:?}"), "MemoryStore { runs: 0, commands: 0 }");
}
