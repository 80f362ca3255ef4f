//! PostgreSQL store for phaseflow (in progress).
