//! Every engine scenario on the in-memory store.

use std::sync::Arc;

use phaseflow::store::Store;
use phaseflow_fake::memory::MemoryStore;

async fn memory_store() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new())
}

phaseflow_fake::engine_scenario_tests!(memory_store());
