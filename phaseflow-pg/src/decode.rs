//! Rows → records. Every read fetches rows as `to_jsonb(row)` and decodes them here, so one
//! code path checks every column: a value phaseflow did not write (an unknown state, a negative
//! counter, a payload that is not an event) becomes a `store_decode` error naming the table,
//! column and value, never a panic.

use std::fmt::Display;
use std::str::FromStr;

use phaseflow::error::{Error, ErrorCode, Result};
use phaseflow::event::{Event, EventKind};
use phaseflow::ids::{
    ApprovalId, ArtifactId, ContentHash, DedupKey, EngineId, GateKey, PhaseKey, RoleKey, RunId,
    SessionId,
};
use phaseflow::store::{
    ApprovalRecord, ArtifactRecord, DecisionRecord, PhaseRecord, RunRecord, SessionRecord,
    TranscriptChunk,
};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};
use uuid::Uuid;

/// One row of `table`, as the JSON object `to_jsonb(row)` made of it.
pub(crate) struct Row<'a> {
    table: &'static str,
    columns: &'a Map<String, Value>,
    run: Option<RunId>,
}

impl<'a> Row<'a> {
    pub(crate) fn new(table: &'static str, value: &'a Value) -> Result<Self> {
        match value {
            Value::Object(columns) => {
                let id_column = if table == "runs" { "id" } else { "run_id" };
                let run = columns
                    .get(id_column)
                    .and_then(Value::as_str)
                    .and_then(|id| id.parse().ok())
                    .map(RunId::from_uuid);
                Ok(Self {
                    table,
                    columns,
                    run,
                })
            }
            other => Err(decode_error(table, "*", other, "expected a row object")),
        }
    }

    fn bad(&self, column: &str, value: &Value, why: impl Display) -> Error {
        let error = decode_error(self.table, column, value, why);
        match self.run {
            Some(run) => error.with_run(run),
            None => error,
        }
    }

    fn raw(&self, column: &str) -> Result<&'a Value> {
        self.columns
            .get(column)
            .ok_or_else(|| self.bad(column, &Value::Null, "column missing"))
    }

    fn opt<T>(&self, column: &str, decode: impl FnOnce(&Value) -> Result<T>) -> Result<Option<T>> {
        match self.raw(column)? {
            Value::Null => Ok(None),
            value => decode(value).map(Some),
        }
    }

    fn text_of(&self, column: &str, value: &'a Value) -> Result<&'a str> {
        value
            .as_str()
            .ok_or_else(|| self.bad(column, value, "expected text"))
    }

    pub(crate) fn text(&self, column: &str) -> Result<String> {
        let value = self.raw(column)?;
        self.text_of(column, value).map(str::to_owned)
    }

    pub(crate) fn opt_text(&self, column: &str) -> Result<Option<String>> {
        self.opt(column, |value| {
            self.text_of(column, value).map(str::to_owned)
        })
    }

    /// A text column parsed with `FromStr` (states, ids).
    pub(crate) fn parse<T>(&self, column: &str) -> Result<T>
    where
        T: FromStr,
        T::Err: Display,
    {
        let value = self.raw(column)?;
        self.parse_value(column, value)
    }

    pub(crate) fn opt_parse<T>(&self, column: &str) -> Result<Option<T>>
    where
        T: FromStr,
        T::Err: Display,
    {
        self.opt(column, |value| self.parse_value(column, value))
    }

    fn parse_value<T>(&self, column: &str, value: &Value) -> Result<T>
    where
        T: FromStr,
        T::Err: Display,
    {
        self.text_of(column, value)?
            .parse()
            .map_err(|e| self.bad(column, value, e))
    }

    pub(crate) fn uuid(&self, column: &str) -> Result<Uuid> {
        self.parse(column)
    }

    pub(crate) fn opt_uuid(&self, column: &str) -> Result<Option<Uuid>> {
        self.opt_parse(column)
    }

    fn int(&self, column: &str) -> Result<i64> {
        let value = self.raw(column)?;
        value
            .as_i64()
            .ok_or_else(|| self.bad(column, value, "expected an integer"))
    }

    /// A counter: a non-negative integer that fits `T`.
    pub(crate) fn count<T: TryFrom<i64>>(&self, column: &str) -> Result<T> {
        let int = self.int(column)?;
        T::try_from(int).map_err(|_| {
            self.bad(
                column,
                &Value::from(int),
                "expected a non-negative counter in range",
            )
        })
    }

    pub(crate) fn bool(&self, column: &str) -> Result<bool> {
        let value = self.raw(column)?;
        value
            .as_bool()
            .ok_or_else(|| self.bad(column, value, "expected a boolean"))
    }

    fn time_of(&self, column: &str, value: &Value) -> Result<OffsetDateTime> {
        let text = self.text_of(column, value)?;
        OffsetDateTime::parse(text, &Rfc3339)
            .map(|at| at.to_offset(UtcOffset::UTC))
            .map_err(|e| self.bad(column, value, e))
    }

    pub(crate) fn time(&self, column: &str) -> Result<OffsetDateTime> {
        let value = self.raw(column)?;
        self.time_of(column, value)
    }

    pub(crate) fn opt_time(&self, column: &str) -> Result<Option<OffsetDateTime>> {
        self.opt(column, |value| self.time_of(column, value))
    }

    /// A jsonb column as stored.
    pub(crate) fn json(&self, column: &str) -> Result<Value> {
        self.raw(column).cloned()
    }

    /// A jsonb column holding a serde type phaseflow wrote.
    pub(crate) fn decoded<T: DeserializeOwned>(&self, column: &str) -> Result<T> {
        let value = self.raw(column)?;
        serde_json::from_value(value.clone()).map_err(|e| self.bad(column, value, e))
    }
}

/// `store_decode`: `phaseflow.<table>.<column>` holds a value phaseflow cannot read.
pub(crate) fn decode_error(table: &str, column: &str, value: &Value, why: impl Display) -> Error {
    let mut shown = value.to_string();
    if shown.len() > 200 {
        let mut end = 200;
        while !shown.is_char_boundary(end) {
            end -= 1;
        }
        shown.truncate(end);
        shown.push('…');
    }
    Error::new(
        ErrorCode::StoreDecode,
        format!("phaseflow.{table}.{column} holds {shown}, which phaseflow cannot read: {why}"),
    )
    .with_hint(
        "the row was written by something other than this phaseflow version; fix or remove it",
    )
}

pub(crate) fn run(value: &Value) -> Result<RunRecord> {
    let row = Row::new("runs", value)?;
    Ok(RunRecord {
        id: RunId::from_uuid(row.uuid("id")?),
        workflow: row.text("workflow")?,
        subject: row.text("subject")?,
        worktree: row.text("worktree")?,
        state: row.parse("state")?,
        paused_from: row.opt_parse("paused_from")?,
        current_phase: row.opt_text("current_phase")?.map(PhaseKey::new),
        created_at: row.time("created_at")?,
    })
}

/// The run's `last_seq` column.
pub(crate) fn last_seq(value: &Value) -> Result<u64> {
    Row::new("runs", value)?.count("last_seq")
}

pub(crate) fn phase(value: &Value) -> Result<PhaseRecord> {
    let row = Row::new("run_phases", value)?;
    Ok(PhaseRecord {
        run: RunId::from_uuid(row.uuid("run_id")?),
        key: PhaseKey::new(row.text("key")?),
        position: row.count("position")?,
        state: row.parse("state")?,
        attempts: row.count("attempts")?,
        round_repairs: row.count("round_repairs")?,
        repair: row.bool("repair")?,
        instructions: row.opt_text("instructions")?,
        feedback: row.opt_text("feedback")?,
        owner: row.opt_uuid("owner")?.map(EngineId::from_uuid),
    })
}

pub(crate) fn session(value: &Value) -> Result<SessionRecord> {
    let row = Row::new("sessions", value)?;
    Ok(SessionRecord {
        id: SessionId::from_uuid(row.uuid("id")?),
        run: RunId::from_uuid(row.uuid("run_id")?),
        role: RoleKey::new(row.text("role")?),
        state: row.parse("state")?,
        last_dedup: row.opt_text("last_dedup")?.map(DedupKey::from_hex),
        last_prompt_at: row.opt_time("last_prompt_at")?,
        recovery_attempts: row.count("recovery_attempts")?,
        last_capture_seq: row.count("last_capture_seq")?,
    })
}

pub(crate) fn artifact(value: &Value) -> Result<ArtifactRecord> {
    let row = Row::new("artifacts", value)?;
    let content = row.json("content")?;
    Ok(ArtifactRecord {
        id: ArtifactId::from_uuid(row.uuid("id")?),
        run: RunId::from_uuid(row.uuid("run_id")?),
        phase: PhaseKey::new(row.text("phase")?),
        attempt: row.count("attempt")?,
        path: row.text("path")?,
        hash: ContentHash::from_hex(row.text("hash")?),
        schema_id: row.text("schema_id")?,
        size: row.count("size")?,
        content: (!content.is_null()).then_some(content),
        errors: row.decoded("errors")?,
        recorded_at: row.time("recorded_at")?,
    })
}

pub(crate) fn approval(value: &Value) -> Result<ApprovalRecord> {
    let row = Row::new("approval_requests", value)?;
    let decision = match row.json("decision")? {
        Value::Null => None,
        _ => Some(DecisionRecord {
            decision: row.decoded("decision")?,
            actor: row.text("decided_by")?,
            note: row.opt_text("decision_note")?,
            at: row.time("decided_at")?,
        }),
    };
    Ok(ApprovalRecord {
        id: ApprovalId::from_uuid(row.uuid("id")?),
        run: RunId::from_uuid(row.uuid("run_id")?),
        phase: PhaseKey::new(row.text("phase")?),
        attempt: row.count("attempt")?,
        gate: GateKey::new(row.text("gate")?),
        kind: row.decoded("kind")?,
        key: row.text("key")?,
        payload: row.json("payload")?,
        decision,
        created_at: row.time("created_at")?,
    })
}

pub(crate) fn chunk(value: &Value) -> Result<(SessionId, TranscriptChunk)> {
    let row = Row::new("transcript_chunks", value)?;
    Ok((
        SessionId::from_uuid(row.uuid("session_id")?),
        TranscriptChunk {
            seq: row.count("seq")?,
            text: row.text("text")?,
        },
    ))
}

pub(crate) fn event(value: &Value) -> Result<Event> {
    let row = Row::new("run_events", value)?;
    Ok(Event {
        seq: row.count("seq")?,
        run: RunId::from_uuid(row.uuid("run_id")?),
        at: row.time("at")?,
        key: row.text("key")?,
        kind: row.decoded::<EventKind>("payload")?,
    })
}

/// Decodes a jsonb array of rows (`jsonb_agg(…)`, `NULL` for none).
pub(crate) fn list<T>(
    table: &'static str,
    value: &Value,
    decode: impl Fn(&Value) -> Result<T>,
) -> Result<Vec<T>> {
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Array(rows) => rows.iter().map(decode).collect(),
        other => Err(decode_error(table, "*", other, "expected a list of rows")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phaseflow::ErrorCode;
    use serde_json::json;

    fn run_row() -> Value {
        json!({
            "id": "7f1d3c9e-3d6a-4a57-9a43-2b4c9f3e2a10",
            "workflow": "feature",
            "subject": "T-1",
            "worktree": "/w",
            "state": "executing",
            "paused_from": null,
            "current_phase": "plan",
            "last_seq": 3,
            "created_at": "2025-11-23T21:30:00.123456+01:00",
            "updated_at": "2025-11-23T21:30:00.123456+00:00"
        })
    }

    #[test]
    fn a_good_row_decodes_with_its_time_in_utc() {
        let run = run(&run_row()).unwrap();
        assert_eq!(run.current_phase, Some(PhaseKey::new("plan")));
        assert_eq!(run.created_at.offset(), UtcOffset::UTC);
        assert_eq!(run.created_at.hour(), 20);
    }

    #[test]
    fn an_unknown_state_names_table_column_and_value() {
        let mut row = run_row();
        row["state"] = json!("sleeping");
        let err = run(&row).unwrap_err();
        assert_eq!(err.code(), ErrorCode::StoreDecode);
        assert!(
            err.message()
                .contains("phaseflow.runs.state holds \"sleeping\""),
            "{err}"
        );
        assert!(
            err.message().contains("unknown run state `sleeping`"),
            "{err}"
        );
        assert!(err.run().is_some());
    }

    #[test]
    fn negative_counters_are_decode_errors() {
        let mut row = run_row();
        row["last_seq"] = json!(-1);
        let err = last_seq(&row).unwrap_err();
        assert_eq!(err.code(), ErrorCode::StoreDecode);
        assert!(
            err.message().contains("phaseflow.runs.last_seq holds -1"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_column_is_a_decode_error() {
        let mut row = run_row();
        row.as_object_mut().unwrap().remove("subject");
        assert_eq!(run(&row).unwrap_err().code(), ErrorCode::StoreDecode);
    }

    #[test]
    fn long_values_are_shortened_in_messages() {
        let err = decode_error("t", "c", &json!("x".repeat(1000)), "why");
        assert!(err.message().len() < 400);
    }
}
