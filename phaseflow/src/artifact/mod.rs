//! Artifacts: where a phase's JSON file lives, how phaseflow notices that an agent finished
//! writing it, and how it is hashed and validated.
//!
//! * [`ArtifactLocation`] confines the declared path to the run's worktree, symlinks included,
//!   and re-checks that confinement before every read, write or removal.
//! * [`ArtifactWatch`] / [`wait_for`] detect a *new, complete* file: filesystem notifications
//!   (a close after writing, or a rename into place) followed by a short confirmation, with
//!   polling and a quiet window as the fallback.
//! * [`CompiledSchema`] and [`inspect`] turn the file into a [`NewArtifact`] verdict. Bad content
//!   (not JSON, not UTF-8, too large, schema violations) is a verdict with issues, never an error:
//!   the engine answers it with a repair prompt.
//!
//! [`inspect`]: fn@inspect
//! [`NewArtifact`]: crate::store::NewArtifact

mod inspect;
mod location;
mod schema;
mod watch;

pub use inspect::{DEFAULT_MAX_ARTIFACT_BYTES, inspect};
pub use location::{ArtifactLocation, Signature};
pub use schema::CompiledSchema;
pub use watch::{ArtifactWatch, WaitOptions, WaitOutcome, wait_for};
