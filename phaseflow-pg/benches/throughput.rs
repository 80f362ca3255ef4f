//! Phase transitions committed per second on one local PostgreSQL, next to `pgbench -N` on the
//! same server in the same run (DESIGN.md target: ≥ 80 % of pgbench's TPS).
//!
//! Run with `cargo bench -p phaseflow-pg --bench throughput` (uses `DATABASE_URL`, or starts the
//! throwaway test cluster). Prints figures; asserts nothing about speed.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phaseflow::Engine;
use phaseflow::event::PromptKind;
use phaseflow::ids::{ContentHash, DedupKey, EngineId, PhaseKey, RoleKey, RunId, SessionId};
use phaseflow::store::{
    BeginAttempt, BeginOutcome, FinishPhase, MarkBusy, NewArtifact, NewRun, PhaseEnd, PhaseWork,
    RecordPrompt, SessionOrigin, Store,
};
use phaseflow_fake::scenarios::{IMPLEMENT, SOLO, valid_impl};
use phaseflow_fake::sessions::{FakeSessions, Script};
use phaseflow_pg::PgStore;
use phaseflow_pg::testing::TestDatabase;

const SECONDS: u64 = 10;
const CLIENTS: usize = 8;

fn pgbench_binary() -> String {
    let mut candidates: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin/pgbench"))
        .filter(|path| path.exists())
        .collect();
    candidates.sort();
    candidates
        .pop()
        .map_or_else(|| "pgbench".to_owned(), |p| p.display().to_string())
}

fn pgbench_tps(url: &str) -> Option<f64> {
    let pgbench = pgbench_binary();
    let init = Command::new(&pgbench)
        .args(["-i", "-q", "-s", "4", url])
        .output()
        .ok()?;
    if !init.status.success() {
        eprintln!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        return None;
    }
    let (clients, seconds) = (CLIENTS.to_string(), SECONDS.to_string());
    let run = Command::new(&pgbench)
        .args(["-N", "-c", &clients, "-j", "2", "-T", &seconds, url])
        .output()
        .ok()?;
    String::from_utf8_lossy(&run.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|tps| tps.parse().ok())
}

/// The happy path's store commands in a loop: create run, begin, mark busy, record prompt,
/// finish with the verdict — each one committed transition.
async fn one_phase_of_commands(store: &PgStore) {
    let run = RunId::new();
    let phase = PhaseKey::new("implement");
    let path = "/tmp/bench/phaseflow/impl.json".to_owned();
    store
        .create_run(NewRun {
            id: run,
            workflow: "bench".into(),
            subject: "BENCH".into(),
            worktree: "/tmp/bench".into(),
            phases: vec![phase.clone()],
        })
        .await
        .expect("create");
    let work = PhaseWork {
        run,
        phase,
        owner: EngineId::new(),
    };
    let begun = store
        .begin_attempt(BeginAttempt {
            work: work.clone(),
            repair: false,
            reason: "initial".into(),
            instructions: "bench".into(),
        })
        .await
        .expect("begin");
    assert!(matches!(begun, BeginOutcome::Started(_)));
    let session = SessionId::new();
    let dedup = DedupKey::from_hex(ContentHash::of(run.to_string().as_bytes()).as_str());
    store
        .mark_busy(MarkBusy {
            work: work.clone(),
            attempt: 1,
            session,
            role: RoleKey::new("coder"),
            origin: SessionOrigin::Started,
            dedup: dedup.clone(),
        })
        .await
        .expect("busy");
    store
        .record_prompt(RecordPrompt {
            work: work.clone(),
            attempt: 1,
            session,
            dedup: dedup.clone(),
            kind: PromptKind::Initial,
            artifact_path: path.clone(),
            schema_id: "impl.schema.json".into(),
        })
        .await
        .expect("prompt");
    store
        .finish_phase(FinishPhase {
            work,
            attempt: 1,
            session: Some((session, Some(dedup))),
            verdict: Some(NewArtifact {
                path,
                hash: ContentHash::of(b"{}"),
                schema_id: "impl.schema.json".into(),
                size: 2,
                content: Some(serde_json::json!({})),
                errors: Vec::new(),
            }),
            end: PhaseEnd::Complete,
            transcript: Vec::new(),
        })
        .await
        .expect("finish");
}

async fn store_transitions(store: Arc<PgStore>) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(SECONDS);
    let (before, started) = (store.commits(), Instant::now());
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS * 2 {
        let store = store.clone();
        workers.spawn(async move {
            while Instant::now() < deadline {
                one_phase_of_commands(&store).await;
            }
        });
    }
    while workers.join_next().await.is_some() {}
    (store.commits() - before) as f64 / started.elapsed().as_secs_f64()
}

/// Whole phases through the engine, with agents that write their artifact at once.
async fn engine_phases(store: Arc<PgStore>) -> (f64, f64) {
    let fake = FakeSessions::new();
    let engine = Engine::new(store.clone() as Arc<dyn Store>, Arc::new(fake.clone()));
    let worktree = tempfile::tempdir().expect("worktree");
    let deadline = Instant::now() + Duration::from_secs(SECONDS);
    let (before, started) = (store.commits(), Instant::now());
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..CLIENTS * 8 {
        let (engine, fake) = (engine.clone(), fake.clone());
        let root = worktree.path().join(format!("worker-{worker}"));
        workers.spawn(async move {
            let mut phases = 0u64;
            while Instant::now() < deadline {
                let dir = root.join(phases.to_string());
                std::fs::create_dir_all(&dir).expect("run worktree");
                let run = engine.create_run(&SOLO, "BENCH", &dir).await.expect("run");
                // Every queued step is the same valid report, so it does not matter which of
                // the concurrent runs pops which.
                fake.script("coder", [Script::valid(valid_impl())]);
                engine
                    .execute_phase(run.id, &IMPLEMENT, "Bench.")
                    .await
                    .expect("phase");
                phases += 1;
            }
            phases
        });
    }
    let mut phases = 0;
    while let Some(done) = workers.join_next().await {
        phases += done.expect("worker");
    }
    let elapsed = started.elapsed().as_secs_f64();
    (
        (store.commits() - before) as f64 / elapsed,
        phases as f64 / elapsed,
    )
}

#[tokio::main]
async fn main() {
    let database = TestDatabase::migrated().await;
    let pool = phaseflow_pg::pool_options()
        .max_connections(CLIENTS as u32)
        .connect(database.url())
        .await
        .expect("pool");
    let store = Arc::new(PgStore::new(pool));
    println!("phaseflow throughput on PostgreSQL ({CLIENTS} connections, {SECONDS} s each)");
    let pgbench = pgbench_tps(database.url());
    match pgbench {
        Some(tps) => println!("{:<48} {tps:>9.0} tx/s", "pgbench -N"),
        None => println!("{:<48} (pgbench not available)", "pgbench -N"),
    }
    let commands = store_transitions(store.clone()).await;
    println!(
        "{:<48} {commands:>9.0} commits/s",
        "store commands of the happy path"
    );
    let (commits, phases) = engine_phases(store).await;
    println!(
        "{:<48} {commits:>9.0} commits/s   ({phases:.0} phases/s)",
        "whole phases through the engine"
    );
    if let Some(tps) = pgbench {
        println!(
            "{:<48} {:>9.0} %",
            "store commits / pgbench -N",
            100.0 * commands / tps
        );
    }
}
