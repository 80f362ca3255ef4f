//! `PgStore::migrate` is safe to run repeatedly and from several pools at once.

use phaseflow_pg::PgStore;
use phaseflow_pg::testing::TestDatabase;

async fn tables(db: &TestDatabase) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = 'phaseflow' ORDER BY table_name",
    )
    .fetch_all(db.pool())
    .await
    .unwrap()
}

const TABLES: [&str; 8] = [
    "_sqlx_migrations",
    "approval_requests",
    "artifacts",
    "run_events",
    "run_phases",
    "runs",
    "sessions",
    "transcript_chunks",
];

#[tokio::test]
async fn migrating_twice_is_a_no_op() {
    let db = TestDatabase::empty().await;
    let store = db.store();
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    assert_eq!(tables(&db).await, TABLES);
    let public: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(
        public, 0,
        "phaseflow must not put anything in the public schema"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_from_two_pools_both_succeed() {
    let db = TestDatabase::empty().await;
    for _ in 0..3 {
        let stores: Vec<PgStore> = vec![
            db.connect_store().await,
            db.connect_store().await,
            db.connect_store().await,
        ];
        let handles: Vec<_> = stores
            .into_iter()
            .map(|store| tokio::spawn(async move { store.migrate().await }))
            .collect();
        for handle in handles {
            handle.await.unwrap().unwrap();
        }
    }
    assert_eq!(tables(&db).await, TABLES);
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM phaseflow._sqlx_migrations")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(applied, 1);
}

#[tokio::test]
async fn migrated_databases_come_with_the_schema() {
    let db = TestDatabase::migrated().await;
    assert_eq!(tables(&db).await, TABLES);
}
