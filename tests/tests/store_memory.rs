//! The key-store contract on the in-memory store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[tokio::test]
async fn memory_store_contract() {
    envelope_tests::store_contract::run(&envelope_core::MemoryKeyStore::new()).await;
}
