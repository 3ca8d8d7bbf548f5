//! The store conformance suite against every backend available here.

use std::sync::Arc;

use greygate::store::{EmbeddedStore, MemoryStore, Store, conformance};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_conforms() {
    conformance::run(Arc::new(MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb"), 0).unwrap());
    conformance::run(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_store_persists_flushed_changes_and_deletions() {
    use greygate::engine::{Engine, TripletKey};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let engine = Engine::default();
    let key = |s: &str| TripletKey {
        client: "192.0.2.0/24".into(),
        sender: s.into(),
        recipient: "r@example.org".into(),
    };
    {
        let store = EmbeddedStore::open(&path, 0).unwrap();
        for s in ["a@x", "b@x", "c@x"] {
            store
                .update_triplet(&key(s), &|old| Some(engine.triplet_step(old, 1000).1))
                .await
                .unwrap();
        }
        store.flush().await.unwrap();
        // Expire everything (records written at 1000 live until 1000 + retry_window).
        let later = 1000 + engine.policy.retry_window + 1;
        store
            .update_triplet(&key("d@x"), &|old| Some(engine.triplet_step(old, later).1))
            .await
            .unwrap();
        loop {
            if store.expire(later, 1 << 20).await.unwrap().cycle_done {
                break;
            }
        }
        store.flush().await.unwrap();
    }
    let store = EmbeddedStore::open(&path, 0).unwrap();
    let report = store.load_report();
    assert_eq!(
        report.triplets, 1,
        "only the live record is on disk: {report:?}"
    );
    assert!(store.get_triplet(&key("d@x")).await.unwrap().is_some());
    assert!(store.get_triplet(&key("a@x")).await.unwrap().is_none());
}

#[tokio::test]
async fn embedded_store_refuses_a_second_opener_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let _first = EmbeddedStore::open(&path, 0).unwrap();
    let err = EmbeddedStore::open(&path, 0)
        .err()
        .expect("second open fails");
    assert!(
        matches!(err, greygate::store::StoreError::Locked { .. }),
        "{err}"
    );
}
