//! Artifact handling (in progress).
