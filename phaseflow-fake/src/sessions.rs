//! [`FakeSessions`]: a scripted [`SessionRuntime`] whose "agents" write artifacts on cue.
//!
//! Each role has a FIFO queue of [`Script`] steps. Every *new* dedup key delivered to a session
//! of that role pops the next step, which decides what the simulated agent does: write a valid,
//! schema-invalid or malformed artifact (whole, slowly in chunks, or by renaming a temp file into
//! place), write nothing, die, or refuse to be rebootstrapped. Steps can also make `send_prompt`
//! fail before the prompt gets through. An empty queue means "write nothing" and is recorded
//! (see [`FakeSessions::unscripted`]).
//!
//! Everything the engine asks is recorded — prompts with their outcome, lifecycle calls, artifact
//! writes — so tests can assert "exactly one delivery per dedup key" and friends. Clones share one
//! world (scripts, sessions, delivery memory and logs), so a test can drop its engine, build a new
//! one over a clone and "restart the orchestrator" against the same agents.
//!
//! ```
//! use std::sync::Arc;
//!
//! use phaseflow::envelope::EnvelopeContent;
//! use phaseflow::ids::{PhaseKey, RoleKey, RunId, SessionId};
//! use phaseflow::session::{Delivery, SessionRuntime, StartSession};
//! use phaseflow_fake::sessions::{FakeSessions, Script};
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> phaseflow::Result<()> {
//! let worktree = tempfile::tempdir().expect("tempdir");
//! let fake = FakeSessions::new();
//! fake.script(
//!     "planner",
//!     [Script::send_fails(1).then(Script::valid(json!({ "steps": ["write it"] })))],
//! );
//! // The engine would hold `Arc::new(fake.clone())` as its `Arc<dyn SessionRuntime>`.
//! let runtime: Arc<dyn SessionRuntime> = Arc::new(fake.clone());
//!
//! let run = RunId::new();
//! let session = SessionId::new();
//! runtime
//!     .start(&StartSession {
//!         id: session,
//!         run,
//!         role: RoleKey::new("planner"),
//!         worktree: worktree.path().to_path_buf(),
//!     })
//!     .await?;
//! let artifact = worktree.path().join("phaseflow/plan.json");
//! let envelope = EnvelopeContent {
//!     run,
//!     role: RoleKey::new("planner"),
//!     phase: PhaseKey::new("plan"),
//!     attempt: 1,
//!     artifact_path: artifact.display().to_string(),
//!     schema_id: "plan.schema.json".into(),
//!     instructions: "Plan TICKET-42.".into(),
//! }
//! .into_envelope();
//!
//! assert!(runtime.send_prompt(session, &envelope).await.is_err()); // scripted failure
//! assert_eq!(runtime.send_prompt(session, &envelope).await?, Delivery::Delivered);
//! assert_eq!(runtime.send_prompt(session, &envelope).await?, Delivery::AlreadyDelivered);
//!
//! fake.settle().await; // wait for the simulated agent to finish writing
//! let written: serde_json::Value =
//!     serde_json::from_slice(&std::fs::read(&artifact).expect("artifact")).expect("json");
//! assert_eq!(written, json!({ "steps": ["write it"] }));
//! assert_eq!(fake.delivery_count(&envelope.dedup_key), 1);
//! assert_eq!(fake.prompts().len(), 3);
//! fake.assert_no_duplicate_delivery();
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::io::{self, Write as _};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use phaseflow::envelope::PromptEnvelope;
use phaseflow::error::{Error, ErrorClass, ErrorCode, Result};
use phaseflow::ids::{DedupKey, PhaseKey, RoleKey, RunId, SessionId};
use phaseflow::session::{Delivery, Probe, SessionRuntime, StartSession};
use phaseflow::store::TranscriptChunk;
use serde_json::Value;
use tokio::task::{AbortHandle, JoinHandle};

/// What the simulated agent does with one prompt (one dedup key).
///
/// Build one with a constructor, then adjust it: `Script::valid(v).after(d)` delays the write,
/// `.in_chunks(n, gap)` writes slowly, `.via_rename()` writes a temp file and renames it into
/// place, `Script::send_fails(n).then(step)` fails `send_prompt` before behaving as `step`.
#[derive(Clone, Debug)]
pub struct Script {
    send: Failures,
    agent: Agent,
}

impl Script {
    /// Writes `value` (pretty-printed JSON) to the envelope's artifact path.
    pub fn valid(value: Value) -> Self {
        Self::raw(format!("{value:#}"))
    }

    /// Writes JSON that parses but that the phase's schema should reject. To the fake this is the
    /// same as [`Script::valid`]; the name says what the test means.
    pub fn schema_invalid(value: Value) -> Self {
        Self::valid(value)
    }

    /// Writes `text` verbatim, e.g. `{"oops"`, so that the artifact fails to parse.
    pub fn invalid_json(text: impl Into<String>) -> Self {
        Self::raw(text.into())
    }

    /// Writes `bytes` verbatim: non-UTF-8 or huge artifacts.
    pub fn raw(bytes: impl Into<Vec<u8>>) -> Self {
        Self::acting(Agent::Write(WriteStep {
            bytes: Bytes(bytes.into().into()),
            delay: Duration::ZERO,
            chunks: None,
            rename: false,
        }))
    }

    /// Receives the prompt and writes nothing, so the engine's artifact wait times out.
    pub fn nothing() -> Self {
        Self::acting(Agent::Nothing)
    }

    /// Receives the prompt, writes nothing and dies: [`SessionRuntime::probe`] then reports the
    /// session not alive until a successful `resume` or `rebootstrap` relaunches it.
    pub fn dead() -> Self {
        Self::acting(Agent::Dead)
    }

    /// Receives the prompt, writes nothing, and every later [`SessionRuntime::rebootstrap`] of
    /// the session fails with a recoverable `rebootstrap_failed` (until another prompt is
    /// delivered to it), so the engine's rebootstrap budget runs out.
    pub fn rebootstrap_fails() -> Self {
        Self::acting(Agent::RebootstrapFails)
    }

    /// `send_prompt` fails `times` times with a recoverable `prompt_send_failed`, then the prompt
    /// gets through and the agent writes nothing — chain [`Script::then`] to say what it does.
    /// Failures are counted per dedup key across calls.
    pub fn send_fails(times: u32) -> Self {
        Self {
            send: Failures {
                recoverable: times,
                fatal: false,
            },
            agent: Agent::Nothing,
        }
    }

    /// Every `send_prompt` of this dedup key fails with a fatal `prompt_send_failed`; nothing is
    /// ever delivered or written.
    pub fn send_fatal() -> Self {
        Self {
            send: Failures {
                recoverable: 0,
                fatal: true,
            },
            agent: Agent::Nothing,
        }
    }

    /// Keeps this step's send failures, then behaves as `next` (whose own send failures follow).
    pub fn then(self, next: Script) -> Self {
        Self {
            send: Failures {
                recoverable: self.send.recoverable.saturating_add(next.send.recoverable),
                fatal: self.send.fatal || next.send.fatal,
            },
            agent: next.agent,
        }
    }

    /// Waits `delay` after the delivery before starting to write. No effect on steps that write
    /// nothing.
    pub fn after(mut self, delay: Duration) -> Self {
        if let Agent::Write(step) = &mut self.agent {
            step.delay = delay;
        }
        self
    }

    /// Writes slowly: opens the file, writes `count` roughly equal chunks with `gap` between
    /// them, and only then closes it. No effect on steps that write nothing.
    pub fn in_chunks(mut self, count: usize, gap: Duration) -> Self {
        if let Agent::Write(step) = &mut self.agent {
            step.chunks = Some((count.max(1), gap));
        }
        self
    }

    /// Writes a temp file in the artifact's directory and renames it into place, as editors and
    /// careful agents do. No effect on steps that write nothing.
    pub fn via_rename(mut self) -> Self {
        if let Agent::Write(step) = &mut self.agent {
            step.rename = true;
        }
        self
    }

    fn acting(agent: Agent) -> Self {
        Self {
            send: Failures::default(),
            agent,
        }
    }
}

/// Scripted failures of one operation: `recoverable` more recoverable ones, then fatal ones
/// forever if `fatal`, else success.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Failures {
    recoverable: u32,
    fatal: bool,
}

impl Failures {
    /// Consumes the next scripted failure, if any.
    fn next(&mut self) -> Option<ErrorClass> {
        if self.recoverable > 0 {
            self.recoverable -= 1;
            Some(ErrorClass::Recoverable)
        } else if self.fatal {
            Some(ErrorClass::Fatal)
        } else {
            None
        }
    }
}

#[derive(Clone, Debug)]
enum Agent {
    Nothing,
    Write(WriteStep),
    Dead,
    RebootstrapFails,
}

#[derive(Clone, Debug)]
struct WriteStep {
    bytes: Bytes,
    delay: Duration,
    chunks: Option<(usize, Duration)>,
    rename: bool,
}

impl WriteStep {
    /// The byte ranges written one after another (one range unless chunked; none when empty,
    /// so an empty artifact is just opened and closed).
    fn ranges(&self) -> Vec<Range<usize>> {
        let len = self.bytes.0.len();
        let count = self.chunks.map_or(1, |(count, _)| count);
        let size = len.div_ceil(count).max(1);
        (0..len)
            .step_by(size)
            .map(|start| start..(start + size).min(len))
            .collect()
    }
}

/// Artifact content, shared cheaply between a script and its writer task.
#[derive(Clone)]
struct Bytes(Arc<[u8]>);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const PREVIEW: usize = 40;
        let preview = String::from_utf8_lossy(&self.0[..self.0.len().min(PREVIEW)]);
        let more = if self.0.len() > PREVIEW { "…" } else { "" };
        write!(f, "{} bytes {preview:?}{more}", self.0.len())
    }
}

/// How one `send_prompt` call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// The prompt reached the agent now.
    Delivered,
    /// The dedup key had been delivered before; nothing happened.
    AlreadyDelivered,
    /// The call returned an error (scripted, or an unknown / disposed session).
    Failed {
        /// The error's code.
        code: ErrorCode,
        /// The error's class.
        class: ErrorClass,
    },
}

/// One `send_prompt` call, as the fake saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptRecord {
    /// The session addressed.
    pub session: SessionId,
    /// The envelope's run.
    pub run: RunId,
    /// The envelope's role.
    pub role: RoleKey,
    /// The envelope's phase.
    pub phase: PhaseKey,
    /// The envelope's attempt.
    pub attempt: u32,
    /// The envelope's dedup key.
    pub dedup: DedupKey,
    /// Where the artifact was asked for.
    pub artifact_path: PathBuf,
    /// The envelope's instructions.
    pub instructions: String,
    /// How the call ended.
    pub outcome: SendOutcome,
    /// Delivered although the role's script queue was empty (so the agent wrote nothing).
    pub unscripted: bool,
}

/// A lifecycle call the engine made (prompts are in [`FakeSessions::prompts`]). Recorded
/// whether or not the call succeeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Call {
    /// [`SessionRuntime::start`].
    Start(SessionId),
    /// [`SessionRuntime::resume`].
    Resume(SessionId),
    /// [`SessionRuntime::probe`].
    Probe(SessionId),
    /// [`SessionRuntime::rebootstrap`].
    Rebootstrap(SessionId),
    /// [`SessionRuntime::dispose`].
    Dispose(SessionId),
}

/// An artifact the simulated agent finished writing (closed, or renamed into place).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenArtifact {
    /// The session whose agent wrote it.
    pub session: SessionId,
    /// The prompt it answered.
    pub dedup: DedupKey,
    /// The artifact path.
    pub path: PathBuf,
    /// How many bytes were written.
    pub bytes: usize,
}

/// A snapshot of one session the fake knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeSession {
    /// The id the engine chose.
    pub id: SessionId,
    /// The run.
    pub run: RunId,
    /// The role.
    pub role: RoleKey,
    /// The worktree it was started in.
    pub worktree: PathBuf,
    /// False after a [`Script::dead`] step, until a resume or rebootstrap succeeds.
    pub alive: bool,
    /// Disposed for good.
    pub disposed: bool,
}

/// A scripted, recording [`SessionRuntime`]. Cheap to clone; clones share one world.
///
/// See the [module docs](self) for an example.
#[derive(Clone, Default)]
pub struct FakeSessions {
    world: Arc<Mutex<World>>,
}

/// Scripting handle for one role, from [`FakeSessions::role`]. Every method applies at once.
#[derive(Debug)]
pub struct RoleScript<'a> {
    fake: &'a FakeSessions,
    role: RoleKey,
}

impl RoleScript<'_> {
    /// Appends a step to the role's queue.
    pub fn then(self, step: Script) -> Self {
        self.fake.script(self.role.clone(), [step]);
        self
    }

    /// The next `times` calls of `start` for this role fail with a recoverable
    /// `session_start_failed`; the session is not registered by a failed start.
    pub fn start_fails(self, times: u32) -> Self {
        self.fake
            .with_plan(&self.role, |plan| plan.start.recoverable = times);
        self
    }

    /// Every `start` for this role (after any recoverable failures) fails with a fatal
    /// `session_start_failed`.
    pub fn start_fails_fatally(self) -> Self {
        self.fake
            .with_plan(&self.role, |plan| plan.start.fatal = true);
        self
    }

    /// The next `times` calls of `resume` for sessions of this role fail with a recoverable
    /// `session_resume_failed`.
    pub fn resume_fails(self, times: u32) -> Self {
        self.fake
            .with_plan(&self.role, |plan| plan.resume.recoverable = times);
        self
    }

    /// Every `resume` for sessions of this role (after any recoverable failures) fails with a
    /// fatal `session_resume_failed`.
    pub fn resume_fails_fatally(self) -> Self {
        self.fake
            .with_plan(&self.role, |plan| plan.resume.fatal = true);
        self
    }
}

#[derive(Debug, Default)]
struct World {
    plans: HashMap<RoleKey, RolePlan>,
    sessions: HashMap<SessionId, SessionEntry>,
    /// The runtime's idempotency memory: dedup keys delivered so far.
    delivered: HashSet<DedupKey>,
    /// Steps popped for a dedup key whose sends are still failing.
    pending: HashMap<DedupKey, Script>,
    prompts: Vec<PromptRecord>,
    calls: Vec<Call>,
    writes: Vec<WrittenArtifact>,
    disposed: Vec<SessionId>,
    writers: Vec<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct RolePlan {
    steps: VecDeque<Script>,
    start: Failures,
    resume: Failures,
}

#[derive(Debug)]
struct SessionEntry {
    run: RunId,
    role: RoleKey,
    worktree: PathBuf,
    alive: bool,
    disposed: bool,
    rebootstrap_fails: bool,
    transcript: Vec<TranscriptChunk>,
    writers: Vec<AbortHandle>,
}

impl SessionEntry {
    fn append(&mut self, text: String) {
        let seq = self.transcript.len() as u64 + 1;
        self.transcript.push(TranscriptChunk { seq, text });
    }
}

impl World {
    /// The session, or `session_not_found` if it was never started (or was disposed, when
    /// `allow_disposed` is false).
    fn session(&mut self, id: SessionId, allow_disposed: bool) -> Result<&mut SessionEntry> {
        match self.sessions.get_mut(&id) {
            None => Err(Error::new(
                ErrorCode::SessionNotFound,
                format!("the fake runtime has no session {id}"),
            )
            .with_hint(
                "only a successful start() registers a session in FakeSessions; start it first, \
                 and share the world between engines by cloning the same FakeSessions",
            )),
            Some(entry) if entry.disposed && !allow_disposed => Err(Error::new(
                ErrorCode::SessionNotFound,
                format!("session {id} was disposed"),
            )
            .with_run(entry.run)
            .with_hint("a disposed session is gone for good; start a new session for the role")),
            Some(entry) => Ok(entry),
        }
    }

    fn plan(&mut self, role: &RoleKey) -> &mut RolePlan {
        self.plans.entry(role.clone()).or_default()
    }
}

impl FakeSessions {
    /// An empty world: no scripts, no sessions.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends steps to `role`'s queue; each new dedup key delivered to a session of the role
    /// pops the next one.
    pub fn script(
        &self,
        role: impl Into<RoleKey>,
        steps: impl IntoIterator<Item = Script>,
    ) -> &Self {
        let role = role.into();
        self.with_plan(&role, |plan| plan.steps.extend(steps));
        self
    }

    /// A handle to script `role` step by step and to make its `start` / `resume` fail.
    pub fn role(&self, role: impl Into<RoleKey>) -> RoleScript<'_> {
        RoleScript {
            fake: self,
            role: role.into(),
        }
    }

    /// How many scripted steps of `role` are still unused.
    pub fn remaining(&self, role: impl Into<RoleKey>) -> usize {
        self.world()
            .plans
            .get(&role.into())
            .map_or(0, |plan| plan.steps.len())
    }

    /// Panics, listing them, if any role still has unused steps: the test scripted more than
    /// the engine asked for.
    #[track_caller]
    pub fn assert_scripts_consumed(&self) {
        let world = self.world();
        let mut leftovers: Vec<String> = world
            .plans
            .iter()
            .filter(|(_, plan)| !plan.steps.is_empty())
            .map(|(role, plan)| {
                format!(
                    "  role {role}: {} unused step(s): {:?}",
                    plan.steps.len(),
                    plan.steps
                )
            })
            .collect();
        leftovers.sort();
        assert!(
            leftovers.is_empty(),
            "scripted steps were never used:\n{}",
            leftovers.join("\n")
        );
    }

    /// Every `send_prompt` call, in order, whatever its outcome.
    pub fn prompts(&self) -> Vec<PromptRecord> {
        self.world().prompts.clone()
    }

    /// The `send_prompt` calls that actually delivered a prompt.
    pub fn deliveries(&self) -> Vec<PromptRecord> {
        self.world()
            .prompts
            .iter()
            .filter(|record| record.outcome == SendOutcome::Delivered)
            .cloned()
            .collect()
    }

    /// How often the prompt with `dedup` was actually delivered (0 or 1 unless the runtime was
    /// told to [`forget_deliveries`](Self::forget_deliveries)).
    pub fn delivery_count(&self, dedup: &DedupKey) -> usize {
        self.world()
            .prompts
            .iter()
            .filter(|record| record.outcome == SendOutcome::Delivered && &record.dedup == dedup)
            .count()
    }

    /// Deliveries that found their role's script queue empty (the agent wrote nothing).
    pub fn unscripted(&self) -> Vec<PromptRecord> {
        self.deliveries()
            .into_iter()
            .filter(|record| record.unscripted)
            .collect()
    }

    /// Panics, listing them, if a dedup key was delivered more than once or one attempt of a
    /// phase (run, phase, attempt) was delivered under more than one dedup key — the agent
    /// would then have been prompted twice for the same work.
    #[track_caller]
    pub fn assert_no_duplicate_delivery(&self) {
        let deliveries = self.deliveries();
        let mut by_key: BTreeMap<&DedupKey, Vec<&PromptRecord>> = BTreeMap::new();
        let mut by_attempt: BTreeMap<(RunId, &PhaseKey, u32), Vec<&DedupKey>> = BTreeMap::new();
        for record in &deliveries {
            by_key.entry(&record.dedup).or_default().push(record);
            let keys = by_attempt
                .entry((record.run, &record.phase, record.attempt))
                .or_default();
            if !keys.contains(&&record.dedup) {
                keys.push(&record.dedup);
            }
        }
        let mut problems = Vec::new();
        for (dedup, records) in by_key.iter().filter(|(_, records)| records.len() > 1) {
            let first = records[0];
            problems.push(format!(
                "  dedup key {dedup} delivered {} times (run {}, phase {}, attempt {}, sessions {:?})",
                records.len(),
                first.run,
                first.phase,
                first.attempt,
                records.iter().map(|r| r.session.to_string()).collect::<Vec<_>>(),
            ));
        }
        for ((run, phase, attempt), keys) in by_attempt.iter().filter(|(_, keys)| keys.len() > 1) {
            problems.push(format!(
                "  run {run}, phase {phase}, attempt {attempt} delivered under {} dedup keys: {}",
                keys.len(),
                keys.iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            ));
        }
        assert!(
            problems.is_empty(),
            "duplicate prompt deliveries:\n{}",
            problems.join("\n")
        );
    }

    /// Every lifecycle call (start, resume, probe, rebootstrap, dispose), in order.
    pub fn calls(&self) -> Vec<Call> {
        self.world().calls.clone()
    }

    /// Sessions disposed so far, in the order of their first disposal.
    pub fn disposed(&self) -> Vec<SessionId> {
        self.world().disposed.clone()
    }

    /// Whether `session` was disposed.
    pub fn is_disposed(&self, session: SessionId) -> bool {
        self.world()
            .sessions
            .get(&session)
            .is_some_and(|entry| entry.disposed)
    }

    /// A snapshot of `session`, if it was ever started.
    pub fn session(&self, session: SessionId) -> Option<FakeSession> {
        self.world()
            .sessions
            .get(&session)
            .map(|entry| FakeSession {
                id: session,
                run: entry.run,
                role: entry.role.clone(),
                worktree: entry.worktree.clone(),
                alive: entry.alive,
                disposed: entry.disposed,
            })
    }

    /// Artifacts the simulated agents finished writing, in order of completion.
    pub fn writes(&self) -> Vec<WrittenArtifact> {
        self.world().writes.clone()
    }

    /// Makes the runtime forget which dedup keys it delivered (its idempotency memory), keeping
    /// every log: the next send of an old key is delivered again — and shows up in
    /// [`assert_no_duplicate_delivery`](Self::assert_no_duplicate_delivery). Simulates a backend
    /// that lost its state, to test that the engine does not lean on it needlessly.
    pub fn forget_deliveries(&self) {
        self.world().delivered.clear();
    }

    /// Waits until every simulated agent has finished (or stopped) writing, including writes
    /// started while waiting.
    pub async fn settle(&self) {
        loop {
            let writers = std::mem::take(&mut self.world().writers);
            if writers.is_empty() {
                return;
            }
            for writer in writers {
                // A writer aborted by `dispose` ends with a cancelled JoinError: that is the point.
                let _ = writer.await;
            }
        }
    }

    fn world(&self) -> MutexGuard<'_, World> {
        // A test that panicked while holding the lock leaves the logs readable, not poisoned.
        self.world.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn with_plan(&self, role: &RoleKey, change: impl FnOnce(&mut RolePlan)) {
        change(self.world().plan(role));
    }

    fn record_prompt(
        world: &mut World,
        session: SessionId,
        envelope: &PromptEnvelope,
        outcome: SendOutcome,
        unscripted: bool,
    ) {
        world.prompts.push(PromptRecord {
            session,
            run: envelope.run,
            role: envelope.role.clone(),
            phase: envelope.phase.clone(),
            attempt: envelope.attempt,
            dedup: envelope.dedup_key.clone(),
            artifact_path: PathBuf::from(&envelope.artifact_path),
            instructions: envelope.instructions.clone(),
            outcome,
            unscripted,
        });
    }

    /// Starts the simulated agent's write in the background, like a real agent that keeps
    /// working after the prompt was accepted.
    fn spawn_writer(
        &self,
        world: &mut World,
        session: SessionId,
        dedup: DedupKey,
        path: PathBuf,
        step: WriteStep,
    ) {
        let shared = self.clone();
        let writer = tokio::spawn(async move {
            let result = write_artifact(&shared, session, &path, &step).await;
            let mut world = shared.world();
            let Some(entry) = world.sessions.get_mut(&session) else {
                return;
            };
            match result {
                Ok(Written::Done(bytes)) => {
                    entry.append(format!("wrote {} ({bytes} bytes)", path.display()));
                    world.writes.push(WrittenArtifact {
                        session,
                        dedup,
                        path,
                        bytes,
                    });
                }
                Ok(Written::Stopped) => {
                    tracing::debug!(%session, path = %path.display(), "session disposed; write stopped");
                }
                Err(error) => {
                    tracing::warn!(%session, path = %path.display(), %error, "fake agent could not write its artifact");
                    entry.append(format!("write to {} failed: {error}", path.display()));
                }
            }
        });
        if let Some(entry) = world.sessions.get_mut(&session) {
            entry.writers.retain(|handle| !handle.is_finished());
            entry.writers.push(writer.abort_handle());
        }
        world.writers.push(writer);
    }

    fn failure(code: ErrorCode, class: ErrorClass, message: String, hint: &str) -> Error {
        Error::new(code, message).with_class(class).with_hint(hint)
    }
}

impl fmt::Debug for FakeSessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let world = self.world();
        f.debug_struct("FakeSessions")
            .field("sessions", &world.sessions.len())
            .field("prompts", &world.prompts.len())
            .field("delivered", &world.delivered.len())
            .field("writes", &world.writes.len())
            .field("pending_writers", &world.writers.len())
            .finish()
    }
}

#[async_trait]
impl SessionRuntime for FakeSessions {
    async fn start(&self, request: &StartSession) -> Result<()> {
        let mut world = self.world();
        world.calls.push(Call::Start(request.id));
        if world.sessions.contains_key(&request.id) {
            // Starting a known id again is a no-op, unless it was disposed for good.
            return world.session(request.id, false).map(|_| ());
        }
        if let Some(class) = world.plan(&request.role).start.next() {
            return Err(Self::failure(
                ErrorCode::SessionStartFailed,
                class,
                format!("scripted: starting a {} session failed", request.role),
                "scripted by FakeSessions::role(..).start_fails*",
            )
            .with_run(request.run));
        }
        world.sessions.insert(
            request.id,
            SessionEntry {
                run: request.run,
                role: request.role.clone(),
                worktree: request.worktree.clone(),
                alive: true,
                disposed: false,
                rebootstrap_fails: false,
                transcript: Vec::new(),
                writers: Vec::new(),
            },
        );
        Ok(())
    }

    async fn resume(&self, session: SessionId) -> Result<()> {
        let mut world = self.world();
        world.calls.push(Call::Resume(session));
        let role = world.session(session, false)?.role.clone();
        if let Some(class) = world.plan(&role).resume.next() {
            return Err(Self::failure(
                ErrorCode::SessionResumeFailed,
                class,
                format!("scripted: resuming {role} session {session} failed"),
                "scripted by FakeSessions::role(..).resume_fails*",
            ));
        }
        world.session(session, false)?.alive = true;
        Ok(())
    }

    async fn send_prompt(&self, session: SessionId, envelope: &PromptEnvelope) -> Result<Delivery> {
        let mut world = self.world();
        let role = match world.session(session, false) {
            Ok(entry) => entry.role.clone(),
            Err(error) => {
                let outcome = SendOutcome::Failed {
                    code: error.code(),
                    class: error.class(),
                };
                Self::record_prompt(&mut world, session, envelope, outcome, false);
                return Err(error);
            }
        };
        let dedup = &envelope.dedup_key;
        if world.delivered.contains(dedup) {
            Self::record_prompt(
                &mut world,
                session,
                envelope,
                SendOutcome::AlreadyDelivered,
                false,
            );
            return Ok(Delivery::AlreadyDelivered);
        }

        let (mut step, unscripted) = match world.pending.remove(dedup) {
            Some(step) => (step, false),
            None => match world.plan(&role).steps.pop_front() {
                Some(step) => (step, false),
                None => {
                    tracing::warn!(%session, %role, %dedup, "no scripted step left; the fake agent writes nothing");
                    (Script::nothing(), true)
                }
            },
        };
        if let Some(class) = step.send.next() {
            world.pending.insert(dedup.clone(), step);
            let outcome = SendOutcome::Failed {
                code: ErrorCode::PromptSendFailed,
                class,
            };
            Self::record_prompt(&mut world, session, envelope, outcome, false);
            return Err(Self::failure(
                ErrorCode::PromptSendFailed,
                class,
                format!("scripted: sending prompt {dedup} to session {session} failed"),
                "scripted by Script::send_fails / Script::send_fatal",
            )
            .in_phase(envelope.run, &envelope.phase));
        }

        world.delivered.insert(dedup.clone());
        Self::record_prompt(
            &mut world,
            session,
            envelope,
            SendOutcome::Delivered,
            unscripted,
        );
        let entry = world.session(session, false)?;
        let first_line = envelope.instructions.lines().next().unwrap_or_default();
        entry.append(format!(
            "prompt {dedup} attempt {}: {first_line}",
            envelope.attempt
        ));
        entry.rebootstrap_fails = false;
        match step.agent {
            Agent::Nothing => {}
            Agent::Dead => entry.alive = false,
            Agent::RebootstrapFails => entry.rebootstrap_fails = true,
            Agent::Write(write) => {
                let path = PathBuf::from(&envelope.artifact_path);
                self.spawn_writer(&mut world, session, dedup.clone(), path, write);
            }
        }
        Ok(Delivery::Delivered)
    }

    async fn probe(&self, session: SessionId) -> Result<Probe> {
        let mut world = self.world();
        world.calls.push(Call::Probe(session));
        let entry = world.session(session, true)?;
        let alive = entry.alive && !entry.disposed;
        Ok(Probe {
            alive,
            pane_active: alive,
        })
    }

    async fn rebootstrap(&self, session: SessionId) -> Result<()> {
        let mut world = self.world();
        world.calls.push(Call::Rebootstrap(session));
        let entry = world.session(session, false)?;
        if entry.rebootstrap_fails {
            let run = entry.run;
            return Err(Self::failure(
                ErrorCode::RebootstrapFailed,
                ErrorClass::Recoverable,
                format!("scripted: rebootstrapping session {session} failed"),
                "scripted by Script::rebootstrap_fails",
            )
            .with_run(run));
        }
        entry.alive = true;
        Ok(())
    }

    async fn dispose(&self, session: SessionId) -> Result<()> {
        let mut world = self.world();
        world.calls.push(Call::Dispose(session));
        let entry = world.session(session, true)?;
        if entry.disposed {
            return Ok(());
        }
        entry.disposed = true;
        entry.alive = false;
        for writer in entry.writers.drain(..) {
            writer.abort();
        }
        world.disposed.push(session);
        Ok(())
    }

    async fn capture(&self, session: SessionId, from_seq: u64) -> Result<Vec<TranscriptChunk>> {
        let mut world = self.world();
        let entry = world.session(session, true)?;
        Ok(entry
            .transcript
            .iter()
            .filter(|chunk| chunk.seq > from_seq)
            .cloned()
            .collect())
    }
}

enum Written {
    Done(usize),
    Stopped,
}

/// Writes like an agent: open, write (in chunks, with gaps), close; optionally into a temp file
/// renamed into place afterwards. Stops early once the session is disposed.
async fn write_artifact(
    fake: &FakeSessions,
    session: SessionId,
    path: &Path,
    step: &WriteStep,
) -> io::Result<Written> {
    let live = || {
        fake.world()
            .sessions
            .get(&session)
            .is_some_and(|entry| !entry.disposed)
    };
    if !step.delay.is_zero() {
        tokio::time::sleep(step.delay).await;
    }
    if !live() {
        return Ok(Written::Stopped);
    }
    let target = if step.rename {
        let name = path
            .file_name()
            .map_or_else(|| "artifact".into(), |name| name.to_string_lossy());
        path.with_file_name(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()))
    } else {
        path.to_path_buf()
    };

    let opened = target.clone();
    let mut file = blocking(move || {
        if let Some(dir) = opened.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&opened)
    })
    .await?;
    let gap = step.chunks.map_or(Duration::ZERO, |(_, gap)| gap);
    for (i, range) in step.ranges().into_iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(gap).await;
            if !live() {
                drop(file);
                if step.rename {
                    let _ = std::fs::remove_file(&target);
                }
                return Ok(Written::Stopped);
            }
        }
        let bytes = step.bytes.clone();
        file = blocking(move || {
            file.write_all(&bytes.0[range])?;
            Ok(file)
        })
        .await?;
    }
    // Closing is what a watcher sees as "done writing".
    blocking(move || {
        drop(file);
        Ok(())
    })
    .await?;
    if step.rename {
        let (from, to) = (target, path.to_path_buf());
        blocking(move || std::fs::rename(from, to)).await?;
    }
    Ok(Written::Done(step.bytes.0.len()))
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(io::Error::other)?
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use phaseflow::envelope::EnvelopeContent;
    use serde_json::json;

    use super::*;

    struct Fixture {
        fake: FakeSessions,
        dir: tempfile::TempDir,
        run: RunId,
        session: SessionId,
    }

    impl Fixture {
        async fn new(role: &str) -> Self {
            let fake = FakeSessions::new();
            let dir = tempfile::tempdir().unwrap();
            let run = RunId::new();
            let session = SessionId::new();
            fake.start(&StartSession {
                id: session,
                run,
                role: RoleKey::new(role),
                worktree: dir.path().to_path_buf(),
            })
            .await
            .unwrap();
            Self {
                fake,
                dir,
                run,
                session,
            }
        }

        fn artifact(&self) -> PathBuf {
            self.dir.path().join("phaseflow/plan.json")
        }

        fn envelope(&self, role: &str, attempt: u32, instructions: &str) -> PromptEnvelope {
            EnvelopeContent {
                run: self.run,
                role: RoleKey::new(role),
                phase: PhaseKey::new("plan"),
                attempt,
                artifact_path: self.artifact().display().to_string(),
                schema_id: "plan.schema.json".into(),
                instructions: instructions.into(),
            }
            .into_envelope()
        }

        async fn send(&self, envelope: &PromptEnvelope) -> Result<Delivery> {
            self.fake.send_prompt(self.session, envelope).await
        }
    }

    fn outcomes(fake: &FakeSessions) -> Vec<SendOutcome> {
        fake.prompts().into_iter().map(|p| p.outcome).collect()
    }

    const RECOVERABLE_SEND: SendOutcome = SendOutcome::Failed {
        code: ErrorCode::PromptSendFailed,
        class: ErrorClass::Recoverable,
    };

    #[tokio::test]
    async fn a_dedup_key_is_delivered_and_written_once() {
        let fx = Fixture::new("planner").await;
        fx.fake.script(
            "planner",
            [
                Script::valid(json!({"a": 1})),
                Script::valid(json!({"b": 2})),
            ],
        );
        let envelope = fx.envelope("planner", 1, "plan it");

        assert_eq!(fx.send(&envelope).await.unwrap(), Delivery::Delivered);
        let rebuilt = fx.envelope("planner", 1, "plan it"); // new uuid, same dedup key
        assert_eq!(fx.send(&rebuilt).await.unwrap(), Delivery::AlreadyDelivered);
        fx.fake.settle().await;

        assert_eq!(
            outcomes(&fx.fake),
            [SendOutcome::Delivered, SendOutcome::AlreadyDelivered]
        );
        assert_eq!(fx.fake.delivery_count(&envelope.dedup_key), 1);
        assert_eq!(fx.fake.writes().len(), 1);
        assert_eq!(
            fx.fake.remaining("planner"),
            1,
            "the second step is still queued"
        );
        let written: Value =
            serde_json::from_slice(&std::fs::read(fx.artifact()).unwrap()).unwrap();
        assert_eq!(written, json!({"a": 1}));
        fx.fake.assert_no_duplicate_delivery();
    }

    #[tokio::test]
    async fn clones_share_delivery_memory_and_scripts() {
        let fx = Fixture::new("planner").await;
        fx.fake
            .script("planner", [Script::nothing(), Script::nothing()]);
        let envelope = fx.envelope("planner", 1, "plan it");
        fx.send(&envelope).await.unwrap();

        let restarted = fx.fake.clone();
        assert_eq!(
            restarted.send_prompt(fx.session, &envelope).await.unwrap(),
            Delivery::AlreadyDelivered
        );
        assert_eq!(restarted.remaining("planner"), 1);
        assert_eq!(fx.fake.prompts().len(), 2);
    }

    #[tokio::test]
    async fn recoverable_send_failures_count_down_then_the_step_runs() {
        let fx = Fixture::new("planner").await;
        fx.fake
            .role("planner")
            .then(Script::send_fails(2).then(Script::valid(json!({"ok": true}))))
            .then(Script::invalid_json(r#"{"oops""#));
        let envelope = fx.envelope("planner", 1, "plan it");

        for _ in 0..2 {
            let error = fx.send(&envelope).await.unwrap_err();
            assert_eq!(error.code(), ErrorCode::PromptSendFailed);
            assert!(error.is_recoverable());
        }
        assert_eq!(fx.send(&envelope).await.unwrap(), Delivery::Delivered);
        fx.fake.settle().await;

        assert_eq!(
            outcomes(&fx.fake),
            [RECOVERABLE_SEND, RECOVERABLE_SEND, SendOutcome::Delivered]
        );
        assert_eq!(fx.fake.deliveries().len(), 1);
        assert_eq!(
            serde_json::from_slice::<Value>(&std::fs::read(fx.artifact()).unwrap()).unwrap(),
            json!({"ok": true})
        );
        // The failures did not consume the next step: a new key gets the invalid JSON.
        assert_eq!(
            fx.send(&fx.envelope("planner", 2, "repair")).await.unwrap(),
            Delivery::Delivered
        );
        fx.fake.settle().await;
        assert_eq!(
            std::fs::read_to_string(fx.artifact()).unwrap(),
            r#"{"oops""#
        );
        fx.fake.assert_scripts_consumed();
    }

    #[tokio::test]
    async fn a_fatal_send_never_delivers_that_key() {
        let fx = Fixture::new("planner").await;
        fx.fake
            .script("planner", [Script::send_fatal(), Script::valid(json!({}))]);
        let envelope = fx.envelope("planner", 1, "plan it");

        for _ in 0..2 {
            let error = fx.send(&envelope).await.unwrap_err();
            assert_eq!(error.code(), ErrorCode::PromptSendFailed);
            assert_eq!(error.class(), ErrorClass::Fatal);
        }
        fx.fake.settle().await;
        assert!(fx.fake.deliveries().is_empty());
        assert!(!fx.artifact().exists());
        assert_eq!(fx.fake.remaining("planner"), 1);
    }

    #[tokio::test]
    async fn a_dead_session_probes_dead_until_rebootstrapped() {
        let fx = Fixture::new("planner").await;
        fx.fake.script("planner", [Script::dead()]);
        assert!(fx.fake.probe(fx.session).await.unwrap().is_usable());

        assert_eq!(
            fx.send(&fx.envelope("planner", 1, "plan it"))
                .await
                .unwrap(),
            Delivery::Delivered
        );
        fx.fake.settle().await;
        let probe = fx.fake.probe(fx.session).await.unwrap();
        assert!(!probe.alive && !probe.pane_active);
        assert!(fx.fake.writes().is_empty());

        fx.fake.rebootstrap(fx.session).await.unwrap();
        assert!(fx.fake.probe(fx.session).await.unwrap().alive);
        assert_eq!(
            fx.fake.calls(),
            [
                Call::Start(fx.session),
                Call::Probe(fx.session),
                Call::Probe(fx.session),
                Call::Rebootstrap(fx.session),
                Call::Probe(fx.session),
            ]
        );
    }

    #[tokio::test]
    async fn rebootstrap_keeps_failing_recoverably_until_the_next_prompt() {
        let fx = Fixture::new("planner").await;
        fx.fake
            .script("planner", [Script::rebootstrap_fails(), Script::nothing()]);
        fx.fake.rebootstrap(fx.session).await.unwrap();
        fx.send(&fx.envelope("planner", 1, "plan it"))
            .await
            .unwrap();

        for _ in 0..3 {
            let error = fx.fake.rebootstrap(fx.session).await.unwrap_err();
            assert_eq!(error.code(), ErrorCode::RebootstrapFailed);
            assert!(error.is_recoverable());
        }
        assert!(fx.fake.probe(fx.session).await.unwrap().alive);
        fx.send(&fx.envelope("planner", 2, "repair")).await.unwrap();
        fx.fake.rebootstrap(fx.session).await.unwrap();
        assert_eq!(
            fx.fake
                .calls()
                .iter()
                .filter(|c| **c == Call::Rebootstrap(fx.session))
                .count(),
            5
        );
    }

    #[tokio::test]
    async fn a_chunked_write_is_partial_for_a_while_then_complete() {
        let fx = Fixture::new("planner").await;
        let value = json!({"steps": ["one", "two", "three", "four"], "summary": "slowly"});
        let full = format!("{value:#}");
        fx.fake.script(
            "planner",
            [Script::valid(value).in_chunks(4, Duration::from_millis(100))],
        );
        fx.send(&fx.envelope("planner", 1, "plan it"))
            .await
            .unwrap();

        let deadline = Instant::now() + Duration::from_secs(5);
        let partial = loop {
            let seen = std::fs::read(fx.artifact()).unwrap_or_default();
            if !seen.is_empty() || Instant::now() > deadline {
                break seen;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        assert!(
            !partial.is_empty() && partial.len() < full.len(),
            "saw {} bytes",
            partial.len()
        );
        assert!(full.as_bytes().starts_with(&partial));
        assert!(
            fx.fake.writes().is_empty(),
            "not reported before the file is closed"
        );

        fx.fake.settle().await;
        assert_eq!(std::fs::read_to_string(fx.artifact()).unwrap(), full);
        assert_eq!(fx.fake.writes()[0].bytes, full.len());
    }

    #[tokio::test]
    async fn raw_bytes_can_be_renamed_into_place() {
        let fx = Fixture::new("planner").await;
        let bytes = vec![0xff, 0xfe, b'{', 0x80];
        fx.fake.script(
            "planner",
            [Script::raw(bytes.clone())
                .via_rename()
                .after(Duration::from_millis(5))],
        );
        fx.send(&fx.envelope("planner", 1, "plan it"))
            .await
            .unwrap();
        fx.fake.settle().await;

        assert_eq!(std::fs::read(fx.artifact()).unwrap(), bytes);
        let names: Vec<_> = std::fs::read_dir(fx.artifact().parent().unwrap())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["plan.json"], "no temp file left behind");
    }

    #[tokio::test]
    async fn capture_returns_chunks_after_the_given_seq() {
        let fx = Fixture::new("planner").await;
        fx.fake
            .script("planner", [Script::valid(json!({})), Script::nothing()]);
        let first = fx.envelope("planner", 1, "Plan TICKET-42.\nDetails follow.");
        fx.send(&first).await.unwrap();
        fx.fake.settle().await;

        let chunks = fx.fake.capture(fx.session, 0).await.unwrap();
        assert_eq!(chunks.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(
            chunks[0].text,
            format!("prompt {} attempt 1: Plan TICKET-42.", first.dedup_key)
        );
        assert_eq!(
            chunks[1].text,
            format!("wrote {} (2 bytes)", fx.artifact().display())
        );
        assert!(fx.fake.capture(fx.session, 2).await.unwrap().is_empty());

        let second = fx.envelope("planner", 2, "Repair it.");
        fx.send(&second).await.unwrap();
        let later = fx.fake.capture(fx.session, 2).await.unwrap();
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].seq, 3);
        assert_eq!(
            later[0].text,
            format!("prompt {} attempt 2: Repair it.", second.dedup_key)
        );
    }

    #[tokio::test]
    async fn unknown_sessions_are_fatal_session_not_found_with_a_hint() {
        let fx = Fixture::new("planner").await;
        let stranger = SessionId::new();
        let envelope = fx.envelope("planner", 1, "plan it");

        let errors = [
            fx.fake.send_prompt(stranger, &envelope).await.unwrap_err(),
            fx.fake.probe(stranger).await.unwrap_err(),
            fx.fake.resume(stranger).await.unwrap_err(),
            fx.fake.rebootstrap(stranger).await.unwrap_err(),
            fx.fake.dispose(stranger).await.unwrap_err(),
            fx.fake.capture(stranger, 0).await.unwrap_err(),
        ];
        for error in errors {
            assert_eq!(error.code(), ErrorCode::SessionNotFound);
            assert_eq!(error.class(), ErrorClass::Fatal);
            assert!(
                error.hint().is_some_and(|hint| hint.contains("start")),
                "{error}"
            );
        }
        assert_eq!(
            outcomes(&fx.fake),
            [SendOutcome::Failed {
                code: ErrorCode::SessionNotFound,
                class: ErrorClass::Fatal
            }]
        );
        assert_eq!(fx.fake.delivery_count(&envelope.dedup_key), 0);
    }

    #[tokio::test]
    async fn dispose_stops_pending_writes_and_later_prompts() {
        let fx = Fixture::new("planner").await;
        fx.fake.script(
            "planner",
            [Script::valid(json!({})).after(Duration::from_millis(50))],
        );
        fx.send(&fx.envelope("planner", 1, "plan it"))
            .await
            .unwrap();

        fx.fake.dispose(fx.session).await.unwrap();
        fx.fake.dispose(fx.session).await.unwrap();
        fx.fake.settle().await;
        tokio::time::sleep(Duration::from_millis(80)).await;

        assert!(!fx.artifact().exists());
        assert!(fx.fake.writes().is_empty());
        assert!(fx.fake.is_disposed(fx.session));
        assert_eq!(fx.fake.disposed(), [fx.session]);
        assert!(!fx.fake.probe(fx.session).await.unwrap().alive);
        let error = fx
            .send(&fx.envelope("planner", 2, "again"))
            .await
            .unwrap_err();
        assert_eq!(error.code(), ErrorCode::SessionNotFound);
    }

    #[tokio::test]
    async fn an_empty_queue_delivers_and_writes_nothing_but_says_so() {
        let fx = Fixture::new("planner").await;
        assert_eq!(
            fx.send(&fx.envelope("planner", 1, "plan it"))
                .await
                .unwrap(),
            Delivery::Delivered
        );
        fx.fake.settle().await;
        assert_eq!(fx.fake.unscripted().len(), 1);
        assert!(fx.fake.writes().is_empty());
    }

    #[tokio::test]
    async fn start_and_resume_fail_as_scripted_per_role() {
        let fake = FakeSessions::new();
        fake.role("coder")
            .start_fails(1)
            .resume_fails(1)
            .resume_fails_fatally();
        fake.role("reviewer").start_fails_fatally();
        let request = |role: &str| StartSession {
            id: SessionId::new(),
            run: RunId::new(),
            role: RoleKey::new(role),
            worktree: PathBuf::from("/tmp/tree"),
        };

        let coder = request("coder");
        let error = fake.start(&coder).await.unwrap_err();
        assert_eq!(
            (error.code(), error.class()),
            (ErrorCode::SessionStartFailed, ErrorClass::Recoverable)
        );
        assert!(
            fake.session(coder.id).is_none(),
            "a failed start registers nothing"
        );
        fake.start(&coder).await.unwrap();
        assert_eq!(
            fake.session(coder.id).unwrap().worktree,
            PathBuf::from("/tmp/tree")
        );

        let error = fake.resume(coder.id).await.unwrap_err();
        assert_eq!(
            (error.code(), error.class()),
            (ErrorCode::SessionResumeFailed, ErrorClass::Recoverable)
        );
        let error = fake.resume(coder.id).await.unwrap_err();
        assert_eq!(error.class(), ErrorClass::Fatal);

        let error = fake.start(&request("reviewer")).await.unwrap_err();
        assert_eq!(
            (error.code(), error.class()),
            (ErrorCode::SessionStartFailed, ErrorClass::Fatal)
        );
        fake.start(&request("planner")).await.unwrap();
    }

    #[tokio::test]
    #[should_panic(expected = "delivered 2 times")]
    async fn a_runtime_that_forgot_its_deliveries_exposes_a_resend() {
        let fx = Fixture::new("planner").await;
        let envelope = fx.envelope("planner", 1, "plan it");
        fx.send(&envelope).await.unwrap();
        fx.fake.forget_deliveries();
        assert_eq!(fx.send(&envelope).await.unwrap(), Delivery::Delivered);
        fx.fake.assert_no_duplicate_delivery();
    }

    #[tokio::test]
    #[should_panic(expected = "attempt 1 delivered under 2 dedup keys")]
    async fn one_attempt_prompted_under_two_keys_is_a_duplicate() {
        let fx = Fixture::new("planner").await;
        fx.send(&fx.envelope("planner", 1, "plan it at 10:00"))
            .await
            .unwrap();
        fx.send(&fx.envelope("planner", 1, "plan it at 10:01"))
            .await
            .unwrap();
        fx.fake.assert_no_duplicate_delivery();
    }
}
