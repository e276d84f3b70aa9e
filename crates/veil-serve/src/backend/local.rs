//! The plaintext model in this process: one request at a time with an acceleration method
//! (forced, or MetaInf's pick for the workload), or many at once in the continuous batching
//! engine; with [`Batching::Auto`], MetaInf chooses at each arrival, from the live traffic
//! (the requests in flight), whether the engine batches or admits one request at a time.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use veil_model::{Completion, LiveRequest, LocalModel, ModelError};

use super::{Answer, Backend, Cancellable, Failure, Request, Route};
use crate::accel::{self, Pick};

/// Prompt tokens the batching engine runs in one pass, beside the decoding requests' tokens.
const BATCH_PREFILL_CHUNK: usize = 128;

/// Slots of the batching engine under `--batch auto`.
pub const AUTO_BATCH_SLOTS: usize = 16;

/// How a local backend batches requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batching {
    /// One generation at a time, each with MetaInf's per-request method.
    Off,
    /// Every request in the continuous batching engine, this many at once.
    Always(usize),
    /// Every request in the engine, which MetaInf's selector, at each arrival, lets admit this
    /// many at once or one at a time, from the traffic in flight (how many requests, how
    /// long, how much of their prompts they share).
    Auto(usize),
}

impl Batching {
    /// Requests this batching runs at once (the gateway admits as many).
    pub fn slots(self) -> usize {
        match self {
            Batching::Off => 1,
            Batching::Always(n) | Batching::Auto(n) => n,
        }
    }
}

impl std::str::FromStr for Batching {
    type Err = String;

    /// `1` (off), a number of slots up to 64, or `auto`.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(Batching::Auto(AUTO_BATCH_SLOTS));
        }
        match s.parse::<usize>() {
            Ok(1) => Ok(Batching::Off),
            Ok(n @ 2..=64) => Ok(Batching::Always(n)),
            _ => Err(format!(
                "{s:?} is not a batch size: give 1 (no batching), 2 to 64, or auto"
            )),
        }
    }
}

impl std::fmt::Display for Batching {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Batching::Off => f.write_str("1"),
            Batching::Always(n) => write!(f, "{n}"),
            Batching::Auto(_) => f.write_str("auto"),
        }
    }
}

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
    /// Under `Batching::Auto`: how many requests the engine admits at once, set by MetaInf's
    /// pick at each arrival (all its slots for a batching method, else one).
    admit: Option<Arc<AtomicUsize>>,
    /// The prompts of the requests in flight, by arrival: the live traffic MetaInf sees.
    in_flight: Mutex<Vec<(u64, Vec<u32>)>>,
    /// Numbers requests in flight.
    arrivals: std::sync::atomic::AtomicU64,
    /// Requests that force a one-at-a-time method take turns while the engine runs beside
    /// them.
    solo: Mutex<()>,
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
            admit: None,
            in_flight: Mutex::new(Vec::new()),
            arrivals: Default::default(),
            solo: Mutex::new(()),
        }
    }

    /// Batches as `batching` says: the continuous batching engine (on a thread of its own,
    /// stopped when this backend is dropped) takes every request, or those MetaInf sends it.
    pub fn batching(mut self, batching: Batching) -> Self {
        let slots = batching.slots();
        if slots > 1 {
            let admit =
                matches!(batching, Batching::Auto(_)).then(|| Arc::new(AtomicUsize::new(1)));
            self.batcher =
                start_batcher(Arc::clone(&self.model), slots, admit.clone()).map(|tx| (tx, slots));
            self.admit = admit.filter(|_| self.batcher.is_some());
        }
        self
    }

    /// The method for one request at a time: the forced one, or the selector's pick among
    /// those that keep the answer exact (this format), `shared` of the prompt being cached.
    fn pick_alone(&self, request: &Request<'_>) -> Pick {
        if let Some(method) = request.method {
            return forced(method);
        }
        let prompt = request.prompt;
        let shared = request
            .prefixes
            .as_ref()
            .and_then(|cache| Some(cache.lock().ok()?.shared_len(prompt)))
            .unwrap_or(0);
        let workload = veil_meta::WorkloadFeatures {
            prompt_tokens: prompt.len().max(1) as u32,
            output_tokens: request.params.max_tokens.max(1) as u32,
            batch: 1,
            shared_prefix: shared as f64 / prompt.len().max(1) as f64,
            rewrite: false,
        };
        let mut pick = self.pick_for(workload);
        pick.why = format!(
            "{}; {shared} of {} prompt tokens cached",
            pick.why,
            prompt.len()
        );
        pick
    }

    /// The method for a request arriving while `others` are in flight (`Batching::Auto`): the
    /// selector sees them and this one as a workload arriving together, as `veil meta collect`
    /// measured its workloads, and may pick a batching method or not.
    fn pick_live(&self, request: &Request<'_>, others: &[Vec<u32>]) -> Pick {
        if let Some(method) = request.method {
            return forced(method);
        }
        let mut prompts: Vec<&[u32]> = others.iter().map(Vec::as_slice).collect();
        prompts.push(request.prompt);
        let workload = accel::workload_features(&prompts, request.params.max_tokens, false);
        let mut pick = self.pick_for(workload.clone());
        pick.why = format!(
            "{}; {} in flight sharing {:.0}% of their prompts",
            pick.why,
            workload.batch,
            workload.shared_prefix * 100.0
        );
        pick
    }

    /// The selector's pick for `workload` on this model and machine.
    fn pick_for(&self, workload: veil_meta::WorkloadFeatures) -> Pick {
        let Some((selector, model_features)) = &self.selector else {
            return Pick {
                method: veil_meta::default_method(),
                why: "auto: no selector".into(),
            };
        };
        let features = veil_meta::Features {
            model: model_features.clone(),
            hardware: self.hardware.clone(),
            workload,
        };
        accel::pick_method("auto", Some(selector), &features, Some(&self.format)).unwrap_or_else(
            |_| Pick {
                method: veil_meta::default_method(),
                why: "auto: no choice".into(),
            },
        )
    }

    /// Counts `prompt` among the requests in flight until the guard drops; returns the
    /// prompts that were in flight before it.
    fn arrive(&self, prompt: &[u32]) -> (InFlight<'_>, Vec<Vec<u32>>) {
        let id = self.arrivals.fetch_add(1, Ordering::Relaxed);
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let others = in_flight.iter().map(|(_, p)| p.clone()).collect();
        in_flight.push((id, prompt.to_vec()));
        (InFlight { backend: self, id }, others)
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
        // The traffic in flight matters only to MetaInf's choice under `Batching::Auto`.
        let counted = self.admit.is_some().then(|| self.arrive(request.prompt));
        let others = counted
            .as_ref()
            .map_or(&[][..], |(_, others)| others.as_slice());
        let Some((batcher, slots)) = &self.batcher else {
            let pick = self.pick_alone(request);
            tracing::info!("accel: {} ({})", pick.method.name, pick.why);
            let completion = self.generate_one(request, pick.method, on_text)?;
            return Ok(self.answer(completion, format!("{} ({})", pick.method.name, pick.why)));
        };
        let engine = format!("continuous batching ({slots} slots)");
        let (completion, accel) = match (request.method, &self.admit) {
            // A forced method runs where it says: a batching one in the engine, any other
            // alone, taking turns with the other requests that forced one.
            (Some(method), _) if method.batch => (
                self.generate_batched(batcher, request, on_text)?,
                format!("{engine}: {} (forced)", method.name),
            ),
            (Some(method), _) => {
                let _turn = self.solo.lock().unwrap_or_else(|e| e.into_inner());
                let completion = self.generate_one(request, method, on_text)?;
                (completion, format!("{} (forced)", method.name))
            }
            (None, None) => (self.generate_batched(batcher, request, on_text)?, engine),
            // MetaInf chooses for the traffic in flight: a batching method opens the engine's
            // slots, any other has it admit one request at a time (those running finish).
            (None, Some(admit)) => {
                let pick = self.pick_live(request, others);
                let (open, how) = match pick.method.batch {
                    true => (*slots, engine),
                    false => (1, "one at a time in the batching engine".to_string()),
                };
                admit.store(open, Ordering::Relaxed);
                tracing::info!("accel: {how}, {} ({})", pick.method.name, pick.why);
                let completion = self.generate_batched(batcher, request, on_text)?;
                (
                    completion,
                    format!("{how}: {} ({})", pick.method.name, pick.why),
                )
            }
        };
        Ok(self.answer(completion, accel))
    }

    fn describe(&self) -> String {
        self.route().to_string()
    }
}

impl LocalBackend {
    fn answer(&self, completion: Completion, accel: String) -> Answer {
        Answer {
            completion,
            route: self.route(),
            verification: None,
            accel,
            evidence: Vec::new(),
        }
    }

    fn route(&self) -> Route {
        Route::Local {
            blocks: self.model.config.block_count,
        }
    }
}

/// A method a request forces.
fn forced(method: &'static veil_meta::Method) -> Pick {
    Pick {
        method,
        why: "forced".into(),
    }
}

/// A request counted among those in flight, until it drops.
struct InFlight<'a> {
    backend: &'a LocalBackend,
    id: u64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut in_flight = self
            .backend
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        in_flight.retain(|(id, _)| *id != self.id);
    }
}

/// Starts the continuous batching engine on its own thread, serving `model` `slots` requests
/// at a time; it stops when the queue's sender is dropped.
fn start_batcher(
    model: Arc<LocalModel>,
    slots: usize,
    admit: Option<Arc<AtomicUsize>>,
) -> Option<mpsc::Sender<LiveRequest>> {
    let config = veil_model::BatchConfig {
        max_batch: NonZeroUsize::new(slots)?,
        prefill_chunk: NonZeroUsize::new(BATCH_PREFILL_CHUNK)?,
        admit,
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
