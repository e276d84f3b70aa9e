//! `veil serve`: an OpenAI-compatible HTTP gateway (axum). Handlers are thin: they check the
//! request, turn it into a generation job, and stream or collect what the job produces.
//!
//! The model runs in the gateway's process (`--local`) or on the swarm's nodes, through a
//! chain opened per request; the gateway keeps the tokenizer and chat template either way.
//! Generations run on blocking threads, a bounded fair queue (a FIFO semaphore) admits them, and
//! a client that goes away stops its generation at the next token and closes its node sessions.

pub mod access;
pub mod dashboard;
pub mod key_rotation;
pub mod metrics;
pub mod openai;
pub mod server;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use veil_model::{
    generate, ChatMessage, Completion, Drafting, FinishReason, GenerationParams, LiveRequest,
    LocalModel, ModelError, PrefixCache, SamplingParams, TokenStep,
};
use veil_net::{RemoteChain, SwarmClient};

use dashboard::{NodeRow, RecentRequests, RequestRecord};
use key_rotation::KeyedModel;
use metrics::GatewayMetrics;
use openai::{
    ApiError, ChatRequest, CompletionRequest, GenerationOptions, StopField, Usage, VeilInfo,
};

/// Bounds on what the gateway takes on.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Generations running at once.
    pub max_concurrent: usize,
    /// Requests waiting for a slot before new ones are turned away (429).
    pub max_queued: usize,
    /// Largest request body, in bytes (413 above it).
    pub max_body_bytes: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens: usize,
    /// Requests decoding together in one batch (continuous batching) for a plaintext model in
    /// this process; 1 runs one generation at a time with MetaInf's per-request methods.
    pub batch: usize,
}

/// Where generations run.
pub enum Backend {
    /// On the model loaded in this process.
    Local,
    /// On the swarm's nodes.
    Swarm(Box<SwarmBackend>),
}

/// What the gateway needs to open chains over the swarm.
pub struct SwarmBackend {
    /// A connected client.
    pub client: SwarmClient,
    /// The runtime the client runs on.
    pub runtime: Handle,
    /// The served model file's digest: nodes serve shards cut from it.
    pub digest: String,
    /// Where evidence against nodes caught lying is written.
    pub evidence_dir: std::path::PathBuf,
    /// Reputation of the nodes, moved only by checked, signed verdicts.
    pub state: veil_net::NodeState,
    /// What a node must prove before it serves or judges: that it holds the weights (unless
    /// `--weights-openings 0`), and with `--allow-nodes` or `--require-tee`, more.
    pub admission: Option<Arc<veil_net::Admission>>,
    /// With `--zk-public`: the committed private model whose proved answers
    /// `/v1/veil/classify` returns.
    pub private_model: Option<Arc<veil_zk::proof::Verifier>>,
    /// With `--recheck`: rejected answers are recomputed here before anyone is punished.
    pub recheck: Option<veil_verify::LocalRecheck>,
}

/// A critical request to the committed private model.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    /// 64 pixels of 0..16 (an 8×8 digit).
    pub input: Vec<u8>,
}

/// An encrypted model behind the gateway: the key stays here; nodes (or the local shards) run
/// the transformed weights.
pub struct Privacy {
    /// The model's key.
    pub key: veil_ee::EeKey,
    /// The encrypted shards, for a gateway that runs the model itself (empty on the swarm).
    pub shards: Vec<veil_model::ShardModel>,
}

/// What the gateway serves and how.
pub struct Gateway {
    model: Arc<LocalModel>,
    /// The continuous batching engine's queue, when [`Limits::batch`] is above 1 for a
    /// plaintext model in this process.
    batcher: Option<std::sync::mpsc::Sender<LiveRequest>>,
    backend: Backend,
    privacy: Option<Arc<KeyedModel>>,
    model_id: String,
    info: VeilInfo,
    limits: Limits,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    metrics: GatewayMetrics,
    recent: RecentRequests,
    /// MetaInf's selector and the model's features, for `veil.accel: auto` on a model in
    /// this process (none: the plain method).
    selector: Option<veil_meta::Selector>,
    model_features: Option<veil_meta::ModelFeatures>,
    /// This machine's features, read once.
    hardware: veil_meta::HardwareFeatures,
    /// Keys and values of recent prompts, for the prefix-cache methods: one cache per tenant.
    prefixes: std::sync::Mutex<HashMap<access::Tenant, TenantCache>>,
}

/// One API key's prefix cache, shared with the batching engine.
type TenantCache = Arc<std::sync::Mutex<PrefixCache>>;

/// Prefix caches the gateway keeps, one per API key (tenants past it run without one).
const MAX_TENANT_CACHES: usize = 16;

/// The most keys and values the gateway's prefix cache keeps (a quarter of it per API key).
const PREFIX_CACHE_BYTES: usize = 256 << 20;

/// Prompt tokens the batching engine runs in one pass, beside the decoding requests' tokens.
const BATCH_PREFILL_CHUNK: usize = 128;

/// Starts the continuous batching engine on its own thread, serving `model` `slots` requests
/// at a time; it stops when the gateway (the queue's sender) is dropped.
fn start_batcher(
    model: Arc<LocalModel>,
    slots: usize,
) -> Option<std::sync::mpsc::Sender<LiveRequest>> {
    let config = veil_model::BatchConfig {
        max_batch: std::num::NonZeroUsize::new(slots)?,
        prefill_chunk: std::num::NonZeroUsize::new(BATCH_PREFILL_CHUNK)?,
    };
    let (tx, rx) = std::sync::mpsc::channel();
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

/// Writes evidence where the gateway keeps it; a failure is logged (the request goes on).
fn keep_evidence<J: veil_verify::Judged>(
    dir: &std::path::Path,
    evidence: &veil_verify::Evidence<J>,
) {
    if let Err(e) = crate::commands::evidence_file::write_evidence(dir, evidence) {
        tracing::warn!("cannot keep evidence: {e:#}");
    }
}

/// A checked request, ready to run.
struct Job {
    chat: bool,
    stream: bool,
    prompt: Vec<u32>,
    params: GenerationParams,
    /// Committee size, for a verified answer.
    verify: Option<usize>,
    /// Verify a split chain (each hop judged by `verify - 1` nodes serving its blocks).
    chain: bool,
    /// The acceleration method the request forces (`None`: the selector's choice).
    accel: Option<&'static veil_meta::Method>,
    /// Whose request it is (its prefix cache).
    tenant: access::Tenant,
}

/// How an answer was made, beside the answer.
struct Made {
    verification: String,
    accel: String,
}

/// What a running generation reports.
enum Progress {
    Text(String),
    /// The answer and how it was verified, or why there is none.
    Done(Result<(Completion, Made), Failure>),
}

/// Why a generation produced no answer.
enum Failure {
    /// No chain of nodes covers the model.
    NoRoute(String),
    /// A committee accepted no answer.
    Verification(String),
    /// It failed on the way.
    Failed(String),
}

impl Failure {
    fn to_api(&self) -> ApiError {
        match self {
            Failure::NoRoute(why) => ApiError::no_route(why),
            Failure::Verification(why) => ApiError::verification_failed(why),
            Failure::Failed(why) => ApiError::internal(why.clone()),
        }
    }
}

impl Gateway {
    /// A gateway serving `model` (loaded, or only its tokenizer and template for the swarm)
    /// under the name `model_id`.
    pub fn new(
        model: LocalModel,
        backend: Backend,
        privacy: Option<KeyedModel>,
        model_id: String,
        info: VeilInfo,
        limits: Limits,
        selector: Option<(veil_meta::Selector, veil_meta::ModelFeatures)>,
    ) -> Self {
        let (selector, model_features) = selector.unzip();
        let model = Arc::new(model);
        let batcher = (limits.batch > 1 && matches!(backend, Backend::Local) && privacy.is_none())
            .then(|| start_batcher(Arc::clone(&model), limits.batch))
            .flatten();
        Self {
            batcher,
            selector,
            model_features,
            hardware: crate::accel::hardware_features(1.0),
            prefixes: std::sync::Mutex::new(HashMap::new()),
            model,
            backend,
            metrics: {
                let mut metrics = GatewayMetrics::new();
                if let Some(keyed) = &privacy {
                    metrics.count_key_rotations(keyed.rotation_counters());
                }
                metrics
            },
            privacy: privacy.map(Arc::new),
            model_id,
            info,
            slots: Arc::new(Semaphore::new(
                limits.max_concurrent.max(limits.batch).max(1),
            )),
            limits,
            waiting: AtomicUsize::new(0),
            recent: RecentRequests::default(),
        }
    }

    /// The routes, with the body limit and the access rules applied.
    pub fn router(self: Arc<Self>, access: Arc<access::Access>) -> Router {
        Router::new()
            .route("/", get(dashboard_page))
            .route("/api/dashboard", get(dashboard_data))
            .route("/health", get(health))
            .route("/v1/models", get(models))
            .route("/metrics", get(metrics_text))
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .route("/v1/veil/classify", post(classify))
            .layer(DefaultBodyLimit::max(self.limits.max_body_bytes))
            .layer(axum::middleware::from_fn_with_state(access, access::check))
            .with_state(self)
    }

    /// A critical request: a node proving the committed private model answers, and the
    /// answer is returned only once its proof verifies here (other provers are tried if it
    /// does not).
    async fn classify(&self, request: ClassifyRequest) -> Result<serde_json::Value, ApiError> {
        let Backend::Swarm(swarm) = &self.backend else {
            return Err(ApiError::invalid("critical requests go to the swarm: start the gateway with --bootstrap and --zk-public", None));
        };
        let Some(verifier) = swarm.private_model.clone() else {
            return Err(ApiError::invalid(
                "this gateway serves no private model: start it with --zk-public DIR",
                None,
            ));
        };
        if request.input.len() != veil_zk::model::INPUTS || request.input.iter().any(|&p| p > 16) {
            return Err(ApiError::invalid(
                "input is 64 pixels of 0..16 (an 8×8 digit)",
                Some("input"),
            ));
        }
        let commitment = verifier.commitment().to_string();
        let peers = veil_net::critical::provers(&swarm.client, &commitment)
            .await
            .map_err(|e| ApiError::no_route(&e.to_string()))?;
        if peers.is_empty() {
            return Err(ApiError::no_route(&format!(
                "no node proves the private model {commitment}"
            )));
        }
        let mut refused = Vec::new();
        for peer in peers {
            let proof =
                match veil_net::critical::ask_proof(&swarm.client, peer, &request.input).await {
                    Ok(proof) => proof,
                    Err(e) => {
                        refused.push(format!("{peer}: {e}"));
                        continue;
                    }
                };
            let (checker, input, checked) =
                (verifier.clone(), request.input.clone(), proof.clone());
            let verdict = tokio::task::spawn_blocking(move || checker.check(&input, &checked))
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?;
            match verdict {
                Ok(()) => {
                    return Ok(serde_json::json!({
                        "digit": veil_zk::model::argmax(&proof.output),
                        "logits": proof.output,
                        "verified": true,
                        "commitment": commitment,
                        "node": peer.to_string(),
                        "proof_bytes": proof.proof.len() / 2,
                    }))
                }
                Err(e) => refused.push(format!("{peer}: {e}")),
            }
        }
        Err(ApiError::verification_failed(&refused.join(" | ")))
    }

    /// A request's `veil.accel`: an acceleration method to force (`veil meta methods`), or
    /// the kernels the request expects. Returns the forced method.
    fn check_accel(&self, asked: &str) -> Result<Option<&'static veil_meta::Method>, ApiError> {
        let wrong = |message: String| Err(ApiError::invalid(message, Some("veil.accel")));
        if matches!(self.backend, Backend::Swarm(_)) || self.privacy.is_some() {
            return wrong(format!(
                "veil.accel {asked:?}: on the swarm and for encrypted models each node runs its own kernels and methods; use auto"
            ));
        }
        if let Ok(method) = veil_meta::method(asked) {
            if method.format != self.info.format {
                return wrong(format!(
                    "veil.accel {asked:?} runs {} weights; this gateway runs {}",
                    method.format, self.info.format
                ));
            }
            if method.batch {
                return wrong(format!(
                    "veil.accel {asked:?}: the gateway does not batch requests together yet"
                ));
            }
            return Ok(Some(method));
        }
        let Ok(kernels) = asked.parse::<veil_model::Kernels>() else {
            return wrong(format!(
                "veil.accel is auto, a method from `veil meta methods`, or kernels (veil, candle, scalar, avx2, avx512 on this CPU), got {asked:?}"
            ));
        };
        if kernels.to_string() != self.info.kernels {
            return wrong(format!(
                "this gateway runs {} kernels, not {kernels}; start it with --kernels to change",
                self.info.kernels
            ));
        }
        Ok(None)
    }

    fn check_model(&self, asked: &str) -> Result<(), ApiError> {
        if asked == self.model_id {
            Ok(())
        } else {
            Err(ApiError::unknown_model(asked, &self.model_id))
        }
    }

    fn chat_job(&self, request: ChatRequest) -> Result<Job, ApiError> {
        self.check_model(&request.model)?;
        if request.messages.is_empty() {
            return Err(ApiError::invalid("messages is empty", Some("messages")));
        }
        let mut messages = Vec::with_capacity(request.messages.len());
        for m in request.messages {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                return Err(ApiError::invalid(
                    format!("unknown role {:?}: use system, user or assistant", m.role),
                    Some("messages"),
                ));
            }
            messages.push(ChatMessage {
                role: m.role,
                content: m.content,
            });
        }
        let prompt = self.model.chat_prompt(&messages).map_err(prompt_error)?;
        self.job(true, prompt, &request.options)
    }

    fn completion_job(&self, request: CompletionRequest) -> Result<Job, ApiError> {
        self.check_model(&request.model)?;
        if request.prompt.trim().is_empty() {
            return Err(ApiError::invalid("prompt is empty", Some("prompt")));
        }
        let prompt = self
            .model
            .raw_prompt(&request.prompt)
            .map_err(prompt_error)?;
        self.job(false, prompt, &request.options)
    }

    fn job(
        &self,
        chat: bool,
        prompt: Vec<u32>,
        options: &GenerationOptions,
    ) -> Result<Job, ApiError> {
        let context = self.model.config.context_length;
        if prompt.len() >= context {
            return Err(ApiError::context_too_long(format!(
                "the prompt is {} tokens; this model's context holds {context}",
                prompt.len()
            )));
        }
        let max_tokens = options
            .max_completion_tokens
            .or(options.max_tokens)
            .unwrap_or(256.min(self.limits.max_tokens as u64));
        if max_tokens == 0 || max_tokens > self.limits.max_tokens as u64 {
            return Err(ApiError::invalid(
                format!(
                    "max_tokens {max_tokens} is outside 1..={} (this gateway's limit)",
                    self.limits.max_tokens
                ),
                Some("max_tokens"),
            ));
        }
        let stop = match &options.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "stop takes at most 4 non-empty strings",
                Some("stop"),
            ));
        }
        // OpenAI's defaults: temperature 1, no nucleus cut, a fresh seed per request.
        let sampling = SamplingParams {
            temperature: options.temperature.unwrap_or(1.0),
            top_k: None,
            top_p: options.top_p.filter(|&p| p < 1.0),
            seed: options.seed.unwrap_or_else(rand::random),
        };
        sampling
            .check()
            .map_err(|e| ApiError::invalid(e.to_string(), Some("temperature")))?;
        let encrypted = self.privacy.is_some();
        match options.veil.privacy.as_deref() {
            None => {}
            Some("encrypted") if encrypted => {}
            Some("plain") if !encrypted => {}
            Some(asked @ ("encrypted" | "plain")) => {
                return Err(ApiError::invalid(
                    format!(
                        "veil.privacy {asked:?} is not what this gateway serves ({})",
                        if encrypted { "encrypted" } else { "plain" }
                    ),
                    Some("veil.privacy"),
                ))
            }
            Some(other) => {
                return Err(ApiError::invalid(
                    format!("veil.privacy is encrypted or plain, got {other:?}"),
                    Some("veil.privacy"),
                ))
            }
        }
        let accel = match options.veil.accel.as_deref() {
            None | Some("auto") => None,
            Some(asked) => self.check_accel(asked)?,
        };
        let verify = options.veil.verify;
        match (verify, &self.backend) {
            (None, _) => {}
            (Some(_), Backend::Local) => {
                return Err(ApiError::invalid(
                    "verification needs the swarm: this gateway runs the model itself (--local)",
                    Some("veil.verify"),
                ))
            }
            (Some(n), Backend::Swarm(_)) if !(2..=16).contains(&n) => {
                return Err(ApiError::invalid(
                    format!("veil.verify is a committee size from 2 to 16, got {n}"),
                    Some("veil.verify"),
                ))
            }
            (Some(_), Backend::Swarm(_)) => {}
        }
        if options.veil.chain && verify.is_none() {
            return Err(ApiError::invalid(
                "veil.chain verifies a split chain: set veil.verify too",
                Some("veil.chain"),
            ));
        }
        if options.veil.chain && self.privacy.is_some() {
            return Err(ApiError::invalid(
                "veil.chain verifies plaintext split chains; this gateway serves an encrypted model",
                Some("veil.chain"),
            ));
        }
        Ok(Job {
            verify,
            chain: options.veil.chain,
            chat,
            stream: options.stream,
            prompt,
            params: GenerationParams {
                max_tokens: max_tokens as usize,
                sampling,
                stop,
            },
            accel,
            tenant: access::Tenant::default(),
        })
    }

    /// Waits for a generation slot in arrival order, or turns the request away when the queue
    /// is full.
    async fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let waiting = WaitingGuard::enter(self);
        if waiting.position > self.limits.max_queued {
            return Err(ApiError::busy(waiting.position - 1));
        }
        self.slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::internal("the gateway is shutting down"))
    }

    /// Runs `job` once admitted: streams server-sent events, or answers with the whole text.
    async fn run(self: Arc<Self>, job: Job) -> Result<Response, ApiError> {
        let permit = self.admit().await?;
        // Room for every piece of text and the end, so a generation never waits on a reader.
        let (tx, rx) = mpsc::channel(job.params.max_tokens.max(1) + 2);
        let gateway = self.clone();
        let (prompt, params, chat, verify, accel, tenant) = (
            job.prompt.clone(),
            job.params.clone(),
            job.chat,
            job.verify,
            job.accel,
            job.tenant,
        );
        let chain = job.chain;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            match verify {
                Some(size) if chain => {
                    gateway.generate_verified_chain(chat, size, &prompt, &params, &tx)
                }
                Some(size) => gateway.generate_verified(chat, size, &prompt, &params, &tx),
                None => gateway.generate(chat, &prompt, &params, accel, tenant, &tx),
            }
        });
        let reply = Reply::new(&self, &job);
        if job.stream {
            return Ok(reply.stream(rx).into_response());
        }
        reply.collect(rx).await
    }

    /// One generation on this thread, reporting text and the end through `tx`. Stops at the
    /// next token once nobody listens.
    fn generate(
        &self,
        chat: bool,
        prompt: &[u32],
        params: &GenerationParams,
        accel: Option<&'static veil_meta::Method>,
        tenant: access::Tenant,
        tx: &mpsc::Sender<Progress>,
    ) {
        self.metrics.active_generations.inc();
        let cancelled = AtomicBool::new(false);
        let mut on_text = |text: &str| {
            if tx.blocking_send(Progress::Text(text.to_string())).is_err() {
                cancelled.store(true, Ordering::Relaxed);
            }
        };
        let context = self.model.config.context_length;
        let tokenizer = &self.model.tokenizer;
        let mut method_used = "plain".to_string();
        // The key a request starts with is the one it ends with, whatever rotates meanwhile.
        let privacy = self.privacy.as_ref().map(|keyed| keyed.current());
        let (result, route) = match &self.backend {
            Backend::Local if self.batcher.is_some() => {
                method_used = format!("continuous batching ({} slots)", self.limits.batch);
                let result = self.generate_batched(prompt, params, tenant, tx, &cancelled);
                (result, self.local_route())
            }
            Backend::Local if self.privacy.is_none() => {
                let pick = self.pick_method(prompt, params, accel, tenant);
                tracing::info!("accel: {} ({})", pick.method.name, pick.why);
                method_used = format!("{} ({})", pick.method.name, pick.why);
                let result = self.generate_local(
                    prompt,
                    params,
                    pick.method,
                    tenant,
                    &cancelled,
                    &mut on_text,
                );
                (result, self.local_route())
            }
            Backend::Local => {
                let inner: Box<dyn TokenStep + '_> = match &privacy {
                    Some(p) => Box::new(veil_ee::EncryptedSession::new(&p.key, &p.shards)),
                    None => Box::new(self.model.session()),
                };
                let mut session = Cancellable {
                    inner,
                    cancelled: &cancelled,
                };
                let result = generate(
                    &mut session,
                    tokenizer,
                    prompt,
                    context,
                    params,
                    &mut on_text,
                );
                (result.map_err(Failure::from), self.local_route())
            }
            Backend::Swarm(swarm) => {
                let blocks = self.model.config.block_count;
                // Nodes a committee caught lying are left out of plain routes too.
                let opened = swarm.state.avoided().and_then(|avoid| {
                    RemoteChain::open_gated(
                        swarm.client.clone(),
                        swarm.runtime.clone(),
                        &swarm.digest,
                        blocks,
                        None,
                        &avoid,
                        swarm.admission.clone(),
                    )
                });
                match opened {
                    Err(e) => (Err(Failure::NoRoute(e.to_string())), "no route".to_string()),
                    Ok(mut chain) => {
                        let mut counted = CountedChain {
                            chain: &mut chain,
                            counted: 0,
                            gauge: &self.metrics.open_node_sessions,
                        };
                        let inner: Box<dyn TokenStep + '_> = match &privacy {
                            Some(p) => Box::new(veil_ee::EncryptedStep::new(&p.key, &mut counted)),
                            None => Box::new(&mut counted),
                        };
                        let result = generate(
                            &mut Cancellable {
                                inner,
                                cancelled: &cancelled,
                            },
                            tokenizer,
                            prompt,
                            context,
                            params,
                            &mut on_text,
                        );
                        let route = describe_route(counted.chain);
                        counted.close();
                        (result.map_err(Failure::from), route)
                    }
                }
            }
        };
        self.metrics.active_generations.dec();
        if let (Some(keyed), Some(used), Ok(c)) = (&self.privacy, &privacy, &result) {
            keyed.spent(used, (prompt.len() + c.tokens.len()) as u64);
        }
        match &result {
            Ok(c) => {
                self.metrics.generated_tokens.inc_by(c.tokens.len() as u64);
            }
            Err(Failure::Failed(_)) if cancelled.load(Ordering::Relaxed) => {
                self.metrics.cancelled_generations.inc();
            }
            Err(_) => {}
        }
        self.recent
            .push(self.record(chat, prompt.len(), route, &result, cancelled.into_inner()));
        let made = Made {
            verification: "none".into(),
            accel: method_used,
        };
        let _ = tx.blocking_send(Progress::Done(result.map(|c| (c, made))));
    }

    /// A generation through a split chain whose every hop `size - 1` other nodes serving its
    /// blocks replay: the text is sent once each hop is accepted.
    fn generate_verified_chain(
        &self,
        chat: bool,
        size: usize,
        prompt: &[u32],
        params: &GenerationParams,
        tx: &mpsc::Sender<Progress>,
    ) {
        let Backend::Swarm(swarm) = &self.backend else {
            return;
        };
        self.metrics.active_generations.inc();
        let request = veil_net::VerifiedChainRequest {
            model_digest: &swarm.digest,
            block_count: self.model.config.block_count,
            prompt,
            params,
            context_length: self.model.config.context_length,
            judges: size - 1,
            seed: "veil",
            request_id: veil_verify::random_request_id(),
            gate: swarm.admission.clone(),
            // A client that left stops the chain at the next token.
            cancelled: &|| tx.is_closed(),
        };
        let outcome = veil_net::generate_verified_chain(
            &swarm.client,
            &swarm.runtime,
            &self.model.tokenizer,
            &request,
            Some(&swarm.state),
            &mut |evidence| keep_evidence(&swarm.evidence_dir, evidence),
        );
        self.metrics.active_generations.dec();
        let (result, route, verification) = match outcome {
            Ok(answer) => {
                let hops: Vec<String> = answer
                    .hops
                    .iter()
                    .map(|h| {
                        format!(
                            "blocks {}-{} by {} passed by {} of {}",
                            h.blocks.0,
                            h.blocks.1,
                            h.node,
                            h.tally.passed.len(),
                            h.tally.passed.len() + h.tally.failed.len()
                        )
                    })
                    .collect();
                let verdict = format!(
                    "every hop accepted ({} caught lying): {}",
                    answer.evidence.len(),
                    hops.join("; ")
                );
                (
                    Ok(answer.completion),
                    format!("verified chain of {} hops", hops.len()),
                    verdict,
                )
            }
            Err(e) => (
                Err(self.verified_failure(e)),
                "verified chain".into(),
                "failed".into(),
            ),
        };
        self.finish_verified(chat, prompt, route, verification, result, tx);
    }

    /// A generation checked by a committee of `size` nodes: the text is sent once a majority
    /// accepts it; evidence against nodes caught lying is written as soon as it is made.
    fn generate_verified(
        &self,
        chat: bool,
        size: usize,
        prompt: &[u32],
        params: &GenerationParams,
        tx: &mpsc::Sender<Progress>,
    ) {
        let Backend::Swarm(swarm) = &self.backend else {
            return;
        };
        self.metrics.active_generations.inc();
        let request_id = veil_verify::random_request_id();
        // On an encrypted model the committee generates and judges in the key's order.
        let encrypted_order = self
            .privacy
            .as_ref()
            .map(|keyed| veil_ee::EncryptedOrder::new(&keyed.current().key));
        let recheck = |job: &veil_verify::Job| match &swarm.recheck {
            Some(local) => local.passes(job),
            None => Err("no recheck".into()),
        };
        let request = veil_net::VerifiedRequest {
            model_digest: &swarm.digest,
            prompt,
            order: match &encrypted_order {
                Some(order) => order,
                None => &veil_model::PlainOrder,
            },
            params,
            context_length: self.model.config.context_length,
            size,
            seed: "veil",
            request_id,
            gate: swarm.admission.as_deref(),
            // A client that left stops the committee at the next token.
            cancelled: &|| tx.is_closed(),
            recheck: swarm
                .recheck
                .as_ref()
                .map(|_| &recheck as &veil_net::Recheck),
        };
        let outcome = veil_net::generate_verified(
            &swarm.client,
            &swarm.runtime,
            &self.model.tokenizer,
            &request,
            Some(&swarm.state),
            &mut |evidence| keep_evidence(&swarm.evidence_dir, evidence),
        );
        self.metrics.active_generations.dec();
        let (result, route, verification) = match outcome {
            Ok(answer) => {
                let verdict = format!(
                    "accepted by {} of {} judges ({} caught lying; {} commitments)",
                    answer.tally.passed.len(),
                    answer.tally.passed.len() + answer.tally.failed.len(),
                    answer.evidence.len(),
                    answer.mode
                );
                let route = format!("committee of {size}, answer by {}", answer.generator);
                (Ok(answer.completion), route, verdict)
            }
            Err(e) => (
                Err(self.verified_failure(e)),
                format!("committee of {size}"),
                "failed".into(),
            ),
        };
        self.finish_verified(chat, prompt, route, verification, result, tx);
    }

    /// What a failed verified request tells its client: verification failed (a cancellation,
    /// counted as one, is the client's own), or no committee or chain could be formed.
    fn verified_failure(&self, e: veil_net::NetError) -> Failure {
        match e {
            veil_net::NetError::Verification(why) => {
                if why == veil_net::CANCELLED {
                    self.metrics.cancelled_generations.inc();
                }
                Failure::Verification(why)
            }
            e => Failure::NoRoute(e.to_string()),
        }
    }

    /// Sends a verified answer (or its failure) and records it for the dashboard.
    fn finish_verified(
        &self,
        chat: bool,
        prompt: &[u32],
        route: String,
        verification: String,
        result: Result<veil_model::Completion, Failure>,
        tx: &mpsc::Sender<Progress>,
    ) {
        if let Ok(c) = &result {
            self.metrics.generated_tokens.inc_by(c.tokens.len() as u64);
            let _ = tx.blocking_send(Progress::Text(c.text.clone()));
        }
        let record = self.record(chat, prompt.len(), route, &result, false);
        self.recent.push(RequestRecord {
            verification: verification.clone(),
            ..record
        });
        let made = Made {
            verification,
            accel: "plain".into(),
        };
        let _ = tx.blocking_send(Progress::Done(result.map(|c| (c, made))));
    }
}

impl Gateway {
    /// The method for a local plaintext request: the forced one, or the selector's pick among
    /// those that keep the answer exact (the gateway's format) and do not batch.
    fn pick_method(
        &self,
        prompt: &[u32],
        params: &GenerationParams,
        forced: Option<&'static veil_meta::Method>,
        tenant: access::Tenant,
    ) -> crate::accel::Pick {
        if let Some(method) = forced {
            return crate::accel::Pick {
                method,
                why: "forced".into(),
            };
        }
        let shared = self
            .with_prefixes(tenant, |p| p.shared_len(prompt))
            .unwrap_or(0);
        let mut pick = self.pick_by_features(prompt, params, shared);
        pick.why = format!(
            "{}; {shared} of {} prompt tokens cached",
            pick.why,
            prompt.len()
        );
        pick
    }

    /// Runs `f` on `tenant`'s prefix cache, made on first use; `None` if the lock is poisoned
    /// or the gateway already holds [`MAX_TENANT_CACHES`] caches.
    fn with_prefixes<R>(
        &self,
        tenant: access::Tenant,
        f: impl FnOnce(&mut PrefixCache) -> R,
    ) -> Option<R> {
        let cache = self.tenant_cache(tenant)?;
        let mut cache = cache.lock().ok()?;
        Some(f(&mut cache))
    }

    /// `tenant`'s prefix cache, made on first use; `None` if the lock is poisoned or the
    /// gateway already holds [`MAX_TENANT_CACHES`] caches.
    fn tenant_cache(&self, tenant: access::Tenant) -> Option<TenantCache> {
        let mut caches = self.prefixes.lock().ok()?;
        if !caches.contains_key(&tenant) && caches.len() >= MAX_TENANT_CACHES {
            return None;
        }
        let budget = match tenant.0 {
            None => PREFIX_CACHE_BYTES,
            Some(_) => PREFIX_CACHE_BYTES / 4,
        };
        let cache = caches
            .entry(tenant)
            .or_insert_with(|| Arc::new(std::sync::Mutex::new(PrefixCache::new(budget))));
        Some(Arc::clone(cache))
    }

    /// The selector's pick for this workload, `shared` of the prompt's tokens being cached.
    fn pick_by_features(
        &self,
        prompt: &[u32],
        params: &GenerationParams,
        shared: usize,
    ) -> crate::accel::Pick {
        let Some(model_features) = &self.model_features else {
            return crate::accel::Pick {
                method: veil_meta::default_method(),
                why: "auto: no selector".into(),
            };
        };
        let features = veil_meta::Features {
            model: model_features.clone(),
            hardware: self.hardware.clone(),
            workload: veil_meta::WorkloadFeatures {
                prompt_tokens: prompt.len().max(1) as u32,
                output_tokens: params.max_tokens.max(1) as u32,
                batch: 1,
                shared_prefix: shared as f64 / prompt.len().max(1) as f64,
                rewrite: false,
            },
        };
        crate::accel::pick_method(
            "auto",
            self.selector.as_ref(),
            &features,
            Some(&self.info.format),
        )
        .unwrap_or_else(|_| crate::accel::Pick {
            method: veil_meta::default_method(),
            why: "auto: no choice".into(),
        })
    }

    /// One local plaintext generation with `method`; a prefix-cache method keeps the prompt's
    /// keys and values for the next request.
    fn generate_local(
        &self,
        prompt: &[u32],
        params: &GenerationParams,
        method: &veil_meta::Method,
        tenant: access::Tenant,
        cancelled: &AtomicBool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Completion, Failure> {
        let session = if method.prefix_cache {
            self.with_prefixes(tenant, |cache| self.model.session_from(cache, prompt))
                .unwrap_or_else(|| Ok(self.model.session()))
        } else {
            Ok(self.model.session())
        };
        let mut session = Cancellable {
            inner: session.map_err(Failure::from)?,
            cancelled,
        };
        let (completion, _) = veil_model::generate_accelerated(
            &mut session,
            &self.model.tokenizer,
            prompt,
            self.model.config.context_length,
            params,
            &crate::accel::accel_of(method),
            on_text,
        )?;
        if method.prefix_cache {
            let kept = self.with_prefixes(tenant, |cache| cache.keep(prompt, session.inner));
            if let Some(Err(e)) = kept {
                tracing::warn!("prefix cache: {e}");
            }
        }
        Ok(completion)
    }

    /// One local plaintext generation in the continuous batching engine: its text goes to `tx`
    /// as it comes (never blocking the batch), and it leaves the batch once `tx` is closed.
    fn generate_batched(
        &self,
        prompt: &[u32],
        params: &GenerationParams,
        tenant: access::Tenant,
        tx: &mpsc::Sender<Progress>,
        cancelled: &AtomicBool,
    ) -> Result<Completion, Failure> {
        let batcher = self
            .batcher
            .as_ref()
            .ok_or_else(|| Failure::Failed("no batching engine".into()))?;
        let gone = Arc::new(AtomicBool::new(false));
        let (done, answer) = std::sync::mpsc::channel();
        let (text, leave) = (tx.clone(), Arc::clone(&gone));
        let request = LiveRequest {
            prompt: prompt.to_vec(),
            params: params.clone(),
            // The channel holds a whole answer's text, so a slow reader never fills it.
            on_text: Box::new(move |t| {
                if text.try_send(Progress::Text(t.to_string())).is_err() {
                    leave.store(true, Ordering::Relaxed);
                }
            }),
            cancelled: Arc::clone(&gone),
            prefixes: self.tenant_cache(tenant),
            on_done: Box::new(move |result| {
                let _ = done.send(result);
            }),
        };
        batcher
            .send(request)
            .map_err(|_| Failure::Failed("the batching engine stopped".into()))?;
        // A client that leaves while no text is due is noticed here, once a second.
        let result = loop {
            match answer.recv_timeout(std::time::Duration::from_secs(1)) {
                Ok(result) => break result,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if tx.is_closed() {
                        gone.store(true, Ordering::Relaxed);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    break Err(ModelError::Batch("the batching engine stopped".into()))
                }
            }
        };
        cancelled.store(gone.load(Ordering::Relaxed), Ordering::Relaxed);
        result.map_err(Failure::from)
    }

    /// The route of a generation in this process.
    fn local_route(&self) -> String {
        format!("this process, blocks 0-{}", self.model.config.block_count)
    }

    /// What the dashboard remembers of a finished generation.
    fn record(
        &self,
        chat: bool,
        prompt_tokens: usize,
        route: String,
        result: &Result<Completion, Failure>,
        cancelled: bool,
    ) -> RequestRecord {
        let (completion_tokens, tokens_per_second, outcome) = match result {
            Ok(c) => {
                let decoded = c.tokens.len().saturating_sub(1) as f64;
                let speed = decoded / c.decode_time.as_secs_f64().max(1e-9);
                (c.tokens.len(), speed, finish_reason(c.finish).to_string())
            }
            Err(_) if cancelled => (0, 0.0, "cancelled".to_string()),
            Err(Failure::NoRoute(_)) => (0, 0.0, "no route".to_string()),
            Err(Failure::Verification(_)) => (0, 0.0, "not verified".to_string()),
            Err(Failure::Failed(_)) => (0, 0.0, "error".to_string()),
        };
        RequestRecord {
            finished: unix_now(),
            endpoint: if chat { "chat" } else { "completions" },
            route,
            prompt_tokens,
            completion_tokens,
            tokens_per_second,
            outcome,
            verification: "none".to_string(),
        }
    }

    /// The nodes the dashboard lists: this process, or what the swarm says it serves.
    async fn nodes(&self) -> Vec<NodeRow> {
        let Backend::Swarm(swarm) = &self.backend else {
            return vec![NodeRow {
                name: format!("local ({})", self.model_id),
                ranges: self.local_route(),
                replicas: 1,
                reputation: None,
            }];
        };
        let mut found = swarm
            .client
            .discover(&swarm.digest)
            .await
            .unwrap_or_default();
        found.sort_by_key(|c| (c.info.first_block, c.info.end_block));
        let reputation: std::collections::HashMap<String, i64> = swarm
            .state
            .reputations()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let replicas = |first: usize, end: usize| {
            found
                .iter()
                .filter(|c| c.info.first_block == first && c.info.end_block == end)
                .count()
        };
        found
            .iter()
            .map(|c| NodeRow {
                name: c.peer.to_string(),
                ranges: format!("blocks {}-{}", c.info.first_block, c.info.end_block),
                replicas: replicas(c.info.first_block, c.info.end_block),
                reputation: reputation.get(&c.peer.to_string()).copied(),
            })
            .collect()
    }

    /// What `/api/dashboard` answers.
    async fn dashboard(&self) -> serde_json::Value {
        serde_json::json!({
            "model": self.model_id,
            "mode": self.info.mode,
            "format": self.info.format,
            "kernels": self.info.kernels,
            "active": self.metrics.active_generations.get(),
            "queued": self.metrics.queued_requests.get(),
            "nodes": self.nodes().await,
            "requests": self.recent.snapshot(),
        })
    }
}

impl From<ModelError> for Failure {
    fn from(e: ModelError) -> Self {
        Failure::Failed(e.to_string())
    }
}

/// A chain's hops, for the dashboard: `blocks 0-10 on 12D3…; blocks 10-30 on 12D3…`.
fn describe_route(chain: &RemoteChain) -> String {
    chain
        .route()
        .iter()
        .map(|(node, _)| {
            let relayed = if chain.is_relayed(&node.peer) {
                " (relayed)"
            } else {
                ""
            };
            format!(
                "blocks {}-{} on {}{relayed}",
                node.info.first_block, node.info.end_block, node.peer
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Counts a request among the waiting for as long as it waits, even if its client leaves.
struct WaitingGuard<'a> {
    gateway: &'a Gateway,
    position: usize,
}

impl<'a> WaitingGuard<'a> {
    fn enter(gateway: &'a Gateway) -> Self {
        let position = gateway.waiting.fetch_add(1, Ordering::SeqCst) + 1;
        gateway.metrics.queued_requests.inc();
        Self { gateway, position }
    }
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.gateway.waiting.fetch_sub(1, Ordering::SeqCst);
        self.gateway.metrics.queued_requests.dec();
    }
}

/// A model session that fails its next step once its client has gone.
struct Cancellable<'a, S> {
    inner: S,
    cancelled: &'a AtomicBool,
}

impl<S> Cancellable<'_, S> {
    /// An error once the client has gone.
    fn check(&self) -> veil_model::Result<()> {
        if self.cancelled.load(Ordering::Relaxed) {
            return Err(ModelError::Cancelled);
        }
        Ok(())
    }
}

impl<S: TokenStep> TokenStep for Cancellable<'_, S> {
    fn step(&mut self, tokens: &[u32]) -> veil_model::Result<Vec<f32>> {
        self.check()?;
        self.inner.step(tokens)
    }
}

impl<S: Drafting> Drafting for Cancellable<'_, S> {
    fn step_each(&mut self, tokens: &[u32]) -> veil_model::Result<Vec<Vec<f32>>> {
        self.check()?;
        self.inner.step_each(tokens)
    }

    fn rewind(&mut self, positions: usize) -> veil_model::Result<()> {
        self.inner.rewind(positions)
    }

    fn position(&self) -> usize {
        self.inner.position()
    }
}

/// A chain that keeps the open-node-sessions gauge in step with its hops (sessions open as the
/// chain first runs, and move on failover).
struct CountedChain<'a> {
    chain: &'a mut RemoteChain,
    counted: i64,
    gauge: &'a prometheus_client::metrics::gauge::Gauge,
}

impl CountedChain<'_> {
    fn close(self) {
        self.chain.close();
        self.gauge.dec_by(self.counted);
    }
}

impl TokenStep for CountedChain<'_> {
    fn step(&mut self, tokens: &[u32]) -> veil_model::Result<Vec<f32>> {
        let result = self.chain.step(tokens);
        let hops = self.chain.route().len() as i64;
        self.gauge.inc_by(hops - self.counted);
        self.counted = hops;
        result
    }
}

/// Builds the response bodies of one request.
struct Reply {
    id: String,
    created: u64,
    model: String,
    chat: bool,
    info: VeilInfo,
}

impl Reply {
    fn new(gateway: &Gateway, job: &Job) -> Self {
        let prefix = if job.chat { "chatcmpl" } else { "cmpl" };
        Self {
            id: format!("{prefix}-{:016x}", rand::random::<u64>()),
            created: unix_now(),
            model: gateway.model_id.clone(),
            chat: job.chat,
            info: gateway.info.clone(),
        }
    }

    /// One streamed chunk: new text, or the end with its reason.
    fn chunk(&self, text: Option<&str>, finish: Option<&str>, first: bool) -> serde_json::Value {
        let choice = if self.chat {
            let delta = match (first, text) {
                (true, _) => serde_json::json!({"role": "assistant", "content": ""}),
                (false, Some(t)) => serde_json::json!({"content": t}),
                (false, None) => serde_json::json!({}),
            };
            serde_json::json!({"index": 0, "delta": delta, "finish_reason": finish})
        } else {
            serde_json::json!({"index": 0, "text": text.unwrap_or(""), "finish_reason": finish})
        };
        serde_json::json!({
            "id": self.id,
            "object": if self.chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }

    fn stream(
        self,
        rx: mpsc::Receiver<Progress>,
    ) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
        enum Stage {
            Start,
            Body,
            Finish,
            Done,
        }
        let events = futures::stream::unfold(
            (self, rx, Stage::Start),
            |(reply, mut rx, stage)| async move {
                let data = match stage {
                    Stage::Done => return None,
                    Stage::Finish => {
                        return Some((
                            Ok(Event::default().data("[DONE]")),
                            (reply, rx, Stage::Done),
                        ))
                    }
                    Stage::Start if reply.chat => {
                        let first = reply.chunk(None, None, true).to_string();
                        return Some((Ok(Event::default().data(first)), (reply, rx, Stage::Body)));
                    }
                    Stage::Start | Stage::Body => rx.recv().await,
                };
                let (event, next) = match data {
                    Some(Progress::Text(t)) => (reply.chunk(Some(&t), None, false), Stage::Body),
                    Some(Progress::Done(Ok((c, made)))) => {
                        let mut last = reply.chunk(None, Some(finish_reason(c.finish)), false);
                        last["usage"] = serde_json::json!(usage(&c));
                        last["veil"] = serde_json::json!(reply.info_for(&c, made));
                        (last, Stage::Finish)
                    }
                    Some(Progress::Done(Err(e))) => (e.to_api().body(), Stage::Finish),
                    None => (
                        ApiError::internal("the generation ended early").body(),
                        Stage::Finish,
                    ),
                };
                Some((
                    Ok(Event::default().data(event.to_string())),
                    (reply, rx, next),
                ))
            },
        );
        // A comment line every second while nothing else is sent (a committee generating and
        // judging streams nothing until it accepts): a client that left is noticed at the next
        // write, and its generation stopped. OpenAI clients skip SSE comments.
        Sse::new(events).keep_alive(
            axum::response::sse::KeepAlive::new().interval(std::time::Duration::from_secs(1)),
        )
    }

    async fn collect(self, mut rx: mpsc::Receiver<Progress>) -> Result<Response, ApiError> {
        let (completion, made) = loop {
            match rx.recv().await {
                Some(Progress::Text(_)) => {}
                Some(Progress::Done(Ok(done))) => break done,
                Some(Progress::Done(Err(e))) => return Err(e.to_api()),
                None => return Err(ApiError::internal("the generation ended early")),
            }
        };
        let finish = finish_reason(completion.finish);
        let choice = if self.chat {
            serde_json::json!({
                "index": 0,
                "message": {"role": "assistant", "content": completion.text},
                "finish_reason": finish,
            })
        } else {
            serde_json::json!({"index": 0, "text": completion.text, "finish_reason": finish})
        };
        Ok(Json(serde_json::json!({
            "id": self.id,
            "object": if self.chat { "chat.completion" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(&completion),
            "veil": self.info_for(&completion, made),
        }))
        .into_response())
    }

    fn info_for(&self, c: &Completion, made: Made) -> VeilInfo {
        let decoded = c.tokens.len().saturating_sub(1) as f64;
        VeilInfo {
            tokens_per_second: decoded / c.decode_time.as_secs_f64().max(1e-9),
            verification: made.verification,
            accel: made.accel,
            ..self.info.clone()
        }
    }
}

fn usage(c: &Completion) -> Usage {
    Usage {
        prompt_tokens: c.prompt_tokens,
        completion_tokens: c.tokens.len(),
        total_tokens: c.prompt_tokens + c.tokens.len(),
    }
}

fn finish_reason(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Eos | FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// A prompt that could not be turned into tokens.
fn prompt_error(e: ModelError) -> ApiError {
    match e {
        ModelError::EmptyPrompt => ApiError::invalid(e.to_string(), Some("messages")),
        e => ApiError::invalid(e.to_string(), None),
    }
}

/// A body axum could not read as the request: too large keeps its 413; bad JSON, missing
/// fields and a wrong content type are 400, as OpenAI answers them.
fn rejected(rejection: JsonRejection) -> ApiError {
    let status = match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::BAD_REQUEST,
    };
    ApiError {
        status,
        ..ApiError::invalid(rejection.body_text(), None)
    }
}

/// Answers with `result`, counting it.
fn answer(gateway: &Gateway, endpoint: &str, result: Result<Response, ApiError>) -> Response {
    let response = result.unwrap_or_else(IntoResponse::into_response);
    gateway
        .metrics
        .answered(endpoint, response.status().as_u16());
    response
}

async fn dashboard_page() -> axum::response::Html<&'static str> {
    axum::response::Html(dashboard::PAGE)
}

async fn dashboard_data(State(gateway): State<Arc<Gateway>>) -> Json<serde_json::Value> {
    Json(gateway.dashboard().await)
}

async fn health(State(gateway): State<Arc<Gateway>>) -> Response {
    let body = Json(serde_json::json!({"status": "ok", "model": gateway.model_id}));
    answer(&gateway, "health", Ok(body.into_response()))
}

async fn models(State(gateway): State<Arc<Gateway>>) -> Response {
    let body = Json(serde_json::json!({
        "object": "list",
        "data": [{"id": gateway.model_id, "object": "model", "created": 0, "owned_by": "veil"}],
    }));
    answer(&gateway, "models", Ok(body.into_response()))
}

async fn metrics_text(State(gateway): State<Arc<Gateway>>) -> Response {
    let headers = [(
        axum::http::header::CONTENT_TYPE,
        "text/plain; version=0.0.4; charset=utf-8",
    )];
    (headers, gateway.metrics.render()).into_response()
}

async fn chat(
    State(gateway): State<Arc<Gateway>>,
    tenant: Option<axum::Extension<access::Tenant>>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Response {
    let job = match body.map_err(rejected) {
        Ok(Json(r)) => off_the_workers(&gateway, move |g| g.chat_job(r)).await,
        Err(e) => Err(e),
    }
    .map(|job| Job {
        tenant: tenant.map(|t| t.0).unwrap_or_default(),
        ..job
    });
    run_and_answer(gateway, "chat", job).await
}

/// Makes a job on a blocking thread: tokenizing a prompt of up to `--max-body-bytes` takes
/// long enough to stall every stream and health check sharing the async workers.
async fn off_the_workers(
    gateway: &Arc<Gateway>,
    make: impl FnOnce(&Gateway) -> Result<Job, ApiError> + Send + 'static,
) -> Result<Job, ApiError> {
    let gateway = gateway.clone();
    tokio::task::spawn_blocking(move || make(&gateway))
        .await
        .unwrap_or_else(|e| {
            Err(ApiError::internal(format!(
                "preparing the request failed: {e}"
            )))
        })
}

async fn classify(
    State(gateway): State<Arc<Gateway>>,
    body: Result<Json<ClassifyRequest>, JsonRejection>,
) -> Response {
    let result = match body.map_err(rejected) {
        Ok(Json(request)) => gateway
            .classify(request)
            .await
            .map(|v| Json(v).into_response()),
        Err(e) => Err(e),
    };
    answer(&gateway, "classify", result)
}

async fn completions(
    State(gateway): State<Arc<Gateway>>,
    tenant: Option<axum::Extension<access::Tenant>>,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Response {
    let job = match body.map_err(rejected) {
        Ok(Json(r)) => off_the_workers(&gateway, move |g| g.completion_job(r)).await,
        Err(e) => Err(e),
    }
    .map(|job| Job {
        tenant: tenant.map(|t| t.0).unwrap_or_default(),
        ..job
    });
    run_and_answer(gateway, "completions", job).await
}

/// Runs a checked job (or answers why it could not be made), counting the answer.
async fn run_and_answer(
    gateway: Arc<Gateway>,
    endpoint: &str,
    job: Result<Job, ApiError>,
) -> Response {
    let result = match job {
        Ok(job) => gateway.clone().run(job).await,
        Err(e) => Err(e),
    };
    answer(&gateway, endpoint, result)
}
