//! One store command = one transaction, in four round trips:
//!
//! 1. `BEGIN; SELECT 1 FROM phaseflow.runs WHERE id = '…' FOR UPDATE` — one simple-query message
//!    that opens the transaction and takes the run's row lock (every writer takes it first, so
//!    commands on one run are serialised, and concurrent engines queue here);
//! 2. [`load`]: one statement, started after the lock was granted so it sees every earlier
//!    command's commit, reads the run's [`Snapshot`]: its phases and sessions and what the
//!    command's [`Needs`] name (its approval requests, the artifact with the command's path and
//!    hash, the transcript chunks it re-sends, whether some event keys exist, whether a session
//!    id is recorded anywhere);
//! 3. the command's rules — [`phaseflow::store::rules`], shared with `MemoryStore` — decide on
//!    the snapshot and return the [`Changes`];
//! 4. [`apply`]: one statement writes every changed row and appends the events, then `COMMIT`.
//!
//! Idempotent inserts compare with the stored row *before* writing rather than after: the
//! stored artifact, approval request or transcript chunk was read in step 2 under the run lock,
//! and every writer holds that lock, so nothing can appear between the read and the insert.
//! The inserts still say `ON CONFLICT DO NOTHING`, and event keys are filtered against
//! `run_events` inside the insert itself, so a replayed event is never appended twice. Event
//! seqs are `last_seq + 1, + 2, …` over the events actually inserted, and `runs.last_seq` is
//! advanced by the same count in the same statement: gapless, because the run row is locked.

use phaseflow::error::{Error, ErrorCode, Result};
use phaseflow::event::GateKind;
use phaseflow::ids::{DedupKey, PhaseKey};
use phaseflow::state::RunState;
use phaseflow::store::rules::{Changes, Needs, Snapshot, Target};
use serde_json::Value;
use sqlx::{PgConnection, Postgres, Transaction};
use time::OffsetDateTime;

use crate::{db_error, decode};

/// Step 1: the statement that opens the transaction and locks the run row. Ids are uuids
/// formatted by `uuid` (hex digits and dashes), so splicing them into the SQL is safe.
///
/// `plan_cache_mode = force_generic_plan` (for this transaction only) makes PostgreSQL plan
/// the load and write statements once per connection instead of once per execution: both
/// are driven by primary and unique keys, so the generic plan is the right one, and
/// re-planning the nine-part write statement costs more than executing it.
pub(crate) fn begin_sql(target: Target) -> String {
    let run = match target {
        Target::Run(run) => format!("'{run}'"),
        Target::Session(session) => {
            format!("(SELECT run_id FROM phaseflow.sessions WHERE id = '{session}')")
        }
        Target::Approval(request) => {
            format!("(SELECT run_id FROM phaseflow.approval_requests WHERE id = '{request}')")
        }
    };
    format!(
        "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; \
         SELECT 1 FROM phaseflow.runs WHERE id = {run} FOR UPDATE"
    )
}

/// A loaded snapshot and the run's event sequence number, which [`apply`] continues from.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub(crate) snapshot: Snapshot,
    pub(crate) last_seq: u64,
}

/// `now`, at the microsecond precision PostgreSQL keeps, so a returned record equals its re-read.
pub(crate) fn now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000 * 1_000)
        .unwrap_or(now)
}

fn to_i64(value: u64, what: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| {
        Error::new(
            ErrorCode::InvalidArgument,
            format!("{what} {value} exceeds the store's range (i64)"),
        )
    })
}

/// Step 2: reads what the command works on (see the module docs).
pub(crate) async fn load(conn: &mut PgConnection, target: Target, needs: &Needs) -> Result<Loaded> {
    let (run, session, approval) = match target {
        Target::Run(run) => (Some(run.as_uuid()), None, None),
        Target::Session(session) => (None, Some(session.as_uuid()), None),
        Target::Approval(request) => (None, None, Some(request.as_uuid())),
    };
    let (artifact_path, artifact_hash) = match &needs.artifact {
        Some((path, hash)) => (Some(path.as_str()), Some(hash.as_str())),
        None => (None, None),
    };
    let (chunk_session, chunk_seqs) = match &needs.chunks {
        Some((session, seqs)) => (
            Some(session.as_uuid()),
            seqs.iter()
                .map(|seq| to_i64(*seq, "transcript seq"))
                .collect::<Result<Vec<_>>>()?,
        ),
        None => (None, Vec::new()),
    };
    #[allow(clippy::type_complexity)]
    let row: Option<(
        Value,
        Option<Value>,
        Option<Value>,
        Option<Value>,
        Vec<String>,
        Option<Value>,
        bool,
        Option<Value>,
    )> = sqlx::query_as(LOAD_SQL)
        .bind(run)
        .bind(session)
        .bind(approval)
        .bind(needs.approvals)
        .bind(&needs.event_keys)
        .bind(artifact_path)
        .bind(artifact_hash)
        .bind(needs.session.map(|s| s.as_uuid()))
        .bind(chunk_session)
        .bind(&chunk_seqs)
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| db_error("reading the run", e))?;
    let Some((run, phases, sessions, approvals, keys, artifact, session_recorded, chunks)) = row
    else {
        return Err(target.not_found());
    };
    let last_seq = decode::last_seq(&run)?;
    let snapshot = Snapshot {
        now: now(),
        run: decode::run(&run)?,
        phases: decode::list("run_phases", &phases.unwrap_or_default(), decode::phase)?,
        sessions: decode::list("sessions", &sessions.unwrap_or_default(), decode::session)?,
        approvals: match &approvals {
            Some(list) => decode::list("approval_requests", list, decode::approval)?,
            None => Vec::new(),
        },
        event_keys: needs
            .event_keys
            .iter()
            .map(|key| (key.clone(), keys.contains(key)))
            .collect(),
        artifact: artifact.as_ref().map(decode::artifact).transpose()?,
        session_recorded,
        chunks: decode::list(
            "transcript_chunks",
            &chunks.unwrap_or_default(),
            decode::chunk,
        )?,
    };
    Ok(Loaded { snapshot, last_seq })
}

const LOAD_SQL: &str = "
SELECT to_jsonb(r) AS run,
       (SELECT jsonb_agg(to_jsonb(p) ORDER BY p.position)
          FROM phaseflow.run_phases p WHERE p.run_id = r.id) AS phases,
       (SELECT jsonb_agg(to_jsonb(s) ORDER BY s.created_seq)
          FROM phaseflow.sessions s WHERE s.run_id = r.id) AS sessions,
       CASE WHEN $4 THEN
           (SELECT coalesce(jsonb_agg(to_jsonb(q) ORDER BY q.created_seq), '[]'::jsonb)
              FROM phaseflow.approval_requests q WHERE q.run_id = r.id)
       END AS approvals,
       ARRAY(SELECT e.key FROM phaseflow.run_events e
              WHERE e.run_id = r.id AND e.key = ANY($5::text[])) AS keys,
       (SELECT to_jsonb(a) FROM phaseflow.artifacts a
         WHERE a.run_id = r.id AND a.path = $6 AND a.hash = $7) AS artifact,
       EXISTS (SELECT 1 FROM phaseflow.sessions s WHERE s.id = $8) AS session_recorded,
       (SELECT jsonb_agg(to_jsonb(c)) FROM phaseflow.transcript_chunks c
         WHERE c.session_id = $9 AND c.seq = ANY($10::int8[])) AS chunks
  FROM phaseflow.runs r
 WHERE r.id = coalesce($1::uuid,
                       (SELECT run_id FROM phaseflow.sessions WHERE id = $2::uuid),
                       (SELECT run_id FROM phaseflow.approval_requests WHERE id = $3::uuid))";

/// Step 4: writes the changes in one statement (see [`APPLY_SQL`]). Returns whether anything
/// was written: `false` when every event was already recorded and no row changed (a replay),
/// and the caller rolls back instead of committing.
pub(crate) async fn apply(
    tx: &mut Transaction<'static, Postgres>,
    last_seq: u64,
    changes: Changes,
) -> Result<bool> {
    let changes_rows = changes.changes_rows();
    let Changes {
        at,
        run: run_row,
        phases,
        sessions,
        approvals,
        events,
        artifacts,
        chunks,
        ..
    } = changes;
    let run = run_row.id;
    let mut event_keys = Vec::with_capacity(events.len());
    let mut event_types = Vec::with_capacity(events.len());
    let mut event_phases = Vec::with_capacity(events.len());
    let mut event_payloads = Vec::with_capacity(events.len());
    for (key, kind) in events {
        event_types.push(kind.type_name());
        event_phases.push(kind.phase().map(|phase| phase.as_str().to_owned()));
        event_payloads.push(serde_json::to_value(&kind).map_err(|e| {
            Error::new(
                ErrorCode::InternalStateCorruption,
                format!("cannot serialise event {key}: {e}"),
            )
        })?);
        event_keys.push(key);
    }
    let counter = |value: u64, what: &str| to_i64(value, what);
    let seq_chunks: Vec<i64> = chunks
        .iter()
        .map(|(_, c)| counter(c.seq, "transcript seq"))
        .collect::<Result<_>>()?;
    let session_captures: Vec<i64> = sessions
        .iter()
        .map(|s| counter(s.last_capture_seq, "last_capture_seq"))
        .collect::<Result<_>>()?;
    let artifact_sizes: Vec<i64> = artifacts
        .iter()
        .map(|a| counter(a.size, "artifact size"))
        .collect::<Result<_>>()?;
    let decisions: Vec<Option<Value>> = approvals
        .iter()
        .map(|a| {
            a.decision
                .as_ref()
                .map(|d| serde_json::to_value(&d.decision))
                .transpose()
                .map_err(|e| {
                    Error::new(
                        ErrorCode::InvalidArgument,
                        format!("cannot serialise a decision: {e}"),
                    )
                })
        })
        .collect::<Result<_>>()?;
    let gate_kinds: Vec<&str> = approvals
        .iter()
        .map(|a| match a.kind {
            GateKind::Workflow => "workflow",
            GateKind::Failure => "failure",
        })
        .collect();

    let inserted_events: i64 = sqlx::query_scalar(APPLY_SQL)
        // runs + events
        .bind(run.as_uuid())
        .bind(to_i64(last_seq, "last_seq")?)
        .bind(at)
        .bind(run_row.state.as_str())
        .bind(run_row.paused_from.map(RunState::as_str))
        .bind(run_row.current_phase.as_ref().map(PhaseKey::as_str))
        .bind(&event_keys)
        .bind(&event_types)
        .bind(&event_phases)
        .bind(&event_payloads)
        // run_phases
        .bind(phases.iter().map(|p| p.key.as_str()).collect::<Vec<_>>())
        .bind(phases.iter().map(|p| p.state.as_str()).collect::<Vec<_>>())
        .bind(
            phases
                .iter()
                .map(|p| i64::from(p.attempts))
                .collect::<Vec<_>>(),
        )
        .bind(
            phases
                .iter()
                .map(|p| i64::from(p.round_repairs))
                .collect::<Vec<_>>(),
        )
        .bind(phases.iter().map(|p| p.repair).collect::<Vec<_>>())
        .bind(
            phases
                .iter()
                .map(|p| p.instructions.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            phases
                .iter()
                .map(|p| p.feedback.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            phases
                .iter()
                .map(|p| p.owner.map(|o| o.as_uuid()))
                .collect::<Vec<_>>(),
        )
        // sessions
        .bind(sessions.iter().map(|s| s.id.as_uuid()).collect::<Vec<_>>())
        .bind(sessions.iter().map(|s| s.role.as_str()).collect::<Vec<_>>())
        .bind(
            sessions
                .iter()
                .map(|s| s.state.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            sessions
                .iter()
                .map(|s| s.last_dedup.as_ref().map(DedupKey::as_str))
                .collect::<Vec<_>>(),
        )
        .bind(
            sessions
                .iter()
                .map(|s| s.last_prompt_at)
                .collect::<Vec<_>>(),
        )
        .bind(
            sessions
                .iter()
                .map(|s| i64::from(s.recovery_attempts))
                .collect::<Vec<_>>(),
        )
        .bind(&session_captures)
        // artifacts
        .bind(artifacts.iter().map(|a| a.id.as_uuid()).collect::<Vec<_>>())
        .bind(
            artifacts
                .iter()
                .map(|a| a.phase.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            artifacts
                .iter()
                .map(|a| i64::from(a.attempt))
                .collect::<Vec<_>>(),
        )
        .bind(
            artifacts
                .iter()
                .map(|a| a.path.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            artifacts
                .iter()
                .map(|a| a.hash.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            artifacts
                .iter()
                .map(|a| a.schema_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(&artifact_sizes)
        .bind(
            artifacts
                .iter()
                .map(|a| a.content.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            artifacts
                .iter()
                .map(|a| serde_json::to_value(&a.errors).unwrap_or(Value::Null))
                .collect::<Vec<_>>(),
        )
        .bind(artifacts.iter().map(|a| a.recorded_at).collect::<Vec<_>>())
        // approval_requests
        .bind(approvals.iter().map(|a| a.id.as_uuid()).collect::<Vec<_>>())
        .bind(
            approvals
                .iter()
                .map(|a| a.phase.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            approvals
                .iter()
                .map(|a| i64::from(a.attempt))
                .collect::<Vec<_>>(),
        )
        .bind(
            approvals
                .iter()
                .map(|a| a.gate.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(&gate_kinds)
        .bind(approvals.iter().map(|a| a.key.as_str()).collect::<Vec<_>>())
        .bind(
            approvals
                .iter()
                .map(|a| a.payload.clone())
                .collect::<Vec<_>>(),
        )
        .bind(&decisions)
        .bind(
            approvals
                .iter()
                .map(|a| a.decision.as_ref().map(|d| d.actor.as_str()))
                .collect::<Vec<_>>(),
        )
        .bind(
            approvals
                .iter()
                .map(|a| a.decision.as_ref().and_then(|d| d.note.as_deref()))
                .collect::<Vec<_>>(),
        )
        .bind(
            approvals
                .iter()
                .map(|a| a.decision.as_ref().map(|d| d.at))
                .collect::<Vec<_>>(),
        )
        .bind(approvals.iter().map(|a| a.created_at).collect::<Vec<_>>())
        // transcript_chunks
        .bind(chunks.iter().map(|(s, _)| s.as_uuid()).collect::<Vec<_>>())
        .bind(&seq_chunks)
        .bind(
            chunks
                .iter()
                .map(|(_, c)| c.text.as_str())
                .collect::<Vec<_>>(),
        )
        .fetch_one(&mut **tx)
        .await
        .map_err(|e| db_error("writing the command's rows", e).with_run(run))?;
    Ok(changes_rows || inserted_events > 0)
}

/// Every write of a command in one statement. Data-modifying CTEs all run (whether or not the
/// final SELECT reads them) on the snapshot taken after the run lock was granted; an empty array
/// writes nothing. Rows are written whole: the Rust side decided their new content.
const APPLY_SQL: &str = "
WITH new_events AS (
    SELECT e.ord, e.key, e.type, e.phase, e.payload
      FROM unnest($7::text[], $8::text[], $9::text[], $10::jsonb[])
           WITH ORDINALITY AS e(key, type, phase, payload, ord)
     WHERE NOT EXISTS (SELECT 1 FROM phaseflow.run_events x WHERE x.run_id = $1 AND x.key = e.key)
), numbered AS (
    SELECT row_number() OVER (ORDER BY ord) AS n, key, type, phase, payload FROM new_events
), event_insert AS (
    INSERT INTO phaseflow.run_events (run_id, seq, key, type, phase, payload, at)
    SELECT $1, $2 + n, key, type, phase, payload, $3 FROM numbered
), run_update AS (
    UPDATE phaseflow.runs
       SET state = $4, paused_from = $5, current_phase = $6,
           last_seq = $2 + (SELECT count(*) FROM numbered), updated_at = $3
     WHERE id = $1
), phase_update AS (
    UPDATE phaseflow.run_phases p
       SET state = u.state, attempts = u.attempts, round_repairs = u.round_repairs,
           repair = u.repair, instructions = u.instructions, feedback = u.feedback, owner = u.owner
      FROM unnest($11::text[], $12::text[], $13::int8[], $14::int8[], $15::bool[], $16::text[],
                  $17::text[], $18::uuid[])
           AS u(key, state, attempts, round_repairs, repair, instructions, feedback, owner)
     WHERE p.run_id = $1 AND p.key = u.key
), session_upsert AS (
    INSERT INTO phaseflow.sessions
           (id, run_id, role, state, last_dedup, last_prompt_at, recovery_attempts, last_capture_seq)
    SELECT u.id, $1, u.role, u.state, u.last_dedup, u.last_prompt_at, u.recovery_attempts,
           u.last_capture_seq
      FROM unnest($19::uuid[], $20::text[], $21::text[], $22::text[], $23::timestamptz[],
                  $24::int8[], $25::int8[])
           WITH ORDINALITY AS u(id, role, state, last_dedup, last_prompt_at, recovery_attempts,
                                last_capture_seq, ord)
     ORDER BY u.ord
    ON CONFLICT (id) DO UPDATE
       SET state = excluded.state, last_dedup = excluded.last_dedup,
           last_prompt_at = excluded.last_prompt_at,
           recovery_attempts = excluded.recovery_attempts,
           last_capture_seq = excluded.last_capture_seq
), artifact_insert AS (
    INSERT INTO phaseflow.artifacts
           (id, run_id, phase, attempt, path, hash, schema_id, size, content, errors, recorded_at)
    SELECT u.id, $1, u.phase, u.attempt, u.path, u.hash, u.schema_id, u.size, u.content, u.errors,
           u.recorded_at
      FROM unnest($26::uuid[], $27::text[], $28::int8[], $29::text[], $30::text[], $31::text[],
                  $32::int8[], $33::jsonb[], $34::jsonb[], $35::timestamptz[])
           WITH ORDINALITY AS u(id, phase, attempt, path, hash, schema_id, size, content, errors,
                                recorded_at, ord)
     ORDER BY u.ord
    ON CONFLICT (run_id, path, hash) DO NOTHING
), approval_upsert AS (
    INSERT INTO phaseflow.approval_requests
           (id, run_id, phase, attempt, gate, kind, key, payload, decision, decided_by,
            decision_note, decided_at, created_at)
    SELECT u.id, $1, u.phase, u.attempt, u.gate, u.kind, u.key, u.payload, u.decision,
           u.decided_by, u.decision_note, u.decided_at, u.created_at
      FROM unnest($36::uuid[], $37::text[], $38::int8[], $39::text[], $40::text[], $41::text[],
                  $42::jsonb[], $43::jsonb[], $44::text[], $45::text[], $46::timestamptz[],
                  $47::timestamptz[])
           WITH ORDINALITY AS u(id, phase, attempt, gate, kind, key, payload, decision, decided_by,
                                decision_note, decided_at, created_at, ord)
     ORDER BY u.ord
    ON CONFLICT (id) DO UPDATE
       SET decision = excluded.decision, decided_by = excluded.decided_by,
           decision_note = excluded.decision_note, decided_at = excluded.decided_at
), chunk_insert AS (
    INSERT INTO phaseflow.transcript_chunks (session_id, seq, text)
    SELECT * FROM unnest($48::uuid[], $49::int8[], $50::text[])
    ON CONFLICT (session_id, seq) DO NOTHING
)
SELECT count(*) FROM numbered";
