//! PostgreSQL store for phaseflow.
//!
//! (crate docs are written below once the store lands)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use phaseflow::{Error, ErrorCode, Result};
use sqlx::PgPool;
use sqlx::migrate::Migrator;

mod error;
#[cfg(feature = "testing")]
pub mod testing;

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

/// The phaseflow [`Store`](phaseflow::store::Store) on PostgreSQL.
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
    pub async fn connect(url: &str) -> Result<Self> {
        let pool = PgPool::connect(url)
            .await
            .map_err(|e| db_error("connecting", e))?;
        Ok(Self::new(pool))
    }

    /// Creates or upgrades phaseflow's tables in the `phaseflow` schema.
    ///
    /// Safe to run on every start-up and from several processes at once: sqlx's migrator holds
    /// a PostgreSQL advisory lock while it works, and already-applied migrations are skipped.
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await.map_err(|e| {
            let code = match &e {
                sqlx::migrate::MigrateError::Execute(_) => ErrorCode::StoreUnavailable,
                _ => ErrorCode::InternalStateCorruption,
            };
            Error::new(code, format!("migrating the phaseflow schema failed: {e}"))
                .with_hint("check the database is reachable and that its phaseflow schema was created by this or an older phaseflow-pg")
                .with_source(e)
        })
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// How many transactions store commands have committed through this store and its clones.
    ///
    /// Reads are not counted. Useful to check the commit budget of a phase (DESIGN: ≤ 4).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }
}
