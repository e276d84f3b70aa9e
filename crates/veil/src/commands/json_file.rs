//! JSON files the commands read and write (models, proofs, inputs), in one home.

use std::path::Path;

use anyhow::{Context, Result};

/// Largest JSON file read (a model, a proof, an input): these are kilobytes.
const MAX_FILE_BYTES: u64 = 16 << 20;

/// Reads `path` as JSON of `T`, at most 16 MiB; the error names it as a `what`.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let bytes = crate::args::read_limited(path, what, MAX_FILE_BYTES)?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a valid {what}", path.display()))
}

/// Writes `value` to `path` as pretty JSON, making its directory.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}
