//! [`JournaledAgents`]: a simulated terminal agent that, like a real one in a tmux pane, outlives
//! the orchestrator process that prompts it.
//!
//! A real agent remembers what it was asked — the prompt is in its pane's history — and keeps
//! working when the orchestrator dies. `FakeSessions` keeps both in the orchestrator's memory, so
//! a killed orchestrator takes its agents with it. `JournaledAgents` keeps them outside:
//!
//! - **Delivery memory**: every `send_prompt` call is appended to `journal.jsonl` in the agent
//!   directory (under an exclusive file lock, flushed to disk before the call returns), and a dedup
//!   key found there is acknowledged as [`Delivery::AlreadyDelivered`] without being delivered
//!   again — whichever process asks.
//! - **The work**: a delivered prompt starts a detached `sh` process that waits, then renames the
//!   scripted artifact into place. Killing the orchestrator does not stop it.
//! - **Sessions**: one small file per session, so a fresh process can resume a session another
//!   process started.
//!
//! The `n`-th prompt delivered to a role gets the role's `n`-th [`AgentStep`]; `n` is counted
//! from the journal, so every process built with the same script agrees on what comes next.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use phaseflow::envelope::PromptEnvelope;
use phaseflow::error::{Error, ErrorClass, ErrorCode, Result};
use phaseflow::ids::{DedupKey, PhaseKey, RoleKey, RunId, SessionId};
use phaseflow::session::{Delivery, Probe, SessionRuntime, StartSession};
use phaseflow::store::TranscriptChunk;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How long a held agent waits for its hold file before giving up (so that an abandoned demo
/// never leaves a process behind for long).
const HOLD_LIMIT: Duration = Duration::from_secs(60);

/// What the simulated agent does with one new prompt: write `artifact` to the prompt's artifact
/// path after working for a while.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentStep {
    artifact: Value,
    work: Duration,
    hold: Option<PathBuf>,
}

impl AgentStep {
    /// Writes `artifact` (pretty-printed JSON) as soon as the prompt arrives.
    pub fn writes(artifact: Value) -> Self {
        Self {
            artifact,
            work: Duration::ZERO,
            hold: None,
        }
    }

    /// Works for `work` before writing.
    pub fn after(mut self, work: Duration) -> Self {
        self.work = work;
        self
    }

    /// Does not start working until the file `hold` exists (at most a minute): lets a test keep
    /// the agent busy until it has killed the orchestrator.
    pub fn held_by(mut self, hold: impl Into<PathBuf>) -> Self {
        self.hold = Some(hold.into());
        self
    }
}

/// How a `send_prompt` call ended, as journaled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JournalOutcome {
    /// The prompt reached the agent with this call.
    Delivered,
    /// The dedup key was in the journal already; nothing reached the agent.
    AlreadyDelivered,
}

/// One `send_prompt` call, as the agent side journaled it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
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
    /// Delivered now, or acknowledged as delivered before.
    pub outcome: JournalOutcome,
    /// The process that called `send_prompt` (the orchestrator).
    pub pid: u32,
    /// The first line of the prompt's instructions.
    pub prompt: String,
}

/// The delivery journal of an agent directory, for reading.
#[derive(Clone, Debug)]
pub struct DeliveryJournal {
    path: PathBuf,
}

impl DeliveryJournal {
    /// The journal of the agents whose directory is `dir`.
    pub fn at(dir: impl AsRef<Path>) -> Self {
        Self {
            path: dir.as_ref().join("journal.jsonl"),
        }
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every journaled call, oldest first (none before the first prompt).
    ///
    /// # Errors
    /// The file cannot be read, or a line is not a journal entry.
    pub fn entries(&self) -> io::Result<Vec<JournalEntry>> {
        match File::open(&self.path) {
            Ok(file) => read_entries(&file),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(error) => Err(error),
        }
    }

    /// How many calls actually delivered the prompt with `dedup`.
    ///
    /// # Errors
    /// As [`DeliveryJournal::entries`].
    pub fn deliveries(&self, dedup: &DedupKey) -> io::Result<usize> {
        Ok(self
            .entries()?
            .iter()
            .filter(|e| &e.dedup == dedup && e.outcome == JournalOutcome::Delivered)
            .count())
    }
}

fn read_entries(file: &File) -> io::Result<Vec<JournalEntry>> {
    BufReader::new(file)
        .lines()
        .filter(|line| !line.as_ref().is_ok_and(|l| l.trim().is_empty()))
        .map(|line| serde_json::from_str(&line?).map_err(io::Error::other))
        .collect()
}

/// A session as stored in its file.
#[derive(Debug, Serialize, Deserialize)]
struct SessionFile {
    run: RunId,
    role: RoleKey,
    worktree: PathBuf,
    disposed: bool,
}

/// A [`SessionRuntime`] whose agents' memory and work live outside the orchestrator process.
/// See the [module docs](self).
#[derive(Clone)]
pub struct JournaledAgents {
    dir: PathBuf,
    script: Arc<HashMap<RoleKey, Vec<AgentStep>>>,
}

impl JournaledAgents {
    /// Agents keeping their journal, sessions and outbox in `dir` (created on first use). Every
    /// process that should see the same agents uses the same `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            script: Arc::default(),
        }
    }

    /// Sets what the agent of `role` does with its first, second, … new prompt. Prompts beyond
    /// the script are delivered and answered with nothing.
    pub fn script(
        mut self,
        role: impl Into<RoleKey>,
        steps: impl IntoIterator<Item = AgentStep>,
    ) -> Self {
        Arc::make_mut(&mut self.script).insert(role.into(), steps.into_iter().collect());
        self
    }

    /// The delivery journal.
    pub fn journal(&self) -> DeliveryJournal {
        DeliveryJournal::at(&self.dir)
    }

    fn session_path(&self, session: SessionId) -> PathBuf {
        self.dir.join("sessions").join(format!("{session}.json"))
    }

    fn read_session(&self, session: SessionId) -> Result<SessionFile> {
        let path = self.session_path(session);
        let bytes = fs::read(&path).map_err(|error| {
            let code = if error.kind() == io::ErrorKind::NotFound {
                ErrorCode::SessionNotFound
            } else {
                ErrorCode::SessionRuntime
            };
            Error::new(
                code,
                format!(
                    "cannot read session {session} at {}: {error}",
                    path.display()
                ),
            )
            .with_hint("start the session first; every process must use the same agent directory")
        })?;
        serde_json::from_slice(&bytes).map_err(|error| {
            Error::new(
                ErrorCode::SessionRuntime,
                format!("session file {} is damaged: {error}", path.display()),
            )
        })
    }

    fn write_session(&self, session: SessionId, file: &SessionFile) -> io::Result<()> {
        let path = self.session_path(session);
        fs::create_dir_all(path.parent().unwrap_or(&self.dir))?;
        let temp = path.with_extension("json.tmp");
        fs::write(&temp, serde_json::to_vec(file).map_err(io::Error::other)?)?;
        fs::rename(temp, path)
    }

    fn live_session(&self, session: SessionId) -> Result<SessionFile> {
        let file = self.read_session(session)?;
        if file.disposed {
            return Err(Error::new(
                ErrorCode::SessionNotFound,
                format!("session {session} was disposed"),
            )
            .with_run(file.run)
            .with_hint("a disposed session is gone for good; start a new one"));
        }
        Ok(file)
    }

    /// Journals the call under the journal's lock; returns the outcome and, for a delivery, the
    /// role's step for it.
    fn journal_call(
        &self,
        session: SessionId,
        envelope: &PromptEnvelope,
    ) -> io::Result<(JournalOutcome, Option<AgentStep>)> {
        fs::create_dir_all(&self.dir)?;
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(self.journal().path())?;
        // Exclusive across processes and across open files in this one: two orchestrators
        // racing on one prompt journal it once.
        file.lock()?;
        let entries = read_entries(&file)?;
        let delivered = |e: &&JournalEntry| e.outcome == JournalOutcome::Delivered;
        let outcome = if entries
            .iter()
            .filter(delivered)
            .any(|e| e.dedup == envelope.dedup_key)
        {
            JournalOutcome::AlreadyDelivered
        } else {
            JournalOutcome::Delivered
        };
        let entry = JournalEntry {
            session,
            run: envelope.run,
            role: envelope.role.clone(),
            phase: envelope.phase.clone(),
            attempt: envelope.attempt,
            dedup: envelope.dedup_key.clone(),
            outcome,
            pid: std::process::id(),
            prompt: envelope
                .instructions
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
        };
        let mut line = serde_json::to_vec(&entry).map_err(io::Error::other)?;
        line.push(b'\n');
        file.write_all(&line)?;
        file.sync_data()?;
        let step = match outcome {
            JournalOutcome::AlreadyDelivered => None,
            JournalOutcome::Delivered => {
                let earlier = entries
                    .iter()
                    .filter(delivered)
                    .filter(|e| e.role == envelope.role)
                    .count();
                self.script
                    .get(&envelope.role)
                    .and_then(|steps| steps.get(earlier))
                    .cloned()
            }
        };
        file.unlock()?;
        Ok((outcome, step))
    }

    /// Stages the artifact and starts the detached process that puts it in place.
    fn start_work(&self, envelope: &PromptEnvelope, step: &AgentStep) -> io::Result<()> {
        let outbox = self.dir.join("outbox");
        fs::create_dir_all(&outbox)?;
        let staged = outbox.join(format!("{}.json", envelope.dedup_key));
        fs::write(&staged, format!("{:#}\n", step.artifact))?;
        let polls = HOLD_LIMIT.as_millis() / 10;
        let script = format!(
            r#"i=0
while [ -n "$4" ] && [ ! -e "$4" ] && [ "$i" -lt {polls} ]; do sleep 0.01; i=$((i+1)); done
sleep "$1"
[ -e "$2" ] && mv -f "$2" "$3""#
        );
        let hold = step
            .hold
            .as_deref()
            .map(|p| p.as_os_str().to_owned())
            .unwrap_or_default();
        let mut agent = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("agent")
            .arg(format!("{:.3}", step.work.as_secs_f64()))
            .arg(&staged)
            .arg(&envelope.artifact_path)
            .arg(hold)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        // Reap it while this process lives; if this process is killed, init does.
        std::thread::spawn(move || agent.wait());
        Ok(())
    }
}

impl fmt::Debug for JournaledAgents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JournaledAgents")
            .field("dir", &self.dir)
            .field("roles", &self.script.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn runtime_error(code: ErrorCode, what: String, error: &io::Error) -> Error {
    Error::new(code, format!("{what}: {error}"))
        .with_class(ErrorClass::Recoverable)
        .with_hint("check that the agent directory is writable")
}

#[async_trait]
impl SessionRuntime for JournaledAgents {
    async fn start(&self, request: &StartSession) -> Result<()> {
        let file = SessionFile {
            run: request.run,
            role: request.role.clone(),
            worktree: request.worktree.clone(),
            disposed: false,
        };
        self.write_session(request.id, &file).map_err(|e| {
            runtime_error(
                ErrorCode::SessionStartFailed,
                format!("starting the {} session {}", request.role, request.id),
                &e,
            )
        })
    }

    async fn resume(&self, session: SessionId) -> Result<()> {
        self.live_session(session).map(drop)
    }

    async fn send_prompt(&self, session: SessionId, envelope: &PromptEnvelope) -> Result<Delivery> {
        self.live_session(session)?;
        let send_failed = |e: io::Error| {
            runtime_error(
                ErrorCode::PromptSendFailed,
                format!("sending prompt {} to session {session}", envelope.dedup_key),
                &e,
            )
        };
        let (outcome, step) = self.journal_call(session, envelope).map_err(send_failed)?;
        if let Some(step) = step {
            self.start_work(envelope, &step).map_err(send_failed)?;
        }
        Ok(match outcome {
            JournalOutcome::Delivered => Delivery::Delivered,
            JournalOutcome::AlreadyDelivered => Delivery::AlreadyDelivered,
        })
    }

    async fn probe(&self, session: SessionId) -> Result<Probe> {
        let usable = self.live_session(session).is_ok();
        Ok(Probe {
            alive: usable,
            pane_active: usable,
        })
    }

    async fn rebootstrap(&self, session: SessionId) -> Result<()> {
        self.live_session(session).map(drop)
    }

    async fn dispose(&self, session: SessionId) -> Result<()> {
        let mut file = self.read_session(session)?;
        file.disposed = true;
        self.write_session(session, &file).map_err(|e| {
            runtime_error(
                ErrorCode::SessionRuntime,
                format!("disposing session {session}"),
                &e,
            )
        })
    }

    async fn capture(&self, session: SessionId, from_seq: u64) -> Result<Vec<TranscriptChunk>> {
        self.read_session(session)?;
        let entries = self.journal().entries().map_err(|e| {
            runtime_error(
                ErrorCode::SessionRuntime,
                format!("reading the journal of session {session}"),
                &e,
            )
        })?;
        Ok(entries
            .into_iter()
            .filter(|e| e.session == session)
            .zip(1..)
            .filter(|(_, seq)| *seq > from_seq)
            .map(|(e, seq)| {
                let how = match e.outcome {
                    JournalOutcome::Delivered => "delivered",
                    JournalOutcome::AlreadyDelivered => "already delivered, not sent again",
                };
                TranscriptChunk {
                    seq,
                    text: format!(
                        "prompt {} attempt {}: {} ({how}; orchestrator pid {})",
                        e.dedup, e.attempt, e.prompt, e.pid
                    ),
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use phaseflow::envelope::EnvelopeContent;
    use serde_json::json;

    use super::*;

    /// The prompt of `attempt` of a run; rebuilding it gives a new uuid and the same dedup key.
    fn envelope(worktree: &Path, run: RunId, attempt: u32) -> PromptEnvelope {
        EnvelopeContent {
            run,
            role: RoleKey::new("coder"),
            phase: PhaseKey::new("implement"),
            attempt,
            artifact_path: worktree.join("impl.json").display().to_string(),
            schema_id: "impl.schema.json".into(),
            instructions: "Implement it.\nCarefully.".into(),
        }
        .into_envelope()
    }

    async fn started(agents: &JournaledAgents, worktree: &Path) -> SessionId {
        let id = SessionId::new();
        agents
            .start(&StartSession {
                id,
                run: RunId::new(),
                role: RoleKey::new("coder"),
                worktree: worktree.to_path_buf(),
            })
            .await
            .unwrap();
        id
    }

    #[tokio::test]
    async fn a_second_runtime_on_the_same_directory_does_not_deliver_again() {
        let worktree = tempfile::tempdir().unwrap();
        let run = RunId::new();
        let dir = worktree.path().join(".agents");
        let first =
            JournaledAgents::new(&dir).script("coder", [AgentStep::writes(json!({"a": 1}))]);
        let session = started(&first, worktree.path()).await;
        let prompt = envelope(worktree.path(), run, 1);

        assert_eq!(
            first.send_prompt(session, &prompt).await.unwrap(),
            Delivery::Delivered
        );
        // "Another process": a fresh runtime over the same directory, and a rebuilt envelope.
        let second = JournaledAgents::new(&dir);
        second.resume(session).await.unwrap();
        let again = envelope(worktree.path(), run, 1);
        assert_ne!(again.uuid, prompt.uuid);
        assert_eq!(
            second.send_prompt(session, &again).await.unwrap(),
            Delivery::AlreadyDelivered
        );

        let journal = first.journal();
        assert_eq!(journal.deliveries(&prompt.dedup_key).unwrap(), 1);
        let outcomes: Vec<_> = journal
            .entries()
            .unwrap()
            .iter()
            .map(|e| e.outcome)
            .collect();
        assert_eq!(
            outcomes,
            [JournalOutcome::Delivered, JournalOutcome::AlreadyDelivered]
        );
        let transcript = second.capture(session, 1).await.unwrap();
        assert_eq!(transcript.len(), 1);
        assert!(
            transcript[0].text.contains("already delivered"),
            "{transcript:?}"
        );
    }

    #[tokio::test]
    async fn the_agent_writes_in_its_own_process_after_the_hold_is_lifted() {
        let worktree = tempfile::tempdir().unwrap();
        let run = RunId::new();
        let hold = worktree.path().join("go");
        let agents = JournaledAgents::new(worktree.path().join(".agents")).script(
            "coder",
            [
                AgentStep::writes(json!({"n": 1})).held_by(&hold),
                AgentStep::writes(json!({"n": 2})),
            ],
        );
        let session = started(&agents, worktree.path()).await;
        let first = envelope(worktree.path(), run, 1);
        let artifact = PathBuf::from(&first.artifact_path);
        agents.send_prompt(session, &first).await.unwrap();

        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!artifact.exists(), "held: nothing written yet");
        fs::write(&hold, "").unwrap();
        let written = wait_for_json(&artifact).await;
        assert_eq!(written, json!({"n": 1}));

        fs::remove_file(&artifact).unwrap();
        agents
            .send_prompt(session, &envelope(worktree.path(), run, 2))
            .await
            .unwrap();
        assert_eq!(
            wait_for_json(&artifact).await,
            json!({"n": 2}),
            "the second step"
        );
    }

    async fn wait_for_json(path: &Path) -> Value {
        for _ in 0..500 {
            if let Ok(bytes) = fs::read(path) {
                return serde_json::from_slice(&bytes).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} never appeared", path.display());
    }

    #[tokio::test]
    async fn disposed_and_unknown_sessions_are_refused() {
        let worktree = tempfile::tempdir().unwrap();
        let run = RunId::new();
        let agents = JournaledAgents::new(worktree.path().join(".agents"));
        let session = started(&agents, worktree.path()).await;
        agents.dispose(session).await.unwrap();
        assert!(!agents.probe(session).await.unwrap().alive);
        let error = agents
            .send_prompt(session, &envelope(worktree.path(), run, 1))
            .await
            .unwrap_err();
        assert_eq!(error.code(), ErrorCode::SessionNotFound);
        let error = agents.resume(SessionId::new()).await.unwrap_err();
        assert_eq!(error.code(), ErrorCode::SessionNotFound);
    }
}
