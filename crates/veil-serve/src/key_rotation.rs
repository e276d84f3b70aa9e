//! The key of an encrypted model that the gateway runs itself, replaced on a
//! [`RotationPolicy`]: the frequency attack reads more of the token stream the more tokens one
//! key serves (docs/THREAT_MODEL.md). When a key has served its budget, a fresh key of the same
//! kind is drawn, the plaintext model is encrypted under it and loaded, all on a thread of its
//! own, and only then swapped in. Requests already running finish under the old key, and a
//! rotation that fails anywhere leaves the old key serving.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use veil_ee::{EeKey, KeyUsage, RotationPolicy};
use veil_model::{LlamaConfig, ShardModel};

use crate::error::{Result, ServeError};

/// An encrypted model: the key stays with whoever holds this; the shards (run in this process)
/// see only permuted ids and rotated activations.
pub struct Privacy {
    /// The model's key.
    pub key: EeKey,
    /// The encrypted shards, for a model run in this process (empty when nodes run it).
    pub shards: Vec<ShardModel>,
}

/// Loads an encrypted model file as the gateway runs it (its block ranges, format, kernels).
pub type ShardLoader = Box<
    dyn Fn(&Path, &EeKey) -> Result<Vec<ShardModel>, Box<dyn std::error::Error + Send + Sync>>
        + Send
        + Sync,
>;

/// How a gateway that runs its encrypted model itself replaces the key.
pub struct KeyRotation {
    /// When a key has served enough.
    pub policy: RotationPolicy,
    /// The plaintext model, encrypted anew under each key.
    pub plain: PathBuf,
    /// Its architecture, which a new key's shapes follow.
    pub config: LlamaConfig,
    /// Loads an encrypted file the way the first one was loaded.
    pub load: ShardLoader,
}

/// The encrypted model in use, what its key has served, and how it is replaced.
pub struct KeyedModel {
    current: RwLock<Arc<Privacy>>,
    /// When the current key was put into use, and the tokens it has served.
    usage: Mutex<(Instant, u64)>,
    rotation: Option<KeyRotation>,
    rotating: AtomicBool,
    /// Rotations put into use.
    done: Counter,
    /// Rotations that failed (the old key kept serving).
    failed: Counter,
}

impl KeyedModel {
    /// `privacy` under `rotation` (`None`: the key never changes, as on the swarm, whose nodes
    /// hold shards of the encrypted file).
    pub fn new(privacy: Privacy, rotation: Option<KeyRotation>) -> Self {
        Self {
            current: RwLock::new(Arc::new(privacy)),
            usage: Mutex::new((Instant::now(), 0)),
            rotation,
            rotating: AtomicBool::new(false),
            done: Counter::default(),
            failed: Counter::default(),
        }
    }

    /// Counters of rotations done and failed, for `/metrics`.
    pub fn rotation_counters(&self) -> (Counter, Counter) {
        (self.done.clone(), self.failed.clone())
    }

    /// The key and shards a new request runs with, to the end, whatever rotates meanwhile.
    pub fn current(&self) -> Arc<Privacy> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Counts `tokens` (prompt and answer) served under `used`; when the current key has spent
    /// its budget, starts replacing it in the background (once at a time).
    pub fn spent(self: &Arc<Self>, used: &Arc<Privacy>, tokens: u64) {
        let Some(rotation) = &self.rotation else {
            return;
        };
        if !Arc::ptr_eq(used, &self.current()) {
            return; // served under a key already replaced
        }
        let usage = {
            let mut usage = self.usage.lock().unwrap_or_else(|e| e.into_inner());
            usage.1 = usage.1.saturating_add(tokens);
            KeyUsage {
                tokens: usage.1,
                age: usage.0.elapsed(),
            }
        };
        if !rotation.policy.due(usage, 0) || self.rotating.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = Arc::clone(self);
        std::thread::spawn(move || this.rotate());
    }

    /// Draws a key, encrypts and loads the model under it, and swaps it in; on any failure the
    /// old key keeps serving and the next spent budget tries again.
    fn rotate(&self) {
        let Some(rotation) = &self.rotation else {
            return;
        };
        let old = self.current();
        let started = Instant::now();
        match fresh_model(rotation, &old.key) {
            Ok(fresh) => {
                let (new, old) = (fresh.key.fingerprint(), old.key.fingerprint());
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
                *self.usage.lock().unwrap_or_else(|e| e.into_inner()) = (Instant::now(), 0);
                self.done.inc();
                tracing::info!(
                    "rotated the key: {} replaces {} ({:.1} s to re-encrypt and load)",
                    new.get(..16).unwrap_or(&new),
                    old.get(..16).unwrap_or(&old),
                    started.elapsed().as_secs_f64()
                );
            }
            Err(e) => {
                self.failed.inc();
                tracing::warn!("key rotation failed, the old key keeps serving: {e:#}");
            }
        }
        self.rotating.store(false, Ordering::Release);
    }
}

/// The plaintext model encrypted under a fresh key of `old`'s kind, loaded. The file is
/// written next to nothing the user owns (a temporary directory) and removed once loaded.
fn fresh_model(rotation: &KeyRotation, old: &EeKey) -> Result<Privacy> {
    let key = EeKey::generate_of_kind(&rotation.config, &old.model_digest, old.kind());
    let dir = tempfile::tempdir().map_err(ServeError::io("no room for the re-encrypted model"))?;
    let file = dir.path().join("rotated.gguf");
    veil_ee::encrypt_model(&rotation.plain, &key, &file)?;
    let shards = (rotation.load)(&file, &key).map_err(|source| ServeError::Load {
        what: "cannot load the re-encrypted model".into(),
        source,
    })?;
    Ok(Privacy { key, shards })
}
