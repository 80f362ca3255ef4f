//! The store an example runs on: [`MemoryStore`] by default, [`PgStore`] when `DATABASE_URL` is
//! set.

use std::sync::Arc;

use phaseflow::store::Store;
use phaseflow_fake::memory::MemoryStore;
use phaseflow_pg::PgStore;

/// A store and a line saying which one it is.
#[derive(Clone, Debug)]
pub struct Backend {
    /// The store.
    pub store: Arc<dyn Store>,
    /// For the example's first lines: which store, and how to pick the other one.
    pub description: String,
}

/// `PgStore` on `DATABASE_URL` (migrated) when the variable is set and not empty, else a fresh
/// `MemoryStore`.
///
/// # Errors
/// `store_unavailable` when PostgreSQL cannot be reached or migrated.
pub async fn from_env() -> phaseflow::Result<Backend> {
    match database_url() {
        Some(url) => {
            let store = PgStore::connect(&url).await?;
            store.migrate().await?;
            Ok(Backend {
                store: Arc::new(store),
                description: "PostgreSQL at DATABASE_URL (schema `phaseflow`, migrated)".into(),
            })
        }
        None => Ok(Backend {
            store: Arc::new(MemoryStore::new()),
            description: "in memory (set DATABASE_URL=postgres://… to run on PostgreSQL)".into(),
        }),
    }
}

/// `DATABASE_URL`, if set to something.
pub fn database_url() -> Option<String> {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|url| !url.trim().is_empty())
}
