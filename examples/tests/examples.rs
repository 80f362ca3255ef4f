//! The README's commands, run as a newcomer runs them: `cargo run --example <name>` from the
//! workspace root, checking the exit status and the lines that show each example did its job.
//!
//! Every command in a `sh` block of README.md must be one these tests run (or `.ci/run`'s
//! `cargo test --workspace`); [`every_readme_command_is_run_by_a_test`] fails on any other, so
//! the README cannot drift from what is tested.

use std::path::{Path, PathBuf};
use std::process::Command;

use phaseflow_pg::testing::TestDatabase;

/// The commands these tests run, as the README writes them.
const FEATURE_FLOW: &str = "cargo run --example feature_flow";
const FEATURE_FLOW_PG: &str =
    "DATABASE_URL=postgres://user:password@localhost/app cargo run --example feature_flow";
const APPROVAL_GATE: &str = "cargo run --example approval_gate";
const CRASH_RECOVERY: &str = "cargo run --example crash_recovery";
/// Run by `.ci/run`, not here.
const TEST_SUITE: &str = "cargo test --workspace";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the examples crate is in the workspace")
        .to_path_buf()
}

/// The commands in the README's `sh` blocks, without their comments.
fn readme_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let mut commands = Vec::new();
    let mut in_sh = false;
    for line in readme.lines() {
        let fence = line.trim_start();
        if fence.starts_with("```") {
            in_sh = !in_sh && fence.trim_start_matches('`').trim() == "sh";
            continue;
        }
        let command = line.split(" #").next().unwrap_or_default().trim();
        if in_sh && !command.is_empty() && !command.starts_with('#') {
            commands.push(command.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    commands
}

#[test]
fn every_readme_command_is_run_by_a_test() {
    let commands = readme_commands();
    assert_eq!(
        commands.first().map(String::as_str),
        Some(FEATURE_FLOW),
        "the README opens with the main example"
    );
    assert_eq!(commands.get(1).map(String::as_str), Some(TEST_SUITE));
    let ci = std::fs::read_to_string(root().join(".ci/run")).expect(".ci/run");
    assert!(
        ci.lines().any(|line| line.trim() == TEST_SUITE),
        ".ci/run runs `{TEST_SUITE}`"
    );
    for command in &commands {
        assert!(
            [
                FEATURE_FLOW,
                FEATURE_FLOW_PG,
                APPROVAL_GATE,
                CRASH_RECOVERY,
                TEST_SUITE
            ]
            .contains(&command.as_str()),
            "README command `{command}` is run by no test: add it to examples/tests/examples.rs"
        );
    }
}

/// Runs a README command from the workspace root and returns its stdout; panics with its
/// output unless it succeeds. `DATABASE_URL` is the test's, never the environment's.
fn run(command: &str, database_url: Option<&str>) -> String {
    assert!(
        readme_commands().iter().any(|c| c == command),
        "`{command}` is not in the README any more"
    );
    let args: Vec<&str> = command
        .split_whitespace()
        .skip_while(|word| word.contains('='))
        .skip(1) // `cargo`
        .collect();
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .current_dir(root())
        .args(args)
        .env_remove("DATABASE_URL");
    if let Some(url) = database_url {
        cargo.env("DATABASE_URL", url);
    }
    let output = cargo.output().expect("run cargo");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "`{command}` failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The event types of the timeline lines (`  123 ms  phase  event.type  …`), in order.
fn timeline(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let is_event = words.len() >= 4
                && words[0].parse::<u64>().is_ok()
                && words[1] == "ms"
                && words[3].contains('.');
            is_event.then(|| words[3])
        })
        .collect()
}

fn assert_has(stdout: &str, expected: &[&str]) {
    for line in expected {
        assert!(stdout.contains(line), "missing `{line}` in:\n{stdout}");
    }
}

/// The whole event log of the feature run: the invalid report, the repair, the gate.
const FEATURE_TIMELINE: &[&str] = &[
    "run.created",
    "run.started",
    "phase.started",
    "session.created",
    "session.ready",
    "session.busy",
    "prompt.sent",
    "artifact.expected",
    "artifact.validated",
    "session.idle",
    "approval.requested",
    "approval.decided",
    "phase.completed",
    "run.resumed",
    "phase.started",
    "session.created",
    "session.ready",
    "session.busy",
    "prompt.sent",
    "artifact.expected",
    "artifact.invalid",
    "session.idle",
    "phase.started",
    "session.busy",
    "prompt.repaired",
    "artifact.expected",
    "artifact.validated",
    "session.idle",
    "phase.completed",
    "phase.started",
    "session.created",
    "session.ready",
    "session.busy",
    "prompt.sent",
    "artifact.expected",
    "artifact.validated",
    "session.idle",
    "phase.completed",
    "run.completed",
];

fn assert_feature_flow(stdout: &str) {
    assert_eq!(timeline(stdout), FEATURE_TIMELINE, "{stdout}");
    assert_has(
        stdout,
        &[
            "attempt 2 (repair: artifact_invalid)",
            "phaseflow/impl.json sha256 ",
            "/changed_files: [] has less than 1 item",
            "/tests_passed: \"yes\" is not of type \"boolean\"",
            "[simulated reviewer] approves the plan at gate `plan_review`",
            "approve by simulated reviewer",
            "the repair prompt the coder received (attempt 2):",
            "phaseflow/plan.json (sha256 ",
            "phaseflow/impl.json (sha256 ",
            "phaseflow/review.json (sha256 ",
            "\"verdict\": \"approve\"",
            "prompts delivered, none twice",
        ],
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("✔ run ") && last.contains(" is completed after "),
        "{last}"
    );
}

#[test]
fn feature_flow_runs_in_memory() {
    let stdout = run(FEATURE_FLOW, None);
    assert_has(&stdout, &["store:    in memory"]);
    assert_feature_flow(&stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feature_flow_runs_on_postgresql() {
    let database = TestDatabase::migrated().await;
    let url = database.url().to_owned();
    let stdout = tokio::task::spawn_blocking(move || run(FEATURE_FLOW_PG, Some(&url)))
        .await
        .expect("cargo run");
    assert_has(&stdout, &["store:    PostgreSQL at DATABASE_URL"]);
    assert_feature_flow(&stdout);
    let store = database.store();
    let run_id = stdout
        .lines()
        .find_map(|line| line.strip_prefix("run:      "))
        .expect("the run id is printed")
        .parse()
        .expect("a run id");
    let events = phaseflow::store::Store::events(&store, run_id, 0)
        .await
        .expect("the run is in PostgreSQL");
    assert_eq!(events.len(), FEATURE_TIMELINE.len());
}

#[test]
fn approval_gate_is_decided_by_a_second_engine() {
    let stdout = run(APPROVAL_GATE, None);
    assert_has(
        &stdout,
        &[
            "parked at gate `plan_review`",
            "── operator (a second engine over the same store)",
            "pending: gate `plan_review`, phase `plan`, attempt 1",
            "operator decides: rework",
            "rework by operator alice",
            "attempt 2 (rework)",
            "pending: gate `plan_review`, phase `plan`, attempt 2",
            "operator decides: approve",
            "approve by operator alice",
            "orchestrator: approved — moving on",
            "    │ --- phaseflow: reviewer feedback ---",
            "run.completed",
            "the planner's second prompt carried the feedback: yes",
        ],
    );
    assert_eq!(
        timeline(&stdout)
            .iter()
            .filter(|t| **t == "approval.requested")
            .count(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_gate_runs_on_postgresql() {
    let database = TestDatabase::migrated().await;
    let url = database.url().to_owned();
    let stdout = tokio::task::spawn_blocking(move || run(APPROVAL_GATE, Some(&url)))
        .await
        .expect("cargo run");
    assert_has(
        &stdout,
        &[
            "store:    PostgreSQL at DATABASE_URL",
            "operator decides: approve",
            "the planner's second prompt carried the feedback: yes",
        ],
    );
}

#[test]
fn crash_recovery_resumes_without_a_second_delivery() {
    let stdout = run(CRASH_RECOVERY, None);
    assert_has(
        &stdout,
        &[
            "store: PostgreSQL (a throwaway cluster",
            "implement: pending in the store; executing it",
            "while `implement` awaited its artifact (signal: 9 (SIGKILL))",
            "the coder's journal: 1 prompt(s) received",
            "implement: awaiting_artifact at attempt 1 in the store",
            "continuing that attempt",
            "✔ no prompt was delivered twice across the two orchestrator processes",
            " is completed",
        ],
    );
    let deliveries: Vec<&str> = stdout
        .lines()
        .filter(|line| line.contains("attempt 1): delivered "))
        .collect();
    assert_eq!(deliveries.len(), 2, "one line per prompt: {deliveries:?}");
    for line in deliveries {
        assert!(
            line.contains("delivered 1×") && line.contains("prompt.sent events: 1"),
            "{line}"
        );
    }
    let types = timeline(&stdout);
    assert_eq!(
        types.iter().filter(|t| **t == "prompt.sent").count(),
        2,
        "{types:?}"
    );
    assert_eq!(types.last(), Some(&"run.completed"));
}
