//! The prompt envelope sent to an agent, and its dedup key.
//!
//! The dedup key is the sha256 of the envelope's canonical JSON *without* its random uuid, so
//! the same attempt of the same phase always yields the same key, however often it is rebuilt.
//! Canonical JSON here means: object keys sorted by their UTF-8 bytes, no insignificant
//! whitespace, strings escaped as `serde_json` escapes them. It does not depend on whether
//! `serde_json`'s `preserve_order` feature is enabled anywhere in the build.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::ids::{DedupKey, PhaseKey, RoleKey, RunId};

/// Everything an agent needs to produce one artifact for one attempt of one phase.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptEnvelope {
    /// Random per build; excluded from the dedup key.
    pub uuid: Uuid,
    /// The run.
    pub run: RunId,
    /// The role of the session that receives it.
    pub role: RoleKey,
    /// The phase.
    pub phase: PhaseKey,
    /// The attempt number (1-based; repairs, reworks and retries are new attempts).
    pub attempt: u32,
    /// Where the artifact must be written: the canonical absolute path inside the worktree.
    pub artifact_path: String,
    /// The id of the JSON Schema the artifact must satisfy.
    pub schema_id: String,
    /// What to do.
    pub instructions: String,
    /// The sha256 of the canonical JSON of every field above except `uuid`.
    pub dedup_key: DedupKey,
}

/// The fields of an envelope that decide its dedup key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvelopeContent {
    /// The run.
    pub run: RunId,
    /// The role of the session that receives it.
    pub role: RoleKey,
    /// The phase.
    pub phase: PhaseKey,
    /// The attempt number.
    pub attempt: u32,
    /// Canonical absolute artifact path.
    pub artifact_path: String,
    /// Schema id.
    pub schema_id: String,
    /// Instructions.
    pub instructions: String,
}

impl EnvelopeContent {
    /// The dedup key of this content.
    pub fn dedup_key(&self) -> DedupKey {
        let value = serde_json::json!({
            "run": self.run,
            "role": self.role,
            "phase": self.phase,
            "attempt": self.attempt,
            "artifact_path": self.artifact_path,
            "schema_id": self.schema_id,
            "instructions": self.instructions,
        });
        DedupKey::from_hex(hex::encode(Sha256::digest(
            canonical_json(&value).as_bytes(),
        )))
    }

    /// Seals the content into an envelope with a fresh uuid.
    pub fn into_envelope(self) -> PromptEnvelope {
        let dedup_key = self.dedup_key();
        PromptEnvelope {
            uuid: Uuid::new_v4(),
            run: self.run,
            role: self.role,
            phase: self.phase,
            attempt: self.attempt,
            artifact_path: self.artifact_path,
            schema_id: self.schema_id,
            instructions: self.instructions,
            dedup_key,
        }
    }
}

/// Serialises a JSON value canonically: keys sorted bytewise, no whitespace.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (key, child)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(child, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, child) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(child, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content() -> EnvelopeContent {
        EnvelopeContent {
            run: RunId::from_uuid(Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef)),
            role: RoleKey::new("planner"),
            phase: PhaseKey::new("plan"),
            attempt: 1,
            artifact_path: "/work/tree/phaseflow/plan.json".into(),
            schema_id: "plan.schema.json".into(),
            instructions: "Plan TICKET-42.\nKeep it short — \"really\".".into(),
        }
    }

    #[test]
    fn canonical_json_sorts_keys_and_drops_whitespace() {
        let value: Value = serde_json::from_str(
            r#"{ "b": [1, {"z": null, "a": true}], "a": "x\ny", "ä": 1.5, "B": -7 }"#,
        )
        .unwrap();
        assert_eq!(
            canonical_json(&value),
            r#"{"B":-7,"a":"x\ny","b":[1,{"a":true,"z":null}],"ä":1.5}"#
        );
    }

    #[test]
    fn dedup_key_matches_fixed_vector() {
        // The vector is sha256 of the canonical JSON spelled out below; recompute it with
        // `printf '%s' '<json>' | sha256sum` if the envelope fields ever change on purpose.
        let expected_json = concat!(
            r#"{"artifact_path":"/work/tree/phaseflow/plan.json","attempt":1,"#,
            r#""instructions":"Plan TICKET-42.\nKeep it short — \"really\".","phase":"plan","#,
            r#""role":"planner","run":"01234567-89ab-cdef-0123-456789abcdef","schema_id":"plan.schema.json"}"#
        );
        let value = serde_json::json!({
            "run": content().run, "role": "planner", "phase": "plan", "attempt": 1,
            "artifact_path": "/work/tree/phaseflow/plan.json", "schema_id": "plan.schema.json",
            "instructions": "Plan TICKET-42.\nKeep it short — \"really\".",
        });
        assert_eq!(canonical_json(&value), expected_json);
        assert_eq!(
            content().dedup_key().as_str(),
            "04ff796575f114da7ab3b97f2ee507038aed5058e4ce387abd914cdca2c9dc64"
        );
    }

    #[test]
    fn dedup_key_ignores_uuid_and_changes_with_content() {
        let a = content().into_envelope();
        let b = content().into_envelope();
        assert_ne!(a.uuid, b.uuid);
        assert_eq!(a.dedup_key, b.dedup_key);
        let mut next = content();
        next.attempt = 2;
        assert_ne!(next.dedup_key(), a.dedup_key);
    }
}
