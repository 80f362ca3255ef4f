//! The PostgreSQL [`Store`] for phaseflow: [`PgStore`].
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use phaseflow::store::Store;
//! use phaseflow_pg::PgStore;
//!
//! # async fn demo() -> phaseflow::Result<()> {
//! let store = PgStore::connect("postgres://phaseflow@localhost/app").await?;
//! store.migrate().await?; // creates or upgrades the `phaseflow` schema; safe on every start
//! let store: Arc<dyn Store> = Arc::new(store);
//! # let _ = store;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! Every table lives in the `phaseflow` schema (created by [`PgStore::migrate`]), including the
//! migrator's own bookkeeping table `phaseflow._sqlx_migrations`, so phaseflow can share a
//! database with an application that runs its own sqlx migrations: `runs`, `run_phases`,
//! `run_events` (unique `(run_id, key)`, gapless `seq` per run), `sessions` (unique
//! `(run_id, role)`), `artifacts` (unique `(run_id, path, hash)`), `approval_requests` (unique
//! `key`) and `transcript_chunks` (primary key `(session_id, seq)`). States are stored as their
//! stable strings, payloads as `jsonb`.
//!
//! # Transactions
//!
//! Each command is one transaction that locks the run row first (`SELECT … FOR UPDATE`), reads
//! what it works on, applies the same rules as `phaseflow-fake`'s `MemoryStore`, writes every
//! changed row and event in one statement and commits: four round trips, and no transaction is
//! ever open while waiting on anything but PostgreSQL. A command refused by its rules (the run
//! was paused or aborted, another engine claimed the phase, …) rolls back having written
//! nothing. [`PgStore::commits`] counts the transactions that wrote.
//!
//! # Errors
//!
//! A statement or connection failure is `store_unavailable` (recoverable: the command wrote
//! nothing and can be retried) with the sqlx error as its source. A row phaseflow cannot read —
//! an unknown state string, a negative counter, an event payload that is no event — is
//! `store_decode`, naming the table, column and value.
//!
//! # Testing
//!
//! With the `testing` feature, `phaseflow_pg::testing` gives every test a fresh migrated
//! database on a throwaway cluster it starts itself (or on `DATABASE_URL`), and `TestStore`, a
//! `PgStore` that drops its database with it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use phaseflow::error::{Error, ErrorCode, Result};
use phaseflow::event::Event;
use phaseflow::ids::{ApprovalId, PhaseKey, RoleKey, RunId, SessionId};
use phaseflow::state::{PhaseState, RunState};
use phaseflow::store::rules::{
    self, Applied, Needs, Snapshot, Target, approval_not_found, phase_not_found, run_not_found,
    session_not_found,
};
use phaseflow::store::{
    ApprovalRecord, ArtifactRecord, BeginAttempt, BeginOutcome, Decide, FinishPhase, Finished,
    MarkBusy, NewRun, OperatorAction, PhaseRecord, PhaseWork, RecordPrompt, RecordVerdict,
    RunRecord, SessionEvent, SessionRecord, Store, TranscriptChunk,
};
use serde_json::Value;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};

mod decode;
mod error;
#[cfg(feature = "testing")]
pub mod testing;
mod tx;

pub(crate) use error::db_error;

/// The embedded migrations (`phaseflow-pg/migrations`). Their bookkeeping table is
/// `phaseflow._sqlx_migrations`, not the default `public._sqlx_migrations`, so an application
/// that runs its own sqlx migrations on the same database never sees phaseflow's versions.
static MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| {
    let mut migrator = sqlx::migrate!();
    migrator.create_schema("phaseflow");
    migrator.dangerous_set_table_name("phaseflow._sqlx_migrations");
    migrator
});

pub(crate) fn migrator() -> &'static Migrator {
    &MIGRATOR
}

/// Pool options suited to phaseflow: sqlx's defaults, except that a connection is not pinged
/// each time it is taken from the pool (`test_before_acquire(false)`). The ping is a round trip
/// of its own on every store command, and a dead connection is reported by the command's first
/// statement anyway, as a recoverable `store_unavailable` the engine retries.
pub fn pool_options() -> PgPoolOptions {
    PgPoolOptions::new().test_before_acquire(false)
}

/// The phaseflow [`Store`] on PostgreSQL. Cheap to clone (clones share the pool and counter).
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
    commits: Arc<AtomicU64>,
}

impl PgStore {
    /// A store on an existing pool. Run [`PgStore::migrate`] once before using it.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            commits: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Connects a new pool to `url` (`postgres://user:password@host/database`).
    ///
    /// The pool skips sqlx's default ping before handing out a connection (see
    /// [`pool_options`]); pass a pool of your own to [`PgStore::new`] to choose otherwise.
    pub async fn connect(url: &str) -> Result<Self> {
        let pool = pool_options()
            .connect(url)
            .await
            .map_err(|e| db_error("connecting", e))?;
        Ok(Self::new(pool))
    }

    /// Creates or upgrades phaseflow's tables in the `phaseflow` schema.
    ///
    /// Safe to run on every start-up and from several processes at once: sqlx's migrator holds
    /// a PostgreSQL advisory lock while it creates the schema and applies what is missing, and
    /// skips what was applied.
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await.map_err(|e| {
            let code = match &e {
                sqlx::migrate::MigrateError::Execute(_) => ErrorCode::StoreUnavailable,
                _ => ErrorCode::InternalStateCorruption,
            };
            Error::new(code, format!("migrating the phaseflow schema failed: {e}"))
                .with_hint("check that the database is reachable and that its phaseflow schema was made by this or an older phaseflow-pg")
                .with_source(e)
        })
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// How many transactions store commands committed through this store and its clones.
    ///
    /// Only transactions that wrote count: reads, replays that found everything recorded and
    /// commands refused by the rules roll back instead. The happy path of a phase without a
    /// gate commits four (`begin_attempt`, `mark_busy`, `record_prompt`, `finish_phase`).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Runs one command: lock, load, rules, write, commit (see the `tx` module).
    async fn write<T>(
        &self,
        target: Target,
        needs: Needs,
        command: impl FnOnce(Snapshot) -> Result<Applied<T>>,
    ) -> Result<T> {
        let mut transaction = self
            .pool
            .begin_with(AssertSqlSafe(tx::begin_sql(target)))
            .await
            .map_err(|e| db_error("locking the run", e))?;
        let outcome = async {
            let loaded = tx::load(&mut transaction, target, &needs).await?;
            let applied = command(loaded.snapshot)?;
            Ok((applied.output, applied.changes, loaded.last_seq))
        }
        .await;
        match outcome {
            Ok((output, Some(changes), last_seq)) => {
                if tx::apply(&mut transaction, last_seq, changes).await? {
                    transaction
                        .commit()
                        .await
                        .map_err(|e| db_error("committing", e))?;
                    self.commits.fetch_add(1, Ordering::Relaxed);
                } else {
                    let _ = transaction.rollback().await;
                }
                Ok(output)
            }
            Ok((output, None, _)) => {
                let _ = transaction.rollback().await;
                Ok(output)
            }
            Err(error) => {
                // Releases the run lock now rather than when the connection is next used.
                let _ = transaction.rollback().await;
                Err(error)
            }
        }
    }

    /// The run row, or `run_not_found`.
    async fn run_row(&self, run: RunId) -> Result<Value> {
        sqlx::query_scalar("SELECT to_jsonb(r) FROM phaseflow.runs r WHERE r.id = $1")
            .bind(run.as_uuid())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| db_error("reading the run", e))?
            .ok_or_else(|| run_not_found(run))
    }

    /// Rows of a run's child table as a jsonb list, or `run_not_found` when the run is unknown.
    async fn run_children(
        &self,
        sql: &'static str,
        run: RunId,
        arg: Option<&str>,
    ) -> Result<Value> {
        let mut query = sqlx::query_scalar(sql).bind(run.as_uuid());
        if let Some(arg) = arg {
            query = query.bind(arg);
        }
        let found: Option<Option<Value>> = query
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| db_error("reading the run", e))?;
        found
            .map(Option::unwrap_or_default)
            .ok_or_else(|| run_not_found(run))
    }
}

const CREATE_RUN_SQL: &str = "
WITH run_insert AS (
    INSERT INTO phaseflow.runs
           (id, workflow, subject, worktree, state, current_phase, last_seq, created_at, updated_at)
    VALUES ($1, $2, $3, $4, $5, $6[1], 1, $7, $7)
    ON CONFLICT (id) DO NOTHING
    RETURNING id
), phase_insert AS (
    INSERT INTO phaseflow.run_phases (run_id, key, position, state)
    SELECT $1, u.key, u.ord - 1, $8 FROM unnest($6::text[]) WITH ORDINALITY AS u(key, ord)
     WHERE EXISTS (SELECT 1 FROM run_insert)
), event_insert AS (
    INSERT INTO phaseflow.run_events (run_id, seq, key, type, phase, payload, at)
    SELECT $1, 1, $9, $10, NULL, $11, $7 WHERE EXISTS (SELECT 1 FROM run_insert)
)
SELECT EXISTS (SELECT 1 FROM run_insert)";

const RUN_WITH_PHASES_SQL: &str = "
SELECT to_jsonb(r),
       (SELECT jsonb_agg(to_jsonb(p) ORDER BY p.position)
          FROM phaseflow.run_phases p WHERE p.run_id = r.id)
  FROM phaseflow.runs r WHERE r.id = $1";

#[async_trait]
impl Store for PgStore {
    async fn create_run(&self, new: NewRun) -> Result<RunRecord> {
        // One statement, so one implicit transaction: the run, its phases and `run.created`
        // are inserted together, or nothing when the id exists (then compared below).
        let created = rules::create_run(&new, tx::now())?;
        let at = created.run.created_at;
        let (key, event) = &created.event;
        let payload = serde_json::to_value(event).map_err(|e| {
            Error::new(
                ErrorCode::InvalidArgument,
                format!("cannot serialise run.created: {e}"),
            )
        })?;
        let phases: Vec<&str> = new.phases.iter().map(PhaseKey::as_str).collect();
        let inserted: bool = sqlx::query_scalar(CREATE_RUN_SQL)
            .bind(new.id.as_uuid())
            .bind(&new.workflow)
            .bind(&new.subject)
            .bind(&new.worktree)
            .bind(RunState::Planning.as_str())
            .bind(&phases)
            .bind(at)
            .bind(PhaseState::Pending.as_str())
            .bind(key)
            .bind(event.type_name())
            .bind(payload)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| db_error("creating the run", e).with_run(new.id))?;
        if inserted {
            self.commits.fetch_add(1, Ordering::Relaxed);
            return Ok(created.run);
        }
        // The id exists: a replay returns the stored run, anything else is corruption.
        let (run, phases): (Value, Option<Value>) = sqlx::query_as(RUN_WITH_PHASES_SQL)
            .bind(new.id.as_uuid())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| db_error("reading the run", e).with_run(new.id))?
            .ok_or_else(|| run_not_found(new.id))?;
        let stored = decode::run(&run)?;
        let stored_phases: Vec<PhaseKey> =
            decode::list("run_phases", &phases.unwrap_or_default(), decode::phase)?
                .into_iter()
                .map(|phase| phase.key)
                .collect();
        rules::create_run_replay(&new, stored, &stored_phases)
    }

    async fn begin_attempt(&self, cmd: BeginAttempt) -> Result<BeginOutcome> {
        let needs = Needs::begin_attempt(&cmd);
        self.write(Target::Run(cmd.work.run), needs, |snapshot| {
            rules::begin_attempt(snapshot, cmd)
        })
        .await
    }

    async fn claim_phase(&self, work: PhaseWork) -> Result<PhaseRecord> {
        self.write(Target::Run(work.run), Needs::default(), |snapshot| {
            rules::claim_phase(snapshot, work)
        })
        .await
    }

    async fn mark_busy(&self, cmd: MarkBusy) -> Result<SessionRecord> {
        let needs = Needs::mark_busy(&cmd);
        self.write(Target::Run(cmd.work.run), needs, |snapshot| {
            rules::mark_busy(snapshot, cmd)
        })
        .await
    }

    async fn record_prompt(&self, cmd: RecordPrompt) -> Result<()> {
        self.write(Target::Run(cmd.work.run), Needs::default(), |snapshot| {
            rules::record_prompt(snapshot, cmd)
        })
        .await
    }

    async fn record_session_event(
        &self,
        work: PhaseWork,
        session: SessionId,
        event: SessionEvent,
    ) -> Result<SessionRecord> {
        let needs = Needs::session_event(&work, &event);
        self.write(Target::Run(work.run), needs, |snapshot| {
            rules::record_session_event(snapshot, work, session, event)
        })
        .await
    }

    async fn record_verdict(&self, cmd: RecordVerdict) -> Result<ArtifactRecord> {
        let needs = Needs::record_verdict(&cmd);
        self.write(Target::Run(cmd.work.run), needs, |snapshot| {
            rules::record_verdict(snapshot, cmd)
        })
        .await
    }

    async fn finish_phase(&self, cmd: FinishPhase) -> Result<Finished> {
        let needs = Needs::finish_phase(&cmd);
        self.write(Target::Run(cmd.work.run), needs, |snapshot| {
            rules::finish_phase(snapshot, cmd)
        })
        .await
    }

    async fn decide(&self, cmd: Decide) -> Result<Finished> {
        let needs = Needs::decide(&cmd);
        self.write(Target::Approval(cmd.request), needs, |snapshot| {
            rules::decide(snapshot, cmd)
        })
        .await
    }

    async fn operate(&self, run: RunId, action: OperatorAction) -> Result<Finished> {
        self.write(Target::Run(run), Needs::default(), |snapshot| {
            rules::operate(snapshot, action)
        })
        .await
    }

    async fn append_transcript(
        &self,
        session: SessionId,
        chunks: Vec<TranscriptChunk>,
    ) -> Result<()> {
        let needs = Needs::append_transcript(session, &chunks);
        self.write(Target::Session(session), needs, |snapshot| {
            rules::append_transcript(snapshot, session, chunks)
        })
        .await
    }

    async fn run(&self, run: RunId) -> Result<RunRecord> {
        decode::run(&self.run_row(run).await?)
    }

    async fn phases(&self, run: RunId) -> Result<Vec<PhaseRecord>> {
        let rows = self
            .run_children(
                "SELECT (SELECT jsonb_agg(to_jsonb(p) ORDER BY p.position)
                           FROM phaseflow.run_phases p WHERE p.run_id = r.id)
                   FROM phaseflow.runs r WHERE r.id = $1",
                run,
                None,
            )
            .await?;
        decode::list("run_phases", &rows, decode::phase)
    }

    async fn session(&self, run: RunId, role: &RoleKey) -> Result<Option<SessionRecord>> {
        let rows = self
            .run_children(
                "SELECT (SELECT jsonb_agg(to_jsonb(s))
                           FROM phaseflow.sessions s WHERE s.run_id = r.id AND s.role = $2)
                   FROM phaseflow.runs r WHERE r.id = $1",
                run,
                Some(role.as_str()),
            )
            .await?;
        Ok(decode::list("sessions", &rows, decode::session)?
            .into_iter()
            .next())
    }

    async fn sessions(&self, run: RunId) -> Result<Vec<SessionRecord>> {
        let rows = self
            .run_children(
                "SELECT (SELECT jsonb_agg(to_jsonb(s) ORDER BY s.created_seq)
                           FROM phaseflow.sessions s WHERE s.run_id = r.id)
                   FROM phaseflow.runs r WHERE r.id = $1",
                run,
                None,
            )
            .await?;
        decode::list("sessions", &rows, decode::session)
    }

    async fn events(&self, run: RunId, after: u64) -> Result<Vec<Event>> {
        // `after` beyond i64 means "after everything".
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let rows: Vec<Option<Value>> = sqlx::query_scalar(
            "SELECT to_jsonb(e) FROM phaseflow.runs r
               LEFT JOIN phaseflow.run_events e ON e.run_id = r.id AND e.seq > $2
              WHERE r.id = $1
              ORDER BY e.seq",
        )
        .bind(run.as_uuid())
        .bind(after)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error("reading the run's events", e))?;
        if rows.is_empty() {
            return Err(run_not_found(run));
        }
        rows.iter().flatten().map(decode::event).collect()
    }

    async fn approvals(&self, run: RunId) -> Result<Vec<ApprovalRecord>> {
        let rows = self
            .run_children(
                "SELECT (SELECT jsonb_agg(to_jsonb(q) ORDER BY q.created_seq)
                           FROM phaseflow.approval_requests q WHERE q.run_id = r.id)
                   FROM phaseflow.runs r WHERE r.id = $1",
                run,
                None,
            )
            .await?;
        decode::list("approval_requests", &rows, decode::approval)
    }

    async fn approval(&self, id: ApprovalId) -> Result<ApprovalRecord> {
        let row: Option<Value> = sqlx::query_scalar(
            "SELECT to_jsonb(q) FROM phaseflow.approval_requests q WHERE q.id = $1",
        )
        .bind(id.as_uuid())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| db_error("reading the approval request", e))?;
        decode::approval(&row.ok_or_else(|| approval_not_found(id))?)
    }

    async fn latest_artifact(
        &self,
        run: RunId,
        phase: &PhaseKey,
    ) -> Result<Option<ArtifactRecord>> {
        let row: Option<(bool, Option<Value>)> = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM phaseflow.run_phases p WHERE p.run_id = r.id AND p.key = $2),
                    (SELECT to_jsonb(a) FROM phaseflow.artifacts a
                      WHERE a.run_id = r.id AND a.phase = $2
                      ORDER BY a.recorded_seq DESC LIMIT 1)
               FROM phaseflow.runs r WHERE r.id = $1",
        )
        .bind(run.as_uuid())
        .bind(phase.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| db_error("reading the latest artifact", e))?;
        match row {
            None => Err(run_not_found(run)),
            Some((false, _)) => Err(phase_not_found(run, phase)),
            Some((true, artifact)) => artifact.as_ref().map(decode::artifact).transpose(),
        }
    }

    async fn transcript(&self, session: SessionId) -> Result<Vec<TranscriptChunk>> {
        let row: Option<Option<Value>> = sqlx::query_scalar(
            "SELECT (SELECT jsonb_agg(to_jsonb(c) ORDER BY c.seq)
                       FROM phaseflow.transcript_chunks c WHERE c.session_id = s.id)
               FROM phaseflow.sessions s WHERE s.id = $1",
        )
        .bind(session.as_uuid())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| db_error("reading the transcript", e))?;
        let rows = row
            .ok_or_else(|| session_not_found(session))?
            .unwrap_or_default();
        Ok(decode::list("transcript_chunks", &rows, decode::chunk)?
            .into_iter()
            .map(|(_, chunk)| chunk)
            .collect())
    }
}
