//! A client's own validation of an answer its committee rejected, before anyone is punished:
//! against a majority of Sybils that fail an honest generator's answer to frame it.

use std::path::PathBuf;
use std::sync::OnceLock;

use veil_model::ShardModel;

use crate::consensus::Job;
use crate::trials::load_whole;
use crate::validate::{validate, Tolerances, Verdict};

/// The served model file, loaded whole on the first recheck (in the format the answer claims),
/// so a client that never sees a rejection never pays for it.
pub struct LocalRecheck {
    served: PathBuf,
    model: OnceLock<Result<Box<ShardModel>, String>>,
}

impl LocalRecheck {
    /// Rechecks against `served`: the file the nodes serve (the encrypted one for an encrypted
    /// model, whose answers are in the key's token order).
    pub fn new(served: PathBuf) -> Self {
        Self {
            served,
            model: OnceLock::new(),
        }
    }

    /// Whether `job`'s answer passes validation here.
    pub fn passes(&self, job: &Job) -> Result<bool, String> {
        let model = self.model.get_or_init(|| {
            tracing::warn!(
                "rechecking a rejected answer here: loading {}",
                self.served.display()
            );
            let format = job.format.parse().map_err(|e| format!("{e}"))?;
            load_whole(&self.served, format, None)
                .map(Box::new)
                .map_err(|e| e.to_string())
        });
        let model = model.as_ref().map_err(Clone::clone)?;
        let checked = validate(
            std::slice::from_ref(model),
            &job.claim,
            &Tolerances::default(),
        )
        .map_err(|e| e.to_string())?;
        Ok(checked.verdict == Verdict::Pass)
    }
}
