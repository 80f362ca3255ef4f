//! Test doubles for phaseflow: [`MemoryStore`], [`FakeSessions`] and the store conformance suite.

pub mod conformance;
pub mod crash;
pub mod memory;
pub mod scenarios;
pub mod sessions;
pub use sessions::{FakeSessions, Script};
