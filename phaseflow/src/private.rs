//! What `#[derive(Phase)]` and `#[derive(Workflow)]` expand to. Not public API: the names here
//! change whenever the macros need them to.

pub use core::fmt::Debug;
pub use core::result::Result::Err;
pub use core::{include_str, panic};

pub use crate::error::Result;
pub use crate::spec::{PhaseSpec, WorkflowSpec};
pub use crate::typestate::{
    Completed, Ended, HasApproval, InWorkflow, NoApproval, NoPhase, Phase, PhaseAt, Ready,
    ResumedPhase, Run, Workflow, WorkflowState,
};

/// Byte equality of two strings, in const context (the duplicate-key assertion).
pub const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// A message assembled in const context, so a const-eval panic can name the duplicated key.
/// Longer messages are cut at [`ConstMessage::CAPACITY`] bytes.
#[derive(Debug)]
pub struct ConstMessage {
    bytes: [u8; Self::CAPACITY],
    len: usize,
}

impl ConstMessage {
    /// The most bytes a message holds.
    pub const CAPACITY: usize = 512;

    /// An empty message.
    pub const fn new() -> Self {
        Self {
            bytes: [0; Self::CAPACITY],
            len: 0,
        }
    }

    /// Appends `text` (as much of it as fits).
    pub const fn push(mut self, text: &str) -> Self {
        let text = text.as_bytes();
        let mut i = 0;
        while i < text.len() && self.len < Self::CAPACITY {
            self.bytes[self.len] = text[i];
            self.len += 1;
            i += 1;
        }
        self
    }

    /// The message so far.
    pub const fn as_str(&self) -> &str {
        match core::str::from_utf8(self.bytes.split_at(self.len).0) {
            Ok(text) => text,
            Err(_) => {
                "phases of this workflow share a key (the message was cut inside a character)"
            }
        }
    }
}

impl Default for ConstMessage {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn const_messages_join_and_truncate() {
        const MSG: ConstMessage = ConstMessage::new().push("key `").push("plan").push("`");
        assert_eq!(MSG.as_str(), "key `plan`");
        let long = "x".repeat(600);
        assert_eq!(
            ConstMessage::new().push(&long).as_str().len(),
            ConstMessage::CAPACITY
        );
        assert!(str_eq("plan", "plan"));
        assert!(!str_eq("plan", "plans"));
        assert!(!str_eq("plan", "plab"));
    }
}
