//! Commands of one phase, as an engine issues them, for the PostgreSQL-only tests.

#![allow(dead_code, unreachable_pub)]

use phaseflow::event::{Event, PromptKind};
use phaseflow::ids::{ContentHash, DedupKey, EngineId, PhaseKey, RoleKey, RunId, SessionId};
use phaseflow::store::{
    BeginAttempt, FinishPhase, MarkBusy, NewArtifact, NewRun, PhaseEnd, PhaseWork, RecordPrompt,
    RecordVerdict, SessionOrigin, Store,
};

pub const PHASE: &str = "plan";
pub const PATH: &str = "/work/tree/phaseflow/plan.json";
pub const SCHEMA: &str = "plan.schema.json";

/// Creates a one-phase run.
pub async fn create_run(store: &dyn Store) -> RunId {
    let run = RunId::new();
    store
        .create_run(NewRun {
            id: run,
            workflow: "feature".into(),
            subject: "TICKET-42".into(),
            worktree: "/work/tree".into(),
            phases: vec![PhaseKey::new(PHASE)],
        })
        .await
        .unwrap();
    run
}

/// One engine working on the phase of `run`.
#[derive(Clone, Debug)]
pub struct EngineCtx {
    pub run: RunId,
    pub owner: EngineId,
    pub session: SessionId,
}

impl EngineCtx {
    pub fn new(run: RunId) -> Self {
        Self {
            run,
            owner: EngineId::new(),
            session: SessionId::new(),
        }
    }

    pub fn work(&self) -> PhaseWork {
        PhaseWork {
            run: self.run,
            phase: PhaseKey::new(PHASE),
            owner: self.owner,
        }
    }

    pub fn dedup(&self) -> DedupKey {
        DedupKey::from_hex(format!("{}-1", self.owner))
    }

    pub fn begin(&self) -> BeginAttempt {
        BeginAttempt {
            work: self.work(),
            repair: false,
            reason: "initial".into(),
            instructions: "write the plan".into(),
        }
    }

    pub fn busy(&self) -> MarkBusy {
        MarkBusy {
            work: self.work(),
            attempt: 1,
            session: self.session,
            role: RoleKey::new("planner"),
            origin: SessionOrigin::Started,
            dedup: self.dedup(),
        }
    }

    pub fn prompt(&self) -> RecordPrompt {
        RecordPrompt {
            work: self.work(),
            attempt: 1,
            session: self.session,
            dedup: self.dedup(),
            kind: PromptKind::Initial,
            artifact_path: PATH.into(),
            schema_id: SCHEMA.into(),
        }
    }

    pub fn verdict(&self) -> RecordVerdict {
        RecordVerdict {
            work: self.work(),
            attempt: 1,
            session: self.session,
            dedup: self.dedup(),
            artifact: artifact(),
        }
    }

    pub fn complete(&self) -> FinishPhase {
        FinishPhase {
            work: self.work(),
            attempt: 1,
            session: Some((self.session, Some(self.dedup()))),
            verdict: Some(artifact()),
            end: PhaseEnd::Complete,
            transcript: Vec::new(),
        }
    }
}

/// A valid plan artifact.
pub fn artifact() -> NewArtifact {
    let body = r#"{"summary":"add the flag","steps":[]}"#;
    NewArtifact {
        path: PATH.into(),
        hash: ContentHash::of(body.as_bytes()),
        schema_id: SCHEMA.into(),
        size: body.len() as u64,
        content: serde_json::from_str(body).ok(),
        errors: Vec::new(),
    }
}

pub fn types(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind.type_name()).collect()
}
