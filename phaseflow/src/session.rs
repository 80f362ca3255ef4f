//! The agent session contract: how the engine talks to a terminal agent.

use std::fmt::Debug;
use std::path::PathBuf;

use async_trait::async_trait;

use crate::envelope::PromptEnvelope;
use crate::error::Result;
use crate::ids::{RoleKey, RunId, SessionId};
use crate::store::TranscriptChunk;

/// What the runtime needs to start a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartSession {
    /// The id the engine chose for it (recorded once the start succeeded).
    pub id: SessionId,
    /// The run.
    pub run: RunId,
    /// The role.
    pub role: RoleKey,
    /// The worktree the agent works in (canonical).
    pub worktree: PathBuf,
}

/// How a prompt reached the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Delivered now.
    Delivered,
    /// A prompt with this dedup key was delivered before; nothing was sent again.
    AlreadyDelivered,
}

/// The answer to a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    /// The process behind the session is alive.
    pub alive: bool,
    /// Its pane / terminal is active and accepting input.
    pub pane_active: bool,
}

impl Probe {
    /// Alive and active.
    pub fn is_usable(&self) -> bool {
        self.alive && self.pane_active
    }
}

/// A backend that runs agent sessions (tmux panes, processes, or the scripted fake).
///
/// Errors carry a class: `recoverable` ones are retried within a budget by the engine.
#[async_trait]
pub trait SessionRuntime: Send + Sync + Debug + 'static {
    /// Starts a session for a role in a worktree.
    async fn start(&self, request: &StartSession) -> Result<()>;

    /// Re-attaches to an existing session (after an orchestrator restart, or a retry decision).
    async fn resume(&self, session: SessionId) -> Result<()>;

    /// Delivers a prompt. Must be idempotent per `envelope.dedup_key`: a key already delivered
    /// is acknowledged with [`Delivery::AlreadyDelivered`] and not delivered again.
    async fn send_prompt(&self, session: SessionId, envelope: &PromptEnvelope) -> Result<Delivery>;

    /// Checks whether the session is alive.
    async fn probe(&self, session: SessionId) -> Result<Probe>;

    /// Re-bootstraps a stuck session (after an artifact timeout).
    async fn rebootstrap(&self, session: SessionId) -> Result<()>;

    /// Stops a session for good.
    async fn dispose(&self, session: SessionId) -> Result<()>;

    /// Transcript chunks with `seq > from_seq`, in order.
    async fn capture(&self, session: SessionId, from_seq: u64) -> Result<Vec<TranscriptChunk>>;
}
