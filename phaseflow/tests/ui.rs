//! The compile-time guarantees of the derives and the typed API, as trybuild cases.
//!
//! `fail/*.rs` must not compile, with the reviewed diagnostics in the `.stderr` beside each;
//! `pass/*.rs` must compile and run. Regenerate with
//! `TRYBUILD=overwrite cargo test -p phaseflow --test ui` and read every diff before committing
//! (the toolchain is pinned in rust-toolchain.toml so the diagnostics are stable).
//!
//! The cases name their schema files with paths starting with `../`, which the `Phase` derive
//! resolves against the source file (trybuild builds them in a generated crate whose
//! `CARGO_MANIFEST_DIR` is under `target/`).

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/fail/*.rs");
    cases.pass("tests/ui/pass/*.rs");
}
