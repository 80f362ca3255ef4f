//! The store conformance suite from `phaseflow-fake`, on `PgStore`: the same cases as
//! `MemoryStore`, one fresh database per case.

use phaseflow_pg::testing::TestStore;

phaseflow_fake::store_conformance_tests!(TestStore::new().await);
