//! Two engines and an operator on separate pools: the run-row lock serialises them, ownership
//! fences the losing engine out, and an abort stops the phase owner's writes.

mod support;

use std::sync::Arc;

use phaseflow::ErrorClass;
use phaseflow::error::ErrorCode;
use phaseflow::state::{PhaseState, RunState, SessionState};
use phaseflow::store::{BeginOutcome, Finished, OperatorAction, PhaseEnd, PhaseRecord, Store};
use phaseflow_fake::assert_event_log;
use phaseflow_pg::PgStore;
use phaseflow_pg::testing::TestDatabase;
use serde_json::json;
use support::{EngineCtx, create_run, types};
use tokio::sync::Barrier;

#[derive(Debug)]
enum Outcome {
    /// Started the attempt and completed the phase.
    Won(Box<Finished>),
    /// Found the phase not startable (its record, when the run was still active); carrying on
    /// anyway was refused with this code.
    Lost(Option<PhaseRecord>, ErrorCode),
}

/// What an engine does with a phase: start it, and if that worked, run it to completion.
async fn engine(store: PgStore, ctx: EngineCtx, start: Arc<Barrier>) -> Outcome {
    start.wait().await;
    match store.begin_attempt(ctx.begin()).await {
        Ok(BeginOutcome::Started(_)) => {
            store.mark_busy(ctx.busy()).await.unwrap();
            store.record_prompt(ctx.prompt()).await.unwrap();
            Outcome::Won(Box::new(store.finish_phase(ctx.complete()).await.unwrap()))
        }
        Ok(BeginOutcome::NotStartable(phase)) => {
            // An engine that carries on regardless is fenced out by the phase's owner.
            let refused = store.mark_busy(ctx.busy()).await.unwrap_err();
            Outcome::Lost(Some(phase), refused.code())
        }
        // On a loaded machine the winner may finish the whole phase before this engine gets
        // the run lock: the run is completed, and begin refuses with run_state_changed.
        Err(error) if error.code() == ErrorCode::RunStateChanged => {
            Outcome::Lost(None, error.code())
        }
        Err(error) => panic!("begin_attempt failed: {error}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_engines_racing_for_one_phase_one_wins_and_the_log_stays_gapless() {
    let db = TestDatabase::migrated().await;
    let (first, second) = (db.connect_store().await, db.connect_store().await);
    for _ in 0..25 {
        let run = create_run(&first).await;
        let (a, b) = (EngineCtx::new(run), EngineCtx::new(run));
        let start = Arc::new(Barrier::new(2));
        let racing_a = tokio::spawn(engine(first.clone(), a.clone(), start.clone()));
        let racing_b = tokio::spawn(engine(second.clone(), b.clone(), start));
        let outcomes = [racing_a.await.unwrap(), racing_b.await.unwrap()];

        let winners: Vec<(usize, &Finished)> = outcomes
            .iter()
            .enumerate()
            .filter_map(|(i, o)| match o {
                Outcome::Won(finished) => Some((i, &**finished)),
                Outcome::Lost(..) => None,
            })
            .collect();
        assert_eq!(
            winners.len(),
            1,
            "exactly one engine starts the phase: {outcomes:?}"
        );
        let (winner, finished) = winners[0];
        assert_eq!(finished.run.state, RunState::Completed);
        let winner = if winner == 0 { &a } else { &b };
        for outcome in &outcomes {
            if let Outcome::Lost(phase, code) = outcome {
                if let Some(phase) = phase {
                    assert_ne!(phase.state, PhaseState::Pending);
                    assert_eq!(phase.owner, Some(winner.owner));
                }
                // Fenced by the owner while the phase runs, by the run state once it completed.
                assert!(
                    matches!(code, ErrorCode::PhaseClaimed | ErrorCode::RunStateChanged),
                    "{code:?}"
                );
            }
        }

        let events = first.events(run, 0).await.unwrap();
        assert_event_log(&events);
        assert_eq!(
            types(&events),
            [
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
                "run.completed",
            ]
        );
        let sessions = second.sessions(run).await.unwrap();
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0].id, winner.session);
        let phase = &second.phases(run).await.unwrap()[0];
        assert_eq!((phase.state, phase.attempts), (PhaseState::Completed, 1));
    }
}

#[tokio::test]
async fn an_operator_abort_from_another_pool_stops_a_phase_awaiting_its_artifact() {
    let db = TestDatabase::migrated().await;
    let engine = db.store();
    let operator = db.connect_store().await;
    let run = create_run(&engine).await;
    let ctx = EngineCtx::new(run);
    engine.begin_attempt(ctx.begin()).await.unwrap();
    engine.mark_busy(ctx.busy()).await.unwrap();
    engine.record_prompt(ctx.prompt()).await.unwrap();
    assert_eq!(
        engine.phases(run).await.unwrap()[0].state,
        PhaseState::AwaitingArtifact
    );

    // The agent is still writing; an operator aborts the run from another connection.
    let aborted = operator
        .operate(
            run,
            OperatorAction::Abort {
                reason: "operator: wrong ticket".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(aborted.run.state, RunState::Aborted);
    assert_eq!(aborted.dispose, [ctx.session]);
    let events = engine.events(run, 0).await.unwrap();
    assert_eq!(
        types(&events)[events.len() - 3..],
        ["phase.failed", "run.aborted", "session.failed"]
    );
    let commits = engine.commits();

    // The artifact arrives; every write the phase owner attempts is refused.
    let refused = engine.record_verdict(ctx.verdict()).await.unwrap_err();
    assert_eq!(refused.code(), ErrorCode::RunStateChanged);
    assert_eq!(refused.class(), ErrorClass::HumanRequired);
    assert_eq!(refused.run(), Some(run));
    let refused = engine.finish_phase(ctx.complete()).await.unwrap_err();
    assert_eq!(refused.code(), ErrorCode::RunStateChanged);
    let mut gate = ctx.complete();
    gate.end = PhaseEnd::HumanGate {
        gate: "artifact_invalid_after_repair".into(),
        payload: json!({}),
        crash_session: false,
    };
    let refused = engine.finish_phase(gate).await.unwrap_err();
    assert_eq!(refused.code(), ErrorCode::RunStateChanged);
    // Failing an already terminal run is a no-op.
    let mut fail = ctx.complete();
    fail.verdict = None;
    fail.end = PhaseEnd::Fail {
        reason: "session_runtime".into(),
    };
    assert_eq!(
        engine.finish_phase(fail).await.unwrap().run.state,
        RunState::Aborted
    );

    // Nothing was written after the abort.
    assert_eq!(engine.commits(), commits);
    let after = engine.events(run, 0).await.unwrap();
    assert_eq!(after, events);
    assert_event_log(&after);
    assert_eq!(
        engine.latest_artifact(run, &"plan".into()).await.unwrap(),
        None
    );
    let session = engine
        .session(run, &"planner".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(session.state, SessionState::FailedNeedsHuman);
    let phase = &engine.phases(run).await.unwrap()[0];
    assert_eq!(phase.state, PhaseState::Failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_waits_for_the_run_lock_held_by_another_transaction() {
    let db = TestDatabase::migrated().await;
    let engine = db.store();
    let run = create_run(&engine).await;
    let ctx = EngineCtx::new(run);

    // Another connection holds the run row (an operator's command in flight).
    let mut holder = db.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM phaseflow.runs WHERE id = $1 FOR UPDATE")
        .bind(run.as_uuid())
        .execute(&mut *holder)
        .await
        .unwrap();
    let begin = tokio::spawn({
        let engine = db.connect_store().await;
        let cmd = ctx.begin();
        async move { engine.begin_attempt(cmd).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !begin.is_finished(),
        "begin_attempt must wait for the run lock"
    );
    // The operator pauses the run before releasing the lock: the engine then sees `paused`.
    sqlx::query(
        "UPDATE phaseflow.runs SET state = 'paused', paused_from = 'planning' WHERE id = $1",
    )
    .bind(run.as_uuid())
    .execute(&mut *holder)
    .await
    .unwrap();
    holder.commit().await.unwrap();
    let refused = begin.await.unwrap().unwrap_err();
    assert_eq!(refused.code(), ErrorCode::RunStateChanged);
    assert_eq!(engine.events(run, 0).await.unwrap().len(), 1);
}
