//! Crash injection at every store command and session call of every recovery scenario, on the
//! in-memory store: the run always ends as it would have without the crash.

use std::sync::Arc;

use phaseflow_fake::crash::{crash_scenarios, sweep};
use phaseflow_fake::memory::MemoryStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_crash_point_of_every_scenario_recovers() {
    let mut total = 0;
    for scenario in crash_scenarios() {
        let report = sweep(Arc::new(MemoryStore::new()), scenario).await;
        println!(
            "crash sweep on MemoryStore: {:<22} {:>3} calls, {:>3} crash cases",
            scenario.name, report.calls, report.cases
        );
        assert!(report.cases > 0);
        total += report.cases;
    }
    println!("crash sweep on MemoryStore: {total} crash cases in all");
}
