//! The key of an encrypted model, replaced on a [`RotationPolicy`]: the frequency attack reads
//! more of the token stream the more tokens one key serves (docs/THREAT_MODEL.md). When a key
//! has served its budget, a fresh key of the same kind is drawn and the plaintext model is
//! encrypted under it, on a thread of its own; a [`KeyInstaller`] makes the new model ready
//! where it runs (loaded in this process, or handed to the swarm's nodes as shards,
//! [`crate::key_handoff`]), and only then is it swapped in. Requests already running finish
//! under the old key, and a rotation that fails anywhere leaves the old key serving.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

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
    /// Where the swarm's nodes serve the model under this key, once the key has rotated
    /// there (`None`: as the swarm connection says).
    pub nodes: Option<NodesServing>,
}

impl Privacy {
    /// A key whose model runs in this process (`shards`), or on the swarm as its connection
    /// says (no shards).
    pub fn new(key: EeKey, shards: Vec<ShardModel>) -> Self {
        Self {
            key,
            shards,
            nodes: None,
        }
    }
}

/// The model the swarm's nodes serve for a rotated key.
pub struct NodesServing {
    /// The digest of the encrypted file the nodes hold shards of.
    pub digest: String,
    /// The checks a node must pass to serve it (its weights are this key's).
    pub admission: Option<Arc<veil_net::Admission>>,
    /// The nodes handed shards of it.
    pub nodes: Vec<libp2p::PeerId>,
    /// The encrypted file, kept while the key is in use (weight openings are checked against
    /// it); removed with it.
    pub file: Arc<tempfile::TempDir>,
}

/// Loads an encrypted model file as the gateway runs it (its block ranges, format, kernels).
pub type ShardLoader = Box<
    dyn Fn(&Path, &EeKey) -> Result<Vec<ShardModel>, Box<dyn std::error::Error + Send + Sync>>
        + Send
        + Sync,
>;

/// Makes a model encrypted under a new key ready where it runs, without serving it yet.
pub trait KeyInstaller: Send + Sync {
    /// Readies the model encrypted under `key` at `file` (in `dir`, which the installer may
    /// keep) to replace `old`'s; on failure, leaves nothing of it behind.
    fn stage(
        &self,
        dir: tempfile::TempDir,
        file: &Path,
        key: EeKey,
        old: &Privacy,
    ) -> Result<Privacy>;

    /// `new` has replaced `old`: new requests use it, and what only `old` needed may go.
    fn promote(&self, _old: &Privacy, _new: &Privacy) {}

    /// `new` was staged but will not be used (its key could not be kept): drop what staging
    /// left where the model runs.
    fn discard(&self, _new: &Privacy) {}

    /// The model encrypted under `key` at `file` (in `dir`) is already where it runs, from
    /// before this process started (a key kept by [`KeptKey`]): make it the one in use without
    /// installing it again. By default it is staged like a new one.
    fn adopt(
        &self,
        dir: tempfile::TempDir,
        file: &Path,
        key: EeKey,
        old: &Privacy,
    ) -> Result<Privacy> {
        self.stage(dir, file, key, old)
    }
}

/// Loads the new model into this process.
pub struct LoadHere(pub ShardLoader);

impl KeyInstaller for LoadHere {
    fn stage(
        &self,
        _dir: tempfile::TempDir,
        file: &Path,
        key: EeKey,
        _: &Privacy,
    ) -> Result<Privacy> {
        // The file is removed with `_dir` once loaded.
        let shards = (self.0)(file, &key).map_err(|source| ServeError::Load {
            what: "cannot load the re-encrypted model".into(),
            source,
        })?;
        Ok(Privacy::new(key, shards))
    }
}

/// How a gateway replaces the key of its encrypted model.
pub struct KeyRotation {
    /// When a key has served enough.
    pub policy: RotationPolicy,
    /// The plaintext model, encrypted anew under each key.
    pub plain: PathBuf,
    /// Its architecture, which a new key's shapes follow.
    pub config: LlamaConfig,
    /// Readies each new key's model where it runs.
    pub install: Box<dyn KeyInstaller>,
    /// Where each new key is kept, for a gateway whose nodes outlive it (`None`: not kept).
    pub keep: Option<KeptKey>,
}

impl KeyRotation {
    /// The key an earlier run of this gateway rotated to, if one was kept for the model of
    /// `started` (the key the gateway was started with), made the one in use: the plaintext
    /// model is encrypted under it again and adopted where it runs. `None` when no key was
    /// kept, or the kept one is of another model or kind (then the next rotation replaces it).
    pub fn resume(&self, started: &Privacy) -> Result<Option<Privacy>> {
        let Some(keep) = &self.keep else {
            return Ok(None);
        };
        let key = match keep.load() {
            Ok(Some(key)) => key,
            Ok(None) => return Ok(None),
            // A passphrase changed since, say: start, and say why the nodes may not answer.
            Err(e) => {
                tracing::warn!(
                    "cannot open the key kept in {} ({e}): starting with the key given, whose \
                     model the nodes may no longer serve",
                    keep.path.display()
                );
                return Ok(None);
            }
        };
        if key.model_digest != started.key.model_digest || key.kind() != started.key.kind() {
            tracing::warn!(
                "the key kept in {} is not a {} key of this model: starting with the key given",
                keep.path.display(),
                started.key.kind().name()
            );
            return Ok(None);
        }
        if key.fingerprint() == started.key.fingerprint() {
            return Ok(None);
        }
        let (dir, file) = encrypted_under(self, &key)?;
        self.install.adopt(dir, &file, key, started).map(Some)
    }
}

/// A rotated key, kept sealed on disk (with the passphrase of the key the gateway was started
/// with) so that a gateway restarted after a rotation goes on with the key its nodes serve:
/// otherwise it comes back with the key it was started with, whose shards the nodes dropped
/// two rotations later.
pub struct KeptKey {
    /// The sealed key file.
    pub path: PathBuf,
    /// Its passphrase.
    pub passphrase: String,
}

impl KeptKey {
    /// Seals `key` into the file; the file is replaced only once the new one is written whole.
    pub fn save(&self, key: &EeKey) -> Result<()> {
        let sealed = key.seal(&self.passphrase)?;
        let what = || format!("cannot keep the new key in {}", self.path.display());
        let partial = self.path.with_extension("partial");
        std::fs::write(&partial, sealed).map_err(ServeError::io(what()))?;
        std::fs::rename(&partial, &self.path).map_err(ServeError::io(what()))
    }

    /// The key kept by an earlier run, if there is one.
    pub fn load(&self) -> Result<Option<EeKey>> {
        match std::fs::read(&self.path) {
            Ok(sealed) => Ok(Some(EeKey::open(&sealed, &self.passphrase)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ServeError::io(format!(
                "cannot read the kept key {}",
                self.path.display()
            ))(e)),
        }
    }
}

/// How long after a failed rotation the next is tried.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(20);

/// The encrypted model in use, what its key has served, and how it is replaced.
pub struct KeyedModel {
    current: RwLock<Arc<Privacy>>,
    /// When the current key was put into use, and the tokens it has served.
    usage: Mutex<(Instant, u64)>,
    rotation: Option<KeyRotation>,
    rotating: AtomicBool,
    /// When the last rotation failed: the next waits [`RETRY_AFTER_FAILURE`], so a swarm that
    /// refuses (or a plaintext file gone) does not cost a re-encryption per request.
    failed_at: Mutex<Option<Instant>>,
    /// Rotations put into use.
    done: Counter,
    /// Rotations that failed (the old key kept serving).
    failed: Counter,
}

impl KeyedModel {
    /// `privacy` under `rotation` (`None`: the key never changes).
    pub fn new(privacy: Privacy, rotation: Option<KeyRotation>) -> Self {
        Self {
            current: RwLock::new(Arc::new(privacy)),
            usage: Mutex::new((Instant::now(), 0)),
            rotation,
            rotating: AtomicBool::new(false),
            failed_at: Mutex::new(None),
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
        let failed_at = *self.failed_at.lock().unwrap_or_else(|e| e.into_inner());
        if failed_at.is_some_and(|at| at.elapsed() < RETRY_AFTER_FAILURE) {
            return;
        }
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
        match fresh_model(rotation, &old) {
            Ok(fresh) => {
                // Kept before it is used: a gateway restarted from here on resumes this key.
                if let Some(Err(e)) = rotation.keep.as_ref().map(|keep| keep.save(&fresh.key)) {
                    rotation.install.discard(&fresh);
                    self.failed_rotation(&e);
                    return;
                }
                let fresh = Arc::new(fresh);
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&fresh);
                *self.usage.lock().unwrap_or_else(|e| e.into_inner()) = (Instant::now(), 0);
                rotation.install.promote(&old, &fresh);
                self.done.inc();
                let (new, old) = (fresh.key.fingerprint(), old.key.fingerprint());
                tracing::info!(
                    "rotated the key: {} replaces {} ({:.1} s to re-encrypt and install)",
                    new.get(..16).unwrap_or(&new),
                    old.get(..16).unwrap_or(&old),
                    started.elapsed().as_secs_f64()
                );
            }
            Err(e) => self.failed_rotation(&e),
        }
        self.rotating.store(false, Ordering::Release);
    }

    /// Counts and logs a rotation that failed (the old key keeps serving), and holds the next
    /// back for [`RETRY_AFTER_FAILURE`].
    fn failed_rotation(&self, e: &ServeError) {
        self.failed.inc();
        *self.failed_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let mut why = e.to_string();
        let mut cause = std::error::Error::source(e);
        while let Some(c) = cause {
            // Some errors already end with their cause's words (`{path}: {source}`).
            let words = c.to_string();
            if !why.ends_with(&words) {
                why = format!("{why}: {words}");
            }
            cause = c.source();
        }
        tracing::warn!("key rotation failed, the old key keeps serving: {why}");
    }
}

/// The plaintext model encrypted under a fresh key of `old`'s kind, installed. The file is
/// written next to nothing the user owns (a temporary directory), which the installer keeps
/// or drops.
fn fresh_model(rotation: &KeyRotation, old: &Privacy) -> Result<Privacy> {
    let kind = old.key.kind();
    let key = EeKey::generate_of_kind(&rotation.config, &old.key.model_digest, kind);
    let (dir, file) = encrypted_under(rotation, &key)?;
    rotation.install.stage(dir, &file, key, old)
}

/// The plaintext model encrypted under `key`, in a temporary directory of its own.
fn encrypted_under(rotation: &KeyRotation, key: &EeKey) -> Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::tempdir().map_err(ServeError::io("no room for the re-encrypted model"))?;
    let file = dir.path().join("rotated.gguf");
    veil_ee::encrypt_model(&rotation.plain, key, &file)?;
    Ok((dir, file))
}
