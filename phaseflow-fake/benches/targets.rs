//! Measures phaseflow against DESIGN.md's targets on the in-memory store and prints figures:
//!
//! - artifact detection: close of the file → the watch reports it (target p50 ≤ 50 ms);
//! - one phase end to end with an agent that writes at once, and the store commits it takes
//!   (targets: orchestration p50 ≤ 5 ms, ≤ 4 commits);
//! - recovery: 1,000 runs in flight when their engine dies, resumed by a fresh engine (≤ 2 s).
//!
//! Run with `cargo bench -p phaseflow-fake --bench targets`. It asserts nothing about time:
//! the machines are shared and noisy, so the numbers are for reading, not for gating.

use std::sync::Arc;
use std::time::{Duration, Instant};

use phaseflow::artifact::{ArtifactLocation, ArtifactWatch, WaitOptions, WaitOutcome};
use phaseflow::state::RunState;
use phaseflow::store::Store as _;
use phaseflow::{Engine, EngineOptions, RunStatus};
use phaseflow_fake::memory::MemoryStore;
use phaseflow_fake::scenarios::{IMPLEMENT, SOLO, valid_impl};
use phaseflow_fake::sessions::{FakeSessions, Script};

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index]
}

fn report(name: &str, samples: &mut [Duration]) {
    let p50 = percentile(samples, 0.5);
    let p90 = percentile(samples, 0.9);
    println!(
        "{name:<44} p50 {:>8.2} ms   p90 {:>8.2} ms   (n = {})",
        ms(p50),
        ms(p90),
        samples.len()
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn detection(iterations: usize) -> Vec<Duration> {
    let worktree = tempfile::tempdir().expect("worktree");
    let options = WaitOptions::default();
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let location =
            ArtifactLocation::resolve(worktree.path(), &format!("out/{i}.json")).expect("location");
        location.prepare_parent().expect("parent");
        let mut watch = ArtifactWatch::arm(&location, None);
        let path = location.path().to_path_buf();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            std::fs::write(&path, br#"{"done": true}"#).expect("write");
            Instant::now()
        });
        let outcome = watch.wait(&options).await.expect("wait");
        let seen = Instant::now();
        let closed = writer.join().expect("writer");
        assert_eq!(outcome, WaitOutcome::Ready);
        samples.push(seen.saturating_duration_since(closed));
    }
    samples
}

async fn phases(iterations: usize) -> (Vec<Duration>, f64) {
    let store = Arc::new(MemoryStore::new());
    let fake = FakeSessions::new();
    let engine = Engine::new(store.clone(), Arc::new(fake.clone()));
    let worktree = tempfile::tempdir().expect("worktree");
    let mut samples = Vec::with_capacity(iterations);
    let mut commits = 0;
    for _ in 0..iterations {
        fake.script("coder", [Script::valid(valid_impl())]);
        let run = engine
            .create_run(&SOLO, "BENCH", worktree.path())
            .await
            .expect("run");
        let before = store.commands();
        let started = Instant::now();
        engine
            .execute_phase(run.id, &IMPLEMENT, "Benchmark.")
            .await
            .expect("phase");
        samples.push(started.elapsed());
        commits += store.commands() - before;
    }
    (samples, commits as f64 / iterations as f64)
}

async fn recovery(runs: usize) -> (Duration, usize) {
    let store = Arc::new(MemoryStore::new());
    let fake = FakeSessions::new();
    let options = EngineOptions::default().with_artifact_timeout(Duration::from_secs(60));
    let doomed = Engine::new(store.clone(), Arc::new(fake.clone())).with_options(options.clone());
    let worktree = tempfile::tempdir().expect("worktree");
    let mut ids = Vec::with_capacity(runs);
    let mut in_flight = Vec::with_capacity(runs);
    for i in 0..runs {
        fake.script("coder", [Script::nothing()]);
        let dir = worktree.path().join(format!("run-{i}"));
        std::fs::create_dir_all(&dir).expect("run worktree");
        let run = doomed.create_run(&SOLO, "BENCH", &dir).await.expect("run");
        ids.push((run.id, dir));
        let engine = doomed.clone();
        in_flight.push(tokio::spawn(async move {
            engine.execute_phase(run.id, &IMPLEMENT, "Benchmark.").await
        }));
    }
    while fake.deliveries().len() < runs {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The orchestrator dies with every phase awaiting its artifact; the agents finish meanwhile.
    for task in &in_flight {
        task.abort();
    }
    drop(doomed);
    for (_, dir) in &ids {
        std::fs::write(
            dir.join("phaseflow/impl.json"),
            serde_json::to_vec(&valid_impl()).expect("json"),
        )
        .expect("artifact");
    }
    let fresh = Engine::new(store.clone(), Arc::new(fake.clone()))
        .with_options(options)
        .with_workflow(SOLO);
    let started = Instant::now();
    let mut resumed = tokio::task::JoinSet::new();
    for (run, _) in &ids {
        let (engine, run) = (fresh.clone(), *run);
        resumed.spawn(async move { engine.resume_any(run).await });
    }
    let mut completed = 0;
    while let Some(status) = resumed.join_next().await {
        if let RunStatus::Resumed { .. } = status.expect("join").expect("resume") {
            completed += 1;
        }
    }
    let elapsed = started.elapsed();
    for (run, _) in &ids {
        assert_eq!(
            store.run(*run).await.expect("run").state,
            RunState::Completed
        );
    }
    fake.assert_no_duplicate_delivery();
    (elapsed, completed)
}

#[tokio::main]
async fn main() {
    println!(
        "phaseflow targets on MemoryStore ({} cores)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let mut detected = detection(200).await;
    report("artifact detection (close → ready)", &mut detected);
    let (mut phase, commits) = phases(300).await;
    report("one phase, agent writes at once", &mut phase);
    let overhead = ms(percentile(&mut phase, 0.5)) - ms(percentile(&mut detected, 0.5));
    println!(
        "{:<44} p50 {overhead:>8.2} ms   (phase p50 − detection p50)",
        "orchestration overhead"
    );
    println!(
        "{:<44} {commits:.2} per phase",
        "store commits on the happy path"
    );
    let (elapsed, completed) = recovery(1000).await;
    println!(
        "{:<44} {:>8.0} ms   ({completed} runs resumed to completion)",
        "recovery of 1,000 in-flight runs",
        ms(elapsed)
    );
}
