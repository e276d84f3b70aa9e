//! Fetching the default model into an empty cache, the no-op refetch, and repair of a damaged copy.

use veil_model::{FetchEvent, ModelStore, SMOLLM2_135M};

#[test]
fn fetch_verifies_is_idempotent_and_repairs_damage() {
    let home = tempfile::tempdir().unwrap();
    let store = ModelStore::new(home.path());
    assert!(!store.is_present(&SMOLLM2_135M));

    let mut events = Vec::new();
    let path = store
        .ensure(&SMOLLM2_135M, &mut |e| events.push(e))
        .unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SMOLLM2_135M.size);
    assert!(matches!(
        events.first(),
        Some(FetchEvent::Downloading { .. })
    ));
    assert!(events
        .iter()
        .any(|e| matches!(e, FetchEvent::Unpacking { done, total } if done == total)));
    // Nothing but the model is left behind in the cache.
    let left: Vec<_> = std::fs::read_dir(home.path().join("models"))
        .unwrap()
        .collect();
    assert_eq!(left.len(), 1);

    // Already there: no download at all (a Python that does not exist would fail it).
    let offline = ModelStore::new(home.path()).with_python("/nonexistent/python3");
    let mut events = Vec::new();
    assert_eq!(
        offline
            .ensure(&SMOLLM2_135M, &mut |e| events.push(e))
            .unwrap(),
        path
    );
    assert!(events.is_empty(), "{events:?}");

    // One flipped byte is caught by the digest and the copy is fetched again.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[12_345_678] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let err = offline.ensure(&SMOLLM2_135M, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("could not run"), "{err}");
    let mut events = Vec::new();
    store
        .ensure(&SMOLLM2_135M, &mut |e| events.push(e))
        .unwrap();
    assert!(
        matches!(events.first(), Some(FetchEvent::Refetching { reason }) if reason.contains("blake3"))
    );
    assert_eq!(
        blake3::hash(&std::fs::read(&path).unwrap())
            .to_hex()
            .as_str(),
        SMOLLM2_135M.blake3
    );
}
