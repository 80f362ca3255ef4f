//! The phase executor (in progress).
