//! Test doubles and test suites for phaseflow: [`MemoryStore`] (the in-memory store),
//! [`FakeSessions`] (a scripted agent runtime), the store conformance suite
//! ([`conformance`]), the engine scenario suite ([`scenarios`]) and crash injection ([`crash`]).

pub mod conformance;
pub mod crash;
pub mod memory;
pub mod scenarios;
pub mod sessions;

pub use conformance::assert_event_log;
pub use memory::MemoryStore;
pub use sessions::{FakeSessions, Script};
