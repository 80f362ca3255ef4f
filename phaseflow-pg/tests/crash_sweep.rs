//! Crash injection at every store command and session call of every recovery scenario, on
//! PostgreSQL: the same sweep as on `MemoryStore`, one database per scenario.

use std::sync::Arc;

use phaseflow_fake::crash::{CrashScenario, crash_scenarios, sweep};
use phaseflow_pg::testing::TestStore;

async fn sweep_on_postgres(scenario: CrashScenario) {
    let report = sweep(Arc::new(TestStore::new().await), scenario).await;
    println!(
        "crash sweep on PgStore: {:<22} {:>3} calls, {:>3} crash cases",
        scenario.name, report.calls, report.cases
    );
    assert!(report.cases > 0);
}

fn scenario(name: &str) -> CrashScenario {
    crash_scenarios()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no crash scenario named {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_in_the_happy_path_recover() {
    sweep_on_postgres(scenario("happy")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_around_a_workflow_gate_recover() {
    sweep_on_postgres(scenario("gated")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_around_a_repair_recover() {
    sweep_on_postgres(scenario("invalid_then_repair")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_around_a_timeout_recovery_recover() {
    sweep_on_postgres(scenario("timeout_then_recovery")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_before_a_failure_gate_recover() {
    sweep_on_postgres(scenario("gate_after_budget")).await;
}

#[test]
fn the_sweep_covers_every_scenario() {
    let names: Vec<_> = crash_scenarios().into_iter().map(|s| s.name).collect();
    assert_eq!(
        names,
        [
            "happy",
            "gated",
            "invalid_then_repair",
            "timeout_then_recovery",
            "gate_after_budget"
        ]
    );
}
