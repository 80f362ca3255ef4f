//! Derive macros for phaseflow (in progress).
