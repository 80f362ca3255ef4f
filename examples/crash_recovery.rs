//! Crash recovery across processes: an orchestrator is killed with SIGKILL in the middle of a
//! phase, and a fresh process resumes the run from PostgreSQL without prompting the agent twice.
//!
//! ```sh
//! cargo run --example crash_recovery
//! ```
//!
//! Runs on `DATABASE_URL` when it is set, otherwise on a throwaway PostgreSQL cluster started
//! from the server binaries in `/usr/lib/postgresql/*/bin` or on `PATH` (no server needs to be
//! running). The agents are [`JournaledAgents`]: they work in their own processes and journal
//! every prompt they receive in the worktree, as a terminal agent's pane history would — so the
//! journal, not the orchestrator, says how often a prompt was delivered.

use std::collections::BTreeMap;
use std::error::Error;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phaseflow::event::EventKind;
use phaseflow::ids::DedupKey;
use phaseflow::prelude::*;
use phaseflow::state::PhaseState;
use phaseflow::store::Store;
use phaseflow_examples::agents::{JournalOutcome, JournaledAgents};
use phaseflow_examples::backend;
use phaseflow_examples::recovery::{
    self, Hotfix, Implement, Orchestrator, OrchestratorTask, wait_for_phase,
};
use phaseflow_examples::timeline::{Timeline, dedup_label};
use phaseflow_pg::PgStore;
use phaseflow_pg::testing::TestDatabase;

fn main() -> ExitCode {
    // The orchestrators below are this very program, started again with a task.
    if let Some(code) = recovery::child_main() {
        return code;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("start tokio");
    match runtime.block_on(demo()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("crash_recovery failed: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn demo() -> Result<(), Box<dyn Error>> {
    let clock = Instant::now();
    // With DATABASE_URL, that server; otherwise a throwaway cluster and a fresh database on it,
    // dropped at the end.
    let (database_url, throwaway) = match backend::database_url() {
        Some(url) => (url, None),
        None => {
            let database = TestDatabase::migrated().await;
            (database.url().to_owned(), Some(database))
        }
    };
    let pg = PgStore::connect(&database_url).await?;
    pg.migrate().await?;
    let store: Arc<dyn Store> = Arc::new(pg);
    println!("phaseflow crash_recovery");
    println!(
        "store: PostgreSQL ({})",
        if throwaway.is_some() {
            "a throwaway cluster; set DATABASE_URL to use your own server"
        } else {
            "DATABASE_URL"
        }
    );

    let worktree = tempfile::tempdir()?;
    let agents_dir = worktree.path().join(".agents");
    // The coder starts on its report only once this file exists, so that the kill below always
    // lands while the phase awaits the artifact, however slow the machine.
    let coder_may_work = worktree.path().join("coder-may-work");
    println!("worktree: {}", worktree.path().display());

    // This process only creates the run and watches the store; the orchestrators do the work.
    let engine = Engine::new(store.clone(), Arc::new(JournaledAgents::new(&agents_dir)));
    let run = engine
        .start::<Hotfix>(StartRun::new("TICKET-7", worktree.path()))
        .await?
        .id();
    println!("run {run}: workflow `hotfix` (implement → review)\n");
    let mut timeline = Timeline::new(store.clone(), run);

    let task = OrchestratorTask {
        database_url,
        run,
        agents_dir,
        coder_work: Duration::from_millis(500),
        coder_hold: Some(coder_may_work.clone()),
        freeze_after_delivery: false,
        untyped: false,
    };
    let program = std::env::current_exe()?;

    println!("▶ orchestrator 1 starts the run");
    let mut first = Orchestrator::spawn(&program, &task, "orchestrator 1")?;
    let first_pid = first.pid();
    let implement = Implement::SPEC.key();
    wait_for_phase(
        store.as_ref(),
        run,
        &implement,
        PhaseState::AwaitingArtifact,
        Duration::from_secs(30),
    )
    .await?;
    let status = first.kill()?;
    println!(
        "✖ SIGKILL to orchestrator 1 (pid {first_pid}) while `implement` awaited its artifact ({status})"
    );
    println!("  the event log in PostgreSQL so far:");
    timeline.print_new().await?;
    let journal = task.agents().journal();
    println!(
        "  the coder's journal: {} prompt(s) received",
        journal.entries()?.len()
    );
    std::fs::write(&coder_may_work, "")?;
    println!(
        "  the coder, held until now so that the kill lands mid-phase, works on its report \
         (0.5 s) in its own process; nobody waits for it\n"
    );

    println!("▶ orchestrator 2: a fresh process resumes the run from PostgreSQL");
    let mut second = Orchestrator::spawn(&program, &task, "orchestrator 2")?;
    let second_pid = second.pid();
    let status = second.wait(Duration::from_secs(60))?;
    if !status.success() {
        return Err(format!("orchestrator 2 failed ({status})").into());
    }
    println!("  the rest of the event log:");
    timeline.print_new().await?;

    // The proof: what the agents received, by their own journal, against the event log.
    println!(
        "\nprompts, by the agents' journal ({}):",
        journal.path().display()
    );
    let mut deliveries: BTreeMap<DedupKey, (String, Vec<u32>, usize)> = BTreeMap::new();
    for entry in journal.entries()? {
        let seen = deliveries.entry(entry.dedup.clone()).or_insert_with(|| {
            (
                format!("{} attempt {}", entry.phase, entry.attempt),
                vec![],
                0,
            )
        });
        match entry.outcome {
            JournalOutcome::Delivered => seen.1.push(entry.pid),
            JournalOutcome::AlreadyDelivered => seen.2 += 1,
        }
    }
    let events = store.events(run, 0).await?;
    let mut duplicated = false;
    for (dedup, (what, pids, acknowledged)) in &deliveries {
        let recorded = events
            .iter()
            .filter(|e| match &e.kind {
                EventKind::PromptSent { dedup: d, .. }
                | EventKind::PromptRepaired { dedup: d, .. } => d == dedup,
                _ => false,
            })
            .count();
        let by = pids
            .iter()
            .map(|pid| {
                let who = if *pid == first_pid {
                    "orchestrator 1"
                } else if *pid == second_pid {
                    "orchestrator 2"
                } else {
                    "another process"
                };
                format!("{who}, pid {pid}")
            })
            .collect::<Vec<_>>()
            .join("; ");
        println!(
            "  {} ({what}): delivered {}× ({by}), re-sends acknowledged without delivery: {acknowledged}, prompt.sent events: {recorded}",
            dedup_label(dedup),
            pids.len(),
        );
        duplicated |= pids.len() != 1 || recorded != 1;
    }
    if duplicated {
        return Err("a prompt was delivered or recorded more than once".into());
    }
    println!("✔ no prompt was delivered twice across the two orchestrator processes");

    let record = store.run(run).await?;
    println!("✔ run {run} is {}", record.state);
    for phase in ["implement", "review"] {
        if let Some(artifact) = store.latest_artifact(run, &phase.into()).await? {
            let content = artifact.content.unwrap_or_default();
            println!("\n{phase} artifact ({}):\n{content:#}", artifact.hash);
        }
    }
    println!("\nfinished in {} ms", clock.elapsed().as_millis());
    Ok(())
}
