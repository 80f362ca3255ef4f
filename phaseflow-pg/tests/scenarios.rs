//! Every engine scenario from `phaseflow-fake`, on `PgStore` (one fresh database each).

use std::sync::Arc;

use phaseflow::store::Store;
use phaseflow_pg::testing::TestStore;

async fn store() -> Arc<dyn Store> {
    Arc::new(TestStore::new().await)
}

phaseflow_fake::engine_scenario_tests!(store());
