//! Rows phaseflow did not write that way become `store_decode` errors naming table, column and
//! value — from reads and from commands alike — never panics.

mod support;

use phaseflow::error::{Error, ErrorCode};
use phaseflow::ids::RunId;
use phaseflow::store::Store;
use phaseflow_pg::testing::TestStore;
use support::{EngineCtx, create_run};

async fn corrupt(store: &TestStore, sql: &'static str, run: RunId) {
    sqlx::query(sql)
        .bind(run.as_uuid())
        .execute(store.database().pool())
        .await
        .unwrap();
}

#[track_caller]
fn assert_decode_error(error: Error, names: &[&str]) {
    assert_eq!(error.code(), ErrorCode::StoreDecode, "{error}");
    for name in names {
        assert!(
            error.message().contains(name),
            "`{name}` missing from: {error}"
        );
    }
}

#[tokio::test]
async fn an_unknown_run_state_is_a_typed_error_for_reads_and_commands() {
    let store = TestStore::new().await;
    let run = create_run(&store).await;
    corrupt(
        &store,
        "UPDATE phaseflow.runs SET state = 'sleeping' WHERE id = $1",
        run,
    )
    .await;

    let error = store.run(run).await.unwrap_err();
    assert_decode_error(
        error,
        &["phaseflow.runs.state", "\"sleeping\"", "unknown run state"],
    );
    let error = store
        .begin_attempt(EngineCtx::new(run).begin())
        .await
        .unwrap_err();
    assert_decode_error(error, &["phaseflow.runs.state", "sleeping"]);
    assert_eq!(store.commits(), 1, "only create_run committed");
}

#[tokio::test]
async fn a_malformed_event_payload_is_a_typed_error() {
    let store = TestStore::new().await;
    let run = create_run(&store).await;
    corrupt(
        &store,
        r#"UPDATE phaseflow.run_events SET payload = '{"type":"nope"}' WHERE run_id = $1 AND seq = 1"#,
        run,
    )
    .await;
    let error = store.events(run, 0).await.unwrap_err();
    assert_decode_error(error, &["phaseflow.run_events.payload", "nope"]);
    assert_eq!(error_run(store.events(run, 0).await), Some(run));
    // Events after the bad one still read.
    assert!(store.events(run, 1).await.unwrap().is_empty());
}

fn error_run<T: std::fmt::Debug>(result: phaseflow::Result<T>) -> Option<RunId> {
    result.unwrap_err().run()
}

#[tokio::test]
async fn negative_counters_and_unknown_phase_and_session_states_are_typed_errors() {
    let store = TestStore::new().await;
    let run = create_run(&store).await;
    let ctx = EngineCtx::new(run);
    store.begin_attempt(ctx.begin()).await.unwrap();
    store.mark_busy(ctx.busy()).await.unwrap();

    corrupt(
        &store,
        "UPDATE phaseflow.run_phases SET attempts = -1 WHERE run_id = $1",
        run,
    )
    .await;
    let error = store.phases(run).await.unwrap_err();
    assert_decode_error(error, &["phaseflow.run_phases.attempts", "-1"]);
    let error = store.record_prompt(ctx.prompt()).await.unwrap_err();
    assert_decode_error(error, &["phaseflow.run_phases.attempts"]);

    corrupt(
        &store,
        "UPDATE phaseflow.run_phases SET attempts = 1, state = 'dozing' WHERE run_id = $1",
        run,
    )
    .await;
    assert_decode_error(
        store.phases(run).await.unwrap_err(),
        &["run_phases.state", "unknown phase state"],
    );

    corrupt(
        &store,
        "UPDATE phaseflow.run_phases SET state = 'running' WHERE run_id = $1",
        run,
    )
    .await;
    corrupt(
        &store,
        "UPDATE phaseflow.sessions SET state = 'NAPPING' WHERE run_id = $1",
        run,
    )
    .await;
    assert_decode_error(
        store.sessions(run).await.unwrap_err(),
        &["sessions.state", "NAPPING"],
    );
    let error = store.session(run, &"planner".into()).await.unwrap_err();
    assert_decode_error(error, &["sessions.state"]);

    corrupt(
        &store,
        "UPDATE phaseflow.sessions SET state = 'BUSY' WHERE run_id = $1",
        run,
    )
    .await;
    store.record_prompt(ctx.prompt()).await.unwrap();
}

#[tokio::test]
async fn a_malformed_artifact_row_is_a_typed_error() {
    let store = TestStore::new().await;
    let run = create_run(&store).await;
    let ctx = EngineCtx::new(run);
    store.begin_attempt(ctx.begin()).await.unwrap();
    store.mark_busy(ctx.busy()).await.unwrap();
    store.record_prompt(ctx.prompt()).await.unwrap();
    store.record_verdict(ctx.verdict()).await.unwrap();
    corrupt(
        &store,
        r#"UPDATE phaseflow.artifacts SET errors = '{"not":"a list"}' WHERE run_id = $1"#,
        run,
    )
    .await;
    let error = store
        .latest_artifact(run, &"plan".into())
        .await
        .unwrap_err();
    assert_decode_error(error, &["phaseflow.artifacts.errors"]);
    // A replayed verdict reads the stored row to compare it: the same typed error.
    let error = store.record_verdict(ctx.verdict()).await.unwrap_err();
    assert_decode_error(error, &["phaseflow.artifacts.errors"]);
}
