//! JSON Schemas: compiled once, then used to validate every artifact checked against them.

use std::fmt;

use serde_json::Value;

use crate::error::{Error, ErrorCode, Result};
use crate::event::ValidationIssue;

/// Validation messages quote the offending value; a huge value must not bloat the event log or
/// the repair prompt, so messages are cut to this many bytes.
const MAX_ISSUE_MESSAGE_BYTES: usize = 1024;

/// A compiled JSON Schema.
pub struct CompiledSchema {
    id: String,
    validator: jsonschema::Validator,
}

impl fmt::Debug for CompiledSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledSchema")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl CompiledSchema {
    /// Parses `text` as JSON and compiles it as a JSON Schema (draft detected from `$schema`).
    ///
    /// Text that is not JSON, or not a valid schema (including one whose `$ref`s point at files
    /// or URLs: phaseflow never fetches schemas), is [`ErrorCode::SchemaInvalid`] naming the
    /// schema id and the parser's message.
    pub fn compile(id: &str, text: &str) -> Result<Self> {
        let hint = "fix the schema file so that it is a valid JSON Schema (draft 4, 6, 7, 2019-09 \
                    or 2020-12) with no external references";
        let schema: Value = serde_json::from_str(text).map_err(|err| {
            Error::new(
                ErrorCode::SchemaInvalid,
                format!("schema {id:?} is not JSON: {err}"),
            )
            .with_hint(hint)
        })?;
        // The schema is user input handed to a third-party compiler; a bug there must become
        // this error, not take the orchestrator down.
        let compiled = std::panic::catch_unwind(|| jsonschema::validator_for(&schema));
        let validator = match compiled {
            Ok(Ok(validator)) => validator,
            Ok(Err(err)) => {
                let at = err.instance_path().as_str();
                let at = if at.is_empty() {
                    String::new()
                } else {
                    format!(" at {at}")
                };
                return Err(Error::new(
                    ErrorCode::SchemaInvalid,
                    format!("schema {id:?} is not a valid JSON Schema{at}: {err}"),
                )
                .with_hint(hint));
            }
            Err(_) => {
                return Err(Error::new(
                    ErrorCode::SchemaInvalid,
                    format!("schema {id:?} could not be compiled: the schema compiler panicked"),
                )
                .with_hint(hint));
            }
        };
        Ok(Self {
            id: id.to_owned(),
            validator,
        })
    }

    /// The schema id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Every problem `value` has against the schema: its instance path as a JSON Pointer (`""`
    /// for the document) and a message (cut to 1 KiB). Sorted by path, then message, without
    /// duplicates, so replays compare equal. Empty means valid.
    pub fn validate(&self, value: &Value) -> Vec<ValidationIssue> {
        let mut issues: Vec<ValidationIssue> = self
            .validator
            .iter_errors(value)
            .map(|err| ValidationIssue {
                instance_path: err.instance_path().as_str().to_owned(),
                message: bounded_message(err.to_string()),
            })
            .collect();
        issues.sort_by(|a, b| {
            (a.instance_path.as_str(), a.message.as_str())
                .cmp(&(b.instance_path.as_str(), b.message.as_str()))
        });
        issues.dedup();
        issues
    }
}

fn bounded_message(mut message: String) -> String {
    if message.len() > MAX_ISSUE_MESSAGE_BYTES {
        let mut end = MAX_ISSUE_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    use serde_json::json;

    const PLAN_SCHEMA: &str = r#"{
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["title", "steps"],
        "properties": {
            "title": {"type": "string"},
            "steps": {"type": "array", "items": {"type": "string"}}
        }
    }"#;

    pub(in crate::artifact) fn plan_schema() -> CompiledSchema {
        CompiledSchema::compile("plan", PLAN_SCHEMA).unwrap()
    }

    #[test]
    fn schema_that_is_not_json_is_refused() {
        let err = CompiledSchema::compile("plan", "{not json").unwrap_err();
        assert_eq!(err.code(), ErrorCode::SchemaInvalid);
        assert!(err.message().contains("\"plan\""), "{err}");
        assert!(err.message().contains("not JSON"), "{err}");
        assert!(err.message().contains("line 1"), "{err}");
        assert!(err.hint().is_some());
    }

    #[test]
    fn invalid_schema_is_refused() {
        for text in [
            r#"{"type": 12}"#,
            r#"{"minimum": "five"}"#,
            r#"{"$ref": "file:///etc/passwd"}"#,
        ] {
            let err = CompiledSchema::compile("impl", text).unwrap_err();
            assert_eq!(err.code(), ErrorCode::SchemaInvalid, "{text}");
            assert!(err.message().contains("\"impl\""), "{err}");
        }
    }

    #[test]
    fn compiled_schema_keeps_its_id_and_hides_the_validator_in_debug() {
        let schema = plan_schema();
        assert_eq!(schema.id(), "plan");
        assert!(format!("{schema:?}").contains("plan"));
    }

    #[test]
    fn validate_reports_every_error_with_its_instance_path_in_order() {
        let schema = plan_schema();
        let issues = schema.validate(&json!({"title": 7, "steps": ["a", 2, 3]}));
        let paths: Vec<&str> = issues.iter().map(|i| i.instance_path.as_str()).collect();
        assert_eq!(paths, ["/steps/1", "/steps/2", "/title"]);
        assert!(issues[2].message.contains("string"), "{issues:?}");

        let issues = schema.validate(&json!({}));
        assert_eq!(issues.len(), 2, "{issues:?}");
        assert!(issues.iter().all(|i| i.instance_path.is_empty()));
        assert!(issues[0].message.contains("steps"), "{issues:?}");
        assert!(issues[1].message.contains("title"), "{issues:?}");

        assert!(
            schema
                .validate(&json!({"title": "t", "steps": []}))
                .is_empty()
        );
    }

    #[test]
    fn huge_values_do_not_make_huge_messages() {
        let schema = CompiledSchema::compile("s", r#"{"type": "array"}"#).unwrap();
        let issues = schema.validate(&json!({ "text": "x".repeat(100_000) }));
        assert_eq!(issues.len(), 1);
        assert!(issues[0].message.len() <= MAX_ISSUE_MESSAGE_BYTES + '…'.len_utf8());
    }
}
