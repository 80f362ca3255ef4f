//! The orchestrator processes of the crash-recovery example and of the process-kill test.
//!
//! The parent creates a run of [`Hotfix`] in PostgreSQL and starts an orchestrator: the same
//! program re-executed with [`ORCHESTRATOR_FLAG`] and an [`OrchestratorTask`]. Every orchestrator
//! does the same thing — [`Engine::resume`] the run and drive it to the end — so the first one
//! starts the `implement` phase and the one started after it was killed continues wherever the
//! store says the run stands. Their agents are [`JournaledAgents`] in the worktree, which outlive
//! the orchestrator and remember every prompt they received.

use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use phaseflow::envelope::PromptEnvelope;
use phaseflow::error::{Error, ErrorCode, Result};
use phaseflow::ids::{PhaseKey, RunId, SessionId};
use phaseflow::prelude::*;
use phaseflow::session::{Delivery, Probe, SessionRuntime, StartSession};
use phaseflow::state::PhaseState;
use phaseflow::store::{Store, TranscriptChunk, phase_of};
use phaseflow::typestate::InWorkflow;
use phaseflow::{PhaseOutcome, RunStatus};
use phaseflow_pg::PgStore;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::agents::{AgentStep, JournaledAgents};

/// The coder's report (`schemas/impl.schema.json`).
#[derive(Debug, Deserialize)]
pub struct ImplReport {
    /// Files the change touched.
    pub changed_files: Vec<String>,
    /// Whether the tests passed afterwards.
    pub tests_passed: bool,
    /// Anything the reviewer should know.
    pub notes: String,
}

/// The reviewer's verdict (`schemas/review.schema.json`).
#[derive(Debug, Deserialize)]
pub struct ReviewDoc {
    /// `approve` or `request_changes`.
    pub verdict: String,
    /// Remarks.
    pub comments: Vec<String>,
}

/// The coder implements the fix.
#[derive(Debug, Phase)]
#[phase(
    key = "implement",
    role = "coder",
    artifact = "phaseflow/impl.json",
    schema = "schemas/impl.schema.json",
    output = ImplReport
)]
pub struct Implement;

/// The reviewer reviews it.
#[derive(Debug, Phase)]
#[phase(
    key = "review",
    role = "reviewer",
    artifact = "phaseflow/review.json",
    schema = "schemas/review.schema.json",
    output = ReviewDoc
)]
pub struct Review;

/// Implement, then review; no gate, so a resumed run goes to the end unattended.
#[derive(Debug, Workflow)]
#[workflow(name = "hotfix", phases(Implement, Review))]
pub struct Hotfix;

/// The instructions of the `implement` phase.
pub const IMPLEMENT_PROMPT: &str = "Fix TICKET-7: the retry loop in src/fetch.rs never gives up.";
/// The instructions of the `review` phase.
pub const REVIEW_PROMPT: &str = "Review the fix for TICKET-7.";

/// The first argument that makes a program an orchestrator child ([`child_main`]).
pub const ORCHESTRATOR_FLAG: &str = "--phaseflow-orchestrator";

/// What one orchestrator process does; passed to it as JSON after [`ORCHESTRATOR_FLAG`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrchestratorTask {
    /// The PostgreSQL database holding the run.
    pub database_url: String,
    /// The run to drive.
    pub run: RunId,
    /// The agents' directory (shared by every orchestrator of the run).
    pub agents_dir: PathBuf,
    /// How long the coder works on its first prompt before writing the report.
    pub coder_work: Duration,
    /// If set, the coder does not start working before this file exists.
    pub coder_hold: Option<PathBuf>,
    /// Freeze right after a prompt reached an agent, before the engine records it: the window
    /// in which a crash leaves a delivered prompt that the store does not know was delivered.
    pub freeze_after_delivery: bool,
    /// Drive the run with the untyped [`Engine::resume_any`], as a tool that does not know the
    /// workflow type would, instead of [`Engine::resume`].
    pub untyped: bool,
}

impl OrchestratorTask {
    /// The agents every orchestrator of the run talks to.
    pub fn agents(&self) -> JournaledAgents {
        let mut report = AgentStep::writes(json!({
            "changed_files": ["src/fetch.rs", "tests/fetch_retry.rs"],
            "tests_passed": true,
            "notes": "Retries stop after 5 attempts with exponential backoff."
        }))
        .after(self.coder_work);
        if let Some(hold) = &self.coder_hold {
            report = report.held_by(hold);
        }
        JournaledAgents::new(&self.agents_dir)
            .script("coder", [report])
            .script(
                "reviewer",
                [AgentStep::writes(json!({
                    "verdict": "approve",
                    "comments": ["The backoff cap is tested."]
                }))],
            )
    }
}

/// The orchestrator's `main` when the program was started with [`ORCHESTRATOR_FLAG`]: `None`
/// otherwise, so a program calls it first and goes on with its own work when it returns `None`.
pub fn child_main() -> Option<ExitCode> {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some(ORCHESTRATOR_FLAG) {
        return None;
    }
    let task = match args
        .next()
        .map(|json| serde_json::from_str::<OrchestratorTask>(&json))
    {
        Some(Ok(task)) => task,
        Some(Err(error)) => {
            eprintln!("orchestrator: cannot read the task: {error}");
            return Some(ExitCode::from(2));
        }
        None => {
            eprintln!("orchestrator: {ORCHESTRATOR_FLAG} needs a task (JSON)");
            return Some(ExitCode::from(2));
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("orchestrator: cannot start tokio: {error}");
            return Some(ExitCode::FAILURE);
        }
    };
    Some(match runtime.block_on(orchestrate(&task)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            println!("failed: {error}");
            if let Some(hint) = error.hint() {
                println!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    })
}

/// Resumes the run from PostgreSQL and drives it to completion, saying what it does on stdout.
///
/// # Errors
/// Store and engine errors, and any state a hotfix run should not reach (a paused run).
pub async fn orchestrate(task: &OrchestratorTask) -> Result<()> {
    let store: Arc<dyn Store> = Arc::new(PgStore::connect(&task.database_url).await?);
    let agents = task.agents();
    let sessions: Arc<dyn SessionRuntime> = if task.freeze_after_delivery {
        Arc::new(FreezeAfterDelivery(agents))
    } else {
        Arc::new(agents)
    };
    let engine = Engine::new(store.clone(), sessions);
    let run = task.run;
    if task.untyped {
        return orchestrate_untyped(engine, run).await;
    }
    let review = match engine.resume::<Hotfix>(run).await? {
        HotfixState::Implement(PhaseAt::Ready(implement)) => {
            announce(store.as_ref(), run, &Implement::SPEC.key()).await?;
            let implemented = validated(implement.execute(IMPLEMENT_PROMPT).await?)?;
            let report: &ImplReport = implemented.output();
            println!(
                "implement: valid report, {} file(s) changed, tests passed: {}",
                report.changed_files.len(),
                report.tests_passed
            );
            implemented.complete()?
        }
        HotfixState::Review(PhaseAt::Ready(review)) => review,
        HotfixState::Completed(_) => {
            println!("run {run} is already completed");
            return Ok(());
        }
        other => return Err(unexpected(run, &format!("{other:?}"))),
    };
    announce(store.as_ref(), run, &Review::SPEC.key()).await?;
    let reviewed = validated(review.execute(REVIEW_PROMPT).await?)?;
    println!("review: verdict {}", reviewed.output().verdict);
    let done = reviewed.complete()?;
    println!("run {} completed", done.id());
    Ok(())
}

/// [`orchestrate`] through [`Engine::resume_any`]: no workflow type, only its registered spec.
async fn orchestrate_untyped(engine: Engine, run: RunId) -> Result<()> {
    let engine = engine.with_workflow(<Hotfix as Workflow>::SPEC);
    loop {
        let current = engine.store().run(run).await?.current_phase;
        if let Some(phase) = &current {
            announce(engine.store().as_ref(), run, phase).await?;
        }
        match engine.resume_any(run).await? {
            RunStatus::Ready { phase, .. } => {
                let instructions = if phase.key_str() == Implement::SPEC.key_str() {
                    IMPLEMENT_PROMPT
                } else {
                    REVIEW_PROMPT
                };
                let outcome = engine.execute_phase(run, &phase, instructions).await?;
                say_outcome(phase.key_str(), &outcome, run)?;
            }
            RunStatus::Resumed { phase, outcome, .. } => {
                say_outcome(phase.key_str(), &outcome, run)?;
            }
            RunStatus::Finished(record) => {
                println!("run {run} {}", record.state);
                return Ok(());
            }
            other => return Err(unexpected(run, &format!("{other:?}"))),
        }
    }
}

fn say_outcome(phase: &str, outcome: &PhaseOutcome, run: RunId) -> Result<()> {
    match outcome {
        PhaseOutcome::Completed { artifact, .. } => {
            println!("{phase}: valid artifact {}, phase completed", artifact.hash);
            Ok(())
        }
        other => Err(unexpected(run, &format!("{other:?}"))),
    }
}

/// Says which phase this orchestrator takes on and how the store left it.
async fn announce(store: &dyn Store, run: RunId, phase: &PhaseKey) -> Result<()> {
    let record = phase_of(store, run, phase).await?;
    match record.state {
        PhaseState::Pending => println!("{phase}: pending in the store; executing it"),
        state => println!(
            "{phase}: {state} at attempt {} in the store (the previous orchestrator stopped \
             mid-phase); continuing that attempt",
            record.attempts
        ),
    }
    Ok(())
}

fn validated<W: Workflow, P: InWorkflow<W>>(
    executed: Executed<W, P>,
) -> Result<Run<W, Validated<P>>> {
    match executed {
        Executed::Valid(run) => Ok(run),
        Executed::NeedsHuman(paused) => Err(unexpected(
            paused.id(),
            &format!("paused at a failure gate: {:?}", paused.error()),
        )),
    }
}

fn unexpected(run: RunId, state: &str) -> Error {
    Error::new(
        ErrorCode::PhaseStateMismatch,
        format!("hotfix run {run} is somewhere this example does not go: {state}"),
    )
    .with_run(run)
}

/// Delivers prompts through the inner runtime, then never returns from `send_prompt`: the
/// orchestrator freezes after the agent got the prompt and before the store recorded it.
#[derive(Debug)]
struct FreezeAfterDelivery(JournaledAgents);

#[async_trait]
impl SessionRuntime for FreezeAfterDelivery {
    async fn start(&self, request: &StartSession) -> Result<()> {
        self.0.start(request).await
    }

    async fn resume(&self, session: SessionId) -> Result<()> {
        self.0.resume(session).await
    }

    async fn send_prompt(&self, session: SessionId, envelope: &PromptEnvelope) -> Result<Delivery> {
        let delivery = self.0.send_prompt(session, envelope).await?;
        println!(
            "{}: prompt delivered; freezing before the store records it",
            envelope.phase
        );
        std::future::pending::<()>().await;
        Ok(delivery)
    }

    async fn probe(&self, session: SessionId) -> Result<Probe> {
        self.0.probe(session).await
    }

    async fn rebootstrap(&self, session: SessionId) -> Result<()> {
        self.0.rebootstrap(session).await
    }

    async fn dispose(&self, session: SessionId) -> Result<()> {
        self.0.dispose(session).await
    }

    async fn capture(&self, session: SessionId, from_seq: u64) -> Result<Vec<TranscriptChunk>> {
        self.0.capture(session, from_seq).await
    }
}

/// An orchestrator child process, its output forwarded line by line with a label.
#[derive(Debug)]
pub struct Orchestrator {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    forwarder: Option<JoinHandle<()>>,
}

impl Orchestrator {
    /// Starts `program` (a binary that calls [`child_main`] first) as an orchestrator for `task`.
    /// Each line it prints is printed here as `{label} │ line` and kept for [`Orchestrator::lines`].
    ///
    /// # Errors
    /// The process cannot be started.
    pub fn spawn(program: &Path, task: &OrchestratorTask, label: &str) -> io::Result<Self> {
        let task = serde_json::to_string(task).map_err(io::Error::other)?;
        let mut child = Command::new(program)
            .arg(ORCHESTRATOR_FLAG)
            .arg(task)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("the orchestrator's stdout was not captured"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let kept = lines.clone();
        let label = format!("{label} (pid {})", child.id());
        let forwarder = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(io::Result::ok) {
                println!("    {label} │ {line}");
                kept.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(line);
            }
        });
        Ok(Self {
            child,
            lines,
            forwarder: Some(forwarder),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process with SIGKILL (no chance to clean up, like a power cut or the OOM
    /// killer) and reaps it.
    ///
    /// # Errors
    /// The process could not be signalled or reaped.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        self.child.kill()?;
        let status = self.child.wait()?;
        self.finish_output();
        Ok(status)
    }

    /// Waits for the process to exit, killing it after `timeout`.
    ///
    /// # Errors
    /// The process could not be waited for, or outlived `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.finish_output();
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "orchestrator pid {} still ran after {timeout:?}",
                        self.pid()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every line the process printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn finish_output(&mut self) {
        if let Some(forwarder) = self.forwarder.take() {
            let _ = forwarder.join();
        }
    }
}

impl Drop for Orchestrator {
    /// An orchestrator handle dropped on an error path must not leave its process running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls the store until `phase` of `run` is in `state`, for at most `timeout`.
///
/// # Errors
/// Store errors, or `timeout` passed (the phase's last seen state is in the message).
pub async fn wait_for_phase(
    store: &dyn Store,
    run: RunId,
    phase: &PhaseKey,
    state: PhaseState,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = phase_of(store, run, phase).await?.state;
        if seen == state {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::new(
                ErrorCode::PhaseStateMismatch,
                format!("phase `{phase}` was still {seen}, not {state}, after {timeout:?}"),
            )
            .in_phase(run, phase));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
