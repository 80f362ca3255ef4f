//! Reading an artifact: its confinement checked again, its bytes hashed within a size cap, then
//! parsed as JSON and validated into a [`NewArtifact`] verdict.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use serde_json::Value;
use sha2::Digest;

use super::location::{ArtifactLocation, io_failure};
use super::schema::CompiledSchema;
use crate::error::Result;
use crate::event::ValidationIssue;
use crate::ids::ContentHash;
use crate::store::NewArtifact;

/// Default cap on artifact size: 4 MiB.
pub const DEFAULT_MAX_ARTIFACT_BYTES: u64 = 4 * 1024 * 1024;

/// Reads, hashes, parses and validates the artifact at `location`.
///
/// Confinement is checked again first: the file must still be a regular file inside the
/// worktree after symlink resolution, else [`ErrorCode::ArtifactOutsideWorktree`]. Content
/// problems are a verdict, not an error: bytes that are not UTF-8 or not JSON give one issue at
/// `""` whose message starts with `artifact is not valid JSON:` and says where; a file larger
/// than `max_bytes` gives one issue saying so, is hashed without being held in memory, and has
/// no `content`. Reading failures are [`ErrorCode::WorkspacePermissions`].
///
/// This is blocking file IO; call it from `tokio::task::spawn_blocking` in async code.
///
/// [`ErrorCode::ArtifactOutsideWorktree`]: crate::error::ErrorCode::ArtifactOutsideWorktree
/// [`ErrorCode::WorkspacePermissions`]: crate::error::ErrorCode::WorkspacePermissions
pub fn inspect(
    location: &ArtifactLocation,
    schema: &CompiledSchema,
    max_bytes: u64,
) -> Result<NewArtifact> {
    let path = location.confined_regular_file()?;
    let read = read_bounded(&path, max_bytes)
        .map_err(|err| io_failure("cannot read artifact", &path, err))?;
    let (content, errors) = match read.bytes {
        None => (
            None,
            vec![ValidationIssue {
                instance_path: String::new(),
                message: format!(
                    "artifact is {} bytes, larger than the {max_bytes}-byte cap",
                    read.size
                ),
            }],
        ),
        Some(bytes) => match parse_json(&bytes) {
            Ok(value) => {
                let errors = schema.validate(&value);
                (Some(value), errors)
            }
            Err(issue) => (None, vec![issue]),
        },
    };
    Ok(NewArtifact {
        path: location.path_string(),
        hash: read.hash,
        schema_id: schema.id().to_owned(),
        size: read.size,
        content,
        errors,
    })
}

struct BoundedRead {
    hash: ContentHash,
    size: u64,
    /// The bytes, unless there were more than the cap.
    bytes: Option<Vec<u8>>,
}

/// Hashes the whole file while keeping at most `max_bytes` of it; the size counted is what was
/// read, so a file still growing is judged by the bytes actually hashed.
fn read_bounded(path: &Path, max_bytes: u64) -> io::Result<BoundedRead> {
    let mut file = File::open(path)?;
    let expected = file.metadata()?.len().min(max_bytes);
    let mut kept = Some(Vec::with_capacity(usize::try_from(expected).unwrap_or(0)));
    let mut hasher = sha2::Sha256::new();
    let mut size = 0u64;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        let chunk = &buffer[..n];
        hasher.update(chunk);
        size += n as u64;
        if size > max_bytes {
            kept = None;
        } else if let Some(bytes) = &mut kept {
            bytes.extend_from_slice(chunk);
        }
    }
    Ok(BoundedRead {
        hash: ContentHash::from_hex(hex::encode(hasher.finalize())),
        size,
        bytes: kept,
    })
}

fn parse_json(bytes: &[u8]) -> std::result::Result<Value, ValidationIssue> {
    let not_json = |why: String| ValidationIssue {
        instance_path: String::new(),
        message: format!("artifact is not valid JSON: {why}"),
    };
    let text = std::str::from_utf8(bytes).map_err(|err| {
        let valid = &bytes[..err.valid_up_to()];
        // `valid` is UTF-8 by construction; count lines and characters like serde_json does.
        let valid = std::str::from_utf8(valid).unwrap_or_default();
        let line = valid.matches('\n').count() + 1;
        let column = valid
            .rsplit('\n')
            .next()
            .map_or(0, |tail| tail.chars().count())
            + 1;
        not_json(format!(
            "byte {} is not UTF-8 at line {line} column {column}",
            err.valid_up_to()
        ))
    })?;
    serde_json::from_str(text).map_err(|err| not_json(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::fs;

    use serde_json::json;

    use crate::artifact::location::tests::{prepared, worktree};
    use crate::artifact::schema::tests::plan_schema;
    use crate::error::ErrorCode;

    fn artifact_with(bytes: &[u8]) -> (tempfile::TempDir, ArtifactLocation) {
        let wt = worktree();
        let location = prepared(&wt, "phaseflow/plan.json");
        fs::write(location.path(), bytes).unwrap();
        (wt, location)
    }

    #[test]
    fn inspect_a_valid_artifact() {
        let bytes = br#"{"title": "Plan", "steps": ["a"]}"#;
        let (_wt, location) = artifact_with(bytes);
        let verdict = inspect(&location, &plan_schema(), DEFAULT_MAX_ARTIFACT_BYTES).unwrap();
        assert!(verdict.is_valid(), "{:?}", verdict.errors);
        assert_eq!(verdict.path, location.path_string());
        assert_eq!(verdict.hash, ContentHash::of(bytes));
        assert_eq!(verdict.schema_id, "plan");
        assert_eq!(verdict.size, bytes.len() as u64);
        assert_eq!(
            verdict.content,
            Some(json!({"title": "Plan", "steps": ["a"]}))
        );
    }

    #[test]
    fn inspect_reports_schema_errors_with_the_content() {
        let (_wt, location) = artifact_with(br#"{"title": 1}"#);
        let verdict = inspect(&location, &plan_schema(), DEFAULT_MAX_ARTIFACT_BYTES).unwrap();
        let paths: Vec<&str> = verdict
            .errors
            .iter()
            .map(|i| i.instance_path.as_str())
            .collect();
        assert_eq!(paths, ["", "/title"]);
        assert_eq!(verdict.content, Some(json!({"title": 1})));
    }

    #[test]
    fn inspect_invalid_json_is_a_verdict_not_an_error() {
        let bytes = b"{\"title\": \"Plan\",\n  \"steps\": [}";
        let (_wt, location) = artifact_with(bytes);
        let verdict = inspect(&location, &plan_schema(), DEFAULT_MAX_ARTIFACT_BYTES).unwrap();
        assert_eq!(verdict.errors.len(), 1);
        assert_eq!(verdict.errors[0].instance_path, "");
        let message = &verdict.errors[0].message;
        assert!(
            message.starts_with("artifact is not valid JSON: "),
            "{message}"
        );
        assert!(message.contains("line 2 column"), "{message}");
        assert_eq!(verdict.content, None);
        assert_eq!(verdict.hash, ContentHash::of(bytes));
        assert_eq!(verdict.size, bytes.len() as u64);
    }

    #[test]
    fn inspect_non_utf8_bytes_is_a_verdict_not_an_error() {
        let bytes = b"{\"title\":\n \"caf\xe9\"}";
        let (_wt, location) = artifact_with(bytes);
        let verdict = inspect(&location, &plan_schema(), DEFAULT_MAX_ARTIFACT_BYTES).unwrap();
        assert_eq!(verdict.errors.len(), 1);
        let message = &verdict.errors[0].message;
        assert!(
            message.starts_with("artifact is not valid JSON: "),
            "{message}"
        );
        assert!(
            message.contains("not UTF-8 at line 2 column 6"),
            "{message}"
        );
        assert_eq!(verdict.content, None);
        assert_eq!(verdict.hash, ContentHash::of(bytes));
    }

    #[test]
    fn inspect_oversize_file_is_a_verdict_and_still_hashed() {
        let bytes = format!("[{}1]", "1,".repeat(600));
        let (_wt, location) = artifact_with(bytes.as_bytes());
        let verdict = inspect(&location, &plan_schema(), 1000).unwrap();
        assert_eq!(verdict.content, None);
        assert_eq!(verdict.size, bytes.len() as u64);
        assert_eq!(verdict.hash, ContentHash::of(bytes.as_bytes()));
        assert_eq!(
            verdict.errors,
            vec![ValidationIssue {
                instance_path: String::new(),
                message: format!(
                    "artifact is {} bytes, larger than the 1000-byte cap",
                    bytes.len()
                ),
            }]
        );
        let at_cap = inspect(&location, &plan_schema(), bytes.len() as u64).unwrap();
        assert!(at_cap.content.is_some());
    }

    #[test]
    fn inspect_a_missing_file_is_a_workspace_error() {
        let wt = worktree();
        let location = prepared(&wt, "plan.json");
        let err = inspect(&location, &plan_schema(), DEFAULT_MAX_ARTIFACT_BYTES).unwrap_err();
        assert_eq!(err.code(), ErrorCode::WorkspacePermissions);
        assert!(err.hint().unwrap().contains("plan.json"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn inspect_refuses_an_artifact_swapped_for_a_symlink_to_outside() {
        let wt = worktree();
        let elsewhere = worktree();
        let secret = elsewhere.path().join("secret.json");
        fs::write(&secret, r#"{"title": "secret", "steps": []}"#).unwrap();
        let location = prepared(&wt, "plan.json");
        std::os::unix::fs::symlink(&secret, location.path()).unwrap();
        let err = inspect(&location, &plan_schema(), DEFAULT_MAX_ARTIFACT_BYTES).unwrap_err();
        assert_eq!(err.code(), ErrorCode::ArtifactOutsideWorktree);
    }

    #[test]
    fn inspect_refuses_a_directory() {
        let wt = worktree();
        let location = prepared(&wt, "plan.json");
        fs::create_dir(location.path()).unwrap();
        let err = inspect(&location, &plan_schema(), DEFAULT_MAX_ARTIFACT_BYTES).unwrap_err();
        assert_eq!(err.code(), ErrorCode::ArtifactOutsideWorktree);
        assert!(err.message().contains("not a regular file"), "{err}");
    }
}
