//! The plaintext model in this process: one request at a time with an acceleration method
//! (forced, or MetaInf's pick for the workload), or many at once in the continuous batching
//! engine.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use veil_model::{Completion, LiveRequest, LocalModel, ModelError};

use super::{Answer, Backend, Cancellable, Failure, Request, Route};
use crate::accel::{self, Pick};

/// Prompt tokens the batching engine runs in one pass, beside the decoding requests' tokens.
const BATCH_PREFILL_CHUNK: usize = 128;

/// The plaintext model loaded in this process.
pub struct LocalBackend {
    model: Arc<LocalModel>,
    /// The weight format the model runs in: `auto` picks only methods of this format, so the
    /// answer stays the one the loaded weights give.
    format: String,
    /// MetaInf's selector and the model's features (none: the plain method).
    selector: Option<(veil_meta::Selector, veil_meta::ModelFeatures)>,
    /// This machine's features, read once.
    hardware: veil_meta::HardwareFeatures,
    /// The continuous batching engine's queue and its slots, when batching.
    batcher: Option<(mpsc::Sender<LiveRequest>, usize)>,
}

impl LocalBackend {
    /// `model`, loaded in `format`, choosing methods with `selector`.
    pub fn new(
        model: Arc<LocalModel>,
        format: String,
        selector: Option<(veil_meta::Selector, veil_meta::ModelFeatures)>,
    ) -> Self {
        Self {
            model,
            format,
            selector,
            hardware: accel::hardware_features(1.0),
            batcher: None,
        }
    }

    /// Runs requests `slots` at a time in the continuous batching engine (on a thread of its
    /// own, stopped when this backend is dropped) instead of one at a time; 1 keeps one at a
    /// time with per-request methods.
    pub fn batching(mut self, slots: usize) -> Self {
        if slots > 1 {
            self.batcher = start_batcher(Arc::clone(&self.model), slots).map(|tx| (tx, slots));
        }
        self
    }

    /// The method for `request`: the forced one, or the selector's pick among those that keep
    /// the answer exact (this format) and do not batch.
    fn pick(&self, request: &Request<'_>) -> Pick {
        if let Some(method) = request.method {
            return Pick {
                method,
                why: "forced".into(),
            };
        }
        let prompt = request.prompt;
        let shared = request
            .prefixes
            .as_ref()
            .and_then(|cache| Some(cache.lock().ok()?.shared_len(prompt)))
            .unwrap_or(0);
        let mut pick = self.pick_by_features(request, shared);
        pick.why = format!(
            "{}; {shared} of {} prompt tokens cached",
            pick.why,
            prompt.len()
        );
        pick
    }

    /// The selector's pick for this workload, `shared` of the prompt's tokens being cached.
    fn pick_by_features(&self, request: &Request<'_>, shared: usize) -> Pick {
        let Some((selector, model_features)) = &self.selector else {
            return Pick {
                method: veil_meta::default_method(),
                why: "auto: no selector".into(),
            };
        };
        let prompt_tokens = request.prompt.len().max(1);
        let features = veil_meta::Features {
            model: model_features.clone(),
            hardware: self.hardware.clone(),
            workload: veil_meta::WorkloadFeatures {
                prompt_tokens: prompt_tokens as u32,
                output_tokens: request.params.max_tokens.max(1) as u32,
                batch: 1,
                shared_prefix: shared as f64 / prompt_tokens as f64,
                rewrite: false,
            },
        };
        accel::pick_method("auto", Some(selector), &features, Some(&self.format)).unwrap_or_else(
            |_| Pick {
                method: veil_meta::default_method(),
                why: "auto: no choice".into(),
            },
        )
    }

    /// One request with `method`; a prefix-cache method keeps the prompt's keys and values for
    /// the next request of the same asker.
    fn generate_one(
        &self,
        request: &Request<'_>,
        method: &veil_meta::Method,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Completion, Failure> {
        let cache = request.prefixes.as_ref().filter(|_| method.prefix_cache);
        let session = match cache.map(|c| c.lock()) {
            Some(Ok(mut cache)) => self.model.session_from(&mut cache, request.prompt)?,
            _ => self.model.session(),
        };
        let mut session = Cancellable {
            inner: session,
            cancelled: request.cancelled,
        };
        let (completion, _) = veil_model::generate_accelerated(
            &mut session,
            &self.model.tokenizer,
            request.prompt,
            self.model.config.context_length,
            request.params,
            &accel::accel_of(method),
            on_text,
        )?;
        if let Some(Ok(mut cache)) = cache.map(|c| c.lock()) {
            if let Err(e) = cache.keep(request.prompt, session.inner) {
                tracing::warn!("prefix cache: {e}");
            }
        }
        Ok(completion)
    }

    /// One request in the continuous batching engine: its text comes back over a channel, so
    /// the batch never waits on this request's reader, and it leaves the batch once its asker
    /// has gone (noticed at its next text, or within a second).
    fn generate_batched(
        &self,
        batcher: &mpsc::Sender<LiveRequest>,
        request: &Request<'_>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Completion, Failure> {
        enum Progress {
            Text(String),
            Done(veil_model::Result<Completion>),
        }
        let gone = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let done = tx.clone();
        let live = LiveRequest {
            prompt: request.prompt.to_vec(),
            params: request.params.clone(),
            on_text: Box::new(move |t| {
                let _ = tx.send(Progress::Text(t.to_string()));
            }),
            cancelled: Arc::clone(&gone),
            prefixes: request.prefixes.clone(),
            on_done: Box::new(move |result| {
                let _ = done.send(Progress::Done(result));
            }),
        };
        batcher
            .send(live)
            .map_err(|_| ModelError::Batch("the batching engine stopped".into()))?;
        loop {
            if (request.cancelled)() {
                gone.store(true, Ordering::Relaxed);
            }
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(Progress::Text(text)) => on_text(&text),
                Ok(Progress::Done(result)) => return Ok(result?),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(ModelError::Batch("the batching engine stopped".into()).into())
                }
            }
        }
    }
}

impl Backend for LocalBackend {
    fn generate(
        &self,
        request: &Request<'_>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answer, Failure> {
        let (completion, accel) = match &self.batcher {
            Some((batcher, slots)) => (
                self.generate_batched(batcher, request, on_text)?,
                format!("continuous batching ({slots} slots)"),
            ),
            None => {
                let pick = self.pick(request);
                tracing::info!("accel: {} ({})", pick.method.name, pick.why);
                let completion = self.generate_one(request, pick.method, on_text)?;
                (completion, format!("{} ({})", pick.method.name, pick.why))
            }
        };
        Ok(Answer {
            completion,
            route: self.route(),
            verification: None,
            accel,
            evidence: Vec::new(),
        })
    }

    fn describe(&self) -> String {
        self.route().to_string()
    }
}

impl LocalBackend {
    fn route(&self) -> Route {
        Route::Local {
            blocks: self.model.config.block_count,
        }
    }
}

/// Starts the continuous batching engine on its own thread, serving `model` `slots` requests
/// at a time; it stops when the queue's sender is dropped.
fn start_batcher(model: Arc<LocalModel>, slots: usize) -> Option<mpsc::Sender<LiveRequest>> {
    let config = veil_model::BatchConfig {
        max_batch: NonZeroUsize::new(slots)?,
        prefill_chunk: NonZeroUsize::new(BATCH_PREFILL_CHUNK)?,
    };
    let (tx, rx) = mpsc::channel();
    let started = std::thread::Builder::new()
        .name("veil-batch".into())
        .spawn(move || veil_model::serve_batched(&model, &rx, config));
    match started {
        Ok(_) => Some(tx),
        Err(e) => {
            tracing::warn!("cannot start the batching engine ({e}); one generation at a time");
            None
        }
    }
}
