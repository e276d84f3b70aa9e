//! One module per subcommand.

pub mod bench;
pub mod bench_args;
pub mod bench_gateway;
pub mod bench_llama_cpp;
pub mod bench_meta;
pub mod bench_nat;
pub mod bench_process;
pub mod bench_serving;
pub mod bench_soak;
pub mod bench_zk;
pub mod chat;
pub mod demo;
pub mod demo_nodes;
pub mod demo_verify;
pub mod ee;
mod ee_obfuscation;
pub mod generate;
pub mod json_file;
pub mod measure;
pub mod meta;
pub mod models;
pub mod network_runtime;
pub mod python_venv;
pub mod serve;
pub mod soak_rogue;
pub mod swarm;
pub mod tee;
pub mod verify;
pub mod zk;

/// Writes a secret (a sealed key, a private model) readable by its owner only: through a
/// `.partial` file created with mode 600 and synced, then renamed into place, so no other user
/// can read it at any moment and a cut-off write leaves no half file.
pub(crate) fn write_secret(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let partial = path.with_extension("partial");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&partial)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    #[cfg(unix)]
    std::fs::set_permissions(
        &partial,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("cannot write {}", path.display()))
}
