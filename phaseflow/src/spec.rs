//! Runtime descriptions of phases and workflows.
//!
//! `#[derive(Phase)]` and `#[derive(Workflow)]` emit these as `const`s; code that builds workflows
//! at run time can construct them directly. All logic that interprets them lives in the engine.

use crate::ids::{GateKey, PhaseKey, RoleKey};

/// The repair budget the predecessor hard-coded: one repair prompt after an invalid or missing
/// artifact before a human is asked.
pub const DEFAULT_REPAIR_BUDGET: u32 = 1;

/// One phase: which role produces which artifact, checked against which schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhaseSpec {
    key: &'static str,
    role: &'static str,
    artifact: &'static str,
    schema_id: &'static str,
    schema: &'static str,
    repair_budget: u32,
    approval: Option<&'static str>,
}

impl PhaseSpec {
    /// A phase with the default repair budget and no approval gate.
    ///
    /// `artifact` is relative to the run's worktree; `schema` is the JSON Schema's text and
    /// `schema_id` the name it is known by (usually its file name).
    pub const fn new(
        key: &'static str,
        role: &'static str,
        artifact: &'static str,
        schema_id: &'static str,
        schema: &'static str,
    ) -> Self {
        Self {
            key,
            role,
            artifact,
            schema_id,
            schema,
            repair_budget: DEFAULT_REPAIR_BUDGET,
            approval: None,
        }
    }

    /// Sets how many repair prompts follow an invalid or missing artifact before a human gate.
    pub const fn with_repair_budget(mut self, repair_budget: u32) -> Self {
        self.repair_budget = repair_budget;
        self
    }

    /// Puts a workflow approval gate after a valid artifact.
    pub const fn with_approval(mut self, gate: &'static str) -> Self {
        self.approval = Some(gate);
        self
    }

    /// The phase key.
    pub fn key(&self) -> PhaseKey {
        PhaseKey::new(self.key)
    }

    /// The phase key as written.
    pub const fn key_str(&self) -> &'static str {
        self.key
    }

    /// The role whose session produces the artifact.
    pub fn role(&self) -> RoleKey {
        RoleKey::new(self.role)
    }

    /// The artifact path relative to the worktree.
    pub const fn artifact(&self) -> &'static str {
        self.artifact
    }

    /// The schema id.
    pub const fn schema_id(&self) -> &'static str {
        self.schema_id
    }

    /// The JSON Schema text.
    pub const fn schema(&self) -> &'static str {
        self.schema
    }

    /// Repair prompts allowed per round (a round starts with a first, rework or retry attempt).
    pub const fn repair_budget(&self) -> u32 {
        self.repair_budget
    }

    /// The workflow gate, if any.
    pub fn approval(&self) -> Option<GateKey> {
        self.approval.map(GateKey::new)
    }
}

/// A workflow: a name and its phases in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkflowSpec {
    name: &'static str,
    phases: &'static [PhaseSpec],
}

impl WorkflowSpec {
    /// A workflow running `phases` in order.
    pub const fn new(name: &'static str, phases: &'static [PhaseSpec]) -> Self {
        Self { name, phases }
    }

    /// The workflow name.
    pub const fn name(&self) -> &'static str {
        self.name
    }

    /// The phases in order.
    pub const fn phases(&self) -> &'static [PhaseSpec] {
        self.phases
    }

    /// The phase with that key.
    pub fn phase(&self, key: &str) -> Option<&'static PhaseSpec> {
        self.phases.iter().find(|p| p.key == key)
    }

    /// The phase keys in order.
    pub fn phase_keys(&self) -> Vec<PhaseKey> {
        self.phases.iter().map(PhaseSpec::key).collect()
    }
}
