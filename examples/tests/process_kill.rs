//! Crash recovery with real processes: an orchestrator process running a phase on PostgreSQL is
//! killed with SIGKILL, a second process resumes the run from the store and completes it, and
//! the agents — which outlive the orchestrator and journal every prompt they receive — got each
//! prompt exactly once.
//!
//! Two kill points:
//! - `killed_while_awaiting_the_artifact`: the prompt is delivered and recorded, the phase is
//!   `awaiting_artifact`; the second process resumes with the typed `Engine::resume::<Hotfix>`
//!   and continues the wait without sending anything.
//! - `killed_between_delivery_and_record`: the agent has the prompt but the store does not know
//!   it was sent (phase `running`, session `BUSY` with its dedup key); the second process resumes
//!   with the untyped `Engine::resume_any`, re-sends the same envelope, and the agent acknowledges
//!   it without a second delivery.
//!
//! The orchestrators are this test binary started again with [`recovery::ORCHESTRATOR_FLAG`],
//! hence `harness = false` and this file's own `main`. Filters and `--list` work as with libtest.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phaseflow::event::EventKind;
use phaseflow::ids::{DedupKey, PhaseKey, RunId};
use phaseflow::prelude::*;
use phaseflow::state::{PhaseState, RunState, SessionState};
use phaseflow::store::Store;
use phaseflow_examples::agents::{JournalEntry, JournalOutcome, JournaledAgents};
use phaseflow_examples::recovery::{
    self, Hotfix, Implement, Orchestrator, OrchestratorTask, wait_for_phase,
};
use phaseflow_pg::testing::TestDatabase;
use tempfile::TempDir;

const CASES: &[&str] = &[
    "killed_while_awaiting_the_artifact",
    "killed_between_delivery_and_record",
];

/// How long an orchestrator may take to reach the kill point or to finish.
const PATIENCE: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    if let Some(code) = recovery::child_main() {
        return code;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        for case in CASES {
            println!("{case}: test");
        }
        return ExitCode::SUCCESS;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let selected: Vec<&str> = CASES
        .iter()
        .copied()
        .filter(|case| filters.is_empty() || filters.iter().any(|f| case.contains(f.as_str())))
        .collect();
    println!("\nrunning {} process-kill case(s)", selected.len());
    if selected.is_empty() {
        return ExitCode::SUCCESS;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("start tokio");
    runtime.block_on(async {
        let database = TestDatabase::migrated().await;
        for case in selected {
            let clock = Instant::now();
            let freeze = case == "killed_between_delivery_and_record";
            let summary = kill_and_resume(&database, freeze).await;
            println!(
                "{case} ... ok ({} ms): {summary}",
                clock.elapsed().as_millis()
            );
        }
    });
    ExitCode::SUCCESS
}

/// One run, two orchestrator processes; returns what was shown.
async fn kill_and_resume(database: &TestDatabase, freeze_after_delivery: bool) -> String {
    let store: Arc<dyn Store> = Arc::new(database.connect_store().await);
    let worktree = TempDir::new().expect("worktree");
    let agents_dir = worktree.path().join(".agents");
    // The coder does not write its report before the first orchestrator is dead.
    let release = worktree.path().join("coder-may-finish");
    let run = Engine::new(store.clone(), Arc::new(JournaledAgents::new(&agents_dir)))
        .start::<Hotfix>(StartRun::new("TICKET-7", worktree.path()))
        .await
        .expect("create the run")
        .id();
    let task = OrchestratorTask {
        database_url: database.url().to_owned(),
        run,
        agents_dir,
        coder_work: Duration::ZERO,
        coder_hold: Some(release.clone()),
        freeze_after_delivery,
        untyped: false,
    };
    let journal = task.agents().journal();
    let program = std::env::current_exe().expect("this test's executable");
    let implement = Implement::SPEC.key();

    let mut first = Orchestrator::spawn(&program, &task, "orchestrator 1").expect("spawn");
    let first_pid = first.pid();
    if freeze_after_delivery {
        wait_for(|| first.lines().iter().any(|l| l.contains("freezing"))).await;
        let phase = phase_state(store.as_ref(), run, &implement).await;
        assert_eq!(phase, PhaseState::Running, "frozen before record_prompt");
        let coder = store
            .session(run, &"coder".into())
            .await
            .unwrap()
            .expect("coder session");
        assert_eq!(coder.state, SessionState::Busy);
        let delivered = journal.entries().unwrap();
        assert_eq!(delivered.len(), 1, "{delivered:?}");
        assert_eq!(coder.last_dedup.as_ref(), Some(&delivered[0].dedup));
        assert!(
            !types(store.as_ref(), run)
                .await
                .contains(&"prompt.sent".to_owned()),
            "the store must not know the prompt was sent"
        );
    } else {
        wait_for_phase(
            store.as_ref(),
            run,
            &implement,
            PhaseState::AwaitingArtifact,
            PATIENCE,
        )
        .await
        .expect("orchestrator 1 reaches awaiting_artifact");
    }
    let events_at_kill = store.events(run, 0).await.unwrap().len();
    let status = first.kill().expect("kill orchestrator 1");
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status}");
    assert!(
        !worktree.path().join("phaseflow/impl.json").exists(),
        "the agent was still working when the orchestrator died"
    );
    assert_eq!(store.events(run, 0).await.unwrap().len(), events_at_kill);

    std::fs::write(&release, "").expect("release the coder");
    // One case resumes with the typed API, the other as a tool that knows no workflow type.
    let resumed_task = OrchestratorTask {
        freeze_after_delivery: false,
        untyped: freeze_after_delivery,
        ..task
    };
    let mut second = Orchestrator::spawn(&program, &resumed_task, "orchestrator 2").expect("spawn");
    let second_pid = second.pid();
    let status = second.wait(PATIENCE).expect("orchestrator 2 finishes");
    assert!(status.success(), "orchestrator 2 failed: {status}");
    let continued = if freeze_after_delivery {
        "implement: running at attempt 1 in the store"
    } else {
        "implement: awaiting_artifact at attempt 1 in the store"
    };
    assert!(
        second.lines().iter().any(|l| l.starts_with(continued)),
        "orchestrator 2 continued the attempt: {:?}",
        second.lines()
    );

    // The run went to the end, as if nothing had happened.
    let record = store.run(run).await.unwrap();
    assert_eq!(record.state, RunState::Completed);
    for phase in store.phases(run).await.unwrap() {
        assert_eq!(phase.state, PhaseState::Completed, "phase {}", phase.key);
        assert_eq!(phase.attempts, 1, "phase {}: no extra attempt", phase.key);
    }
    for session in store.sessions(run).await.unwrap() {
        assert_eq!(
            session.state,
            SessionState::Ready,
            "session {}",
            session.role
        );
    }

    // A consistent event log: gapless, no idempotency key twice, the same events a run without
    // a crash appends.
    let events = store.events(run, 0).await.unwrap();
    phaseflow_fake::assert_event_log(&events);
    let happy_path = [
        "run.created",
        "run.started",
        "phase.started",
        "session.created",
        "session.ready",
        "session.busy",
        "prompt.sent",
        "artifact.expected",
        "artifact.validated",
        "session.idle",
        "phase.completed",
        "phase.started",
        "session.created",
        "session.ready",
        "session.busy",
        "prompt.sent",
        "artifact.expected",
        "artifact.validated",
        "session.idle",
        "phase.completed",
        "run.completed",
    ];
    assert_eq!(types(store.as_ref(), run).await, happy_path);
    let recorded: BTreeMap<PhaseKey, DedupKey> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::PromptSent { phase, dedup, .. } => Some((phase.clone(), dedup.clone())),
            _ => None,
        })
        .collect();

    // Exactly one delivery per prompt across both processes, by the agents' own journal.
    let entries = journal.entries().unwrap();
    let delivered: Vec<&JournalEntry> = entries
        .iter()
        .filter(|e| e.outcome == JournalOutcome::Delivered)
        .collect();
    let deliveries = |dedup: &DedupKey| delivered.iter().filter(|e| &e.dedup == dedup).count();
    assert_eq!(delivered.len(), 2, "one prompt per phase: {entries:#?}");
    for (phase, dedup) in &recorded {
        assert_eq!(deliveries(dedup), 1, "phase {phase}: {entries:#?}");
    }
    let implement_prompt = &recorded[&implement];
    let review_prompt = &recorded[&PhaseKey::new("review")];
    let by = |dedup: &DedupKey| delivered.iter().find(|e| &e.dedup == dedup).map(|e| e.pid);
    assert_eq!(by(implement_prompt), Some(first_pid));
    assert_eq!(by(review_prompt), Some(second_pid));
    let acknowledged: Vec<&JournalEntry> = entries
        .iter()
        .filter(|e| e.outcome == JournalOutcome::AlreadyDelivered)
        .collect();
    if freeze_after_delivery {
        assert_eq!(acknowledged.len(), 1, "{entries:#?}");
        assert_eq!(&acknowledged[0].dedup, implement_prompt);
        assert_eq!(acknowledged[0].pid, second_pid);
    } else {
        assert!(acknowledged.is_empty(), "nothing re-sent: {entries:#?}");
    }

    // Every artifact recorded once, valid.
    let verdicts: Vec<&EventKind> = events
        .iter()
        .map(|e| &e.kind)
        .filter(|k| {
            matches!(
                k,
                EventKind::ArtifactValidated { .. } | EventKind::ArtifactInvalid { .. }
            )
        })
        .collect();
    assert_eq!(verdicts.len(), 2, "{verdicts:?}");
    for phase in ["implement", "review"] {
        let artifact = store
            .latest_artifact(run, &phase.into())
            .await
            .unwrap()
            .expect("recorded");
        assert!(artifact.is_valid(), "{phase}: {:?}", artifact.errors);
    }

    format!(
        "pid {first_pid} killed, pid {second_pid} resumed; implement prompt {} delivered once{}; {} events, none twice",
        &implement_prompt.as_str()[..12],
        if freeze_after_delivery {
            ", re-sent once (resume_any) and acknowledged without delivery"
        } else {
            ", not re-sent (resume::<Hotfix>)"
        },
        events.len()
    )
}

async fn phase_state(store: &dyn Store, run: RunId, phase: &PhaseKey) -> PhaseState {
    phaseflow::store::phase_of(store, run, phase)
        .await
        .unwrap()
        .state
}

async fn types(store: &dyn Store, run: RunId) -> Vec<String> {
    store
        .events(run, 0)
        .await
        .unwrap()
        .iter()
        .map(|e| e.kind.type_name().to_owned())
        .collect()
}

async fn wait_for(mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "gave up waiting after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
