//! `veil serve`: an OpenAI-compatible HTTP gateway (axum). Handlers are thin: they check the
//! request, turn it into a generation job, and hand the job to a [`Backend`], streaming or
//! collecting what it produces.
//!
//! The model runs in the gateway's process (`--local`) or on the swarm's nodes, through a
//! chain opened per request; the gateway keeps the tokenizer and chat template either way.
//! Generations run on blocking threads, a bounded fair queue (a FIFO semaphore) admits them, and
//! a client that goes away stops its generation at the next token and closes its node sessions.

pub mod access;
pub mod dashboard;
pub mod metrics;
pub mod openai;
pub mod server;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use veil_model::{
    ChatMessage, Completion, FinishReason, GenerationParams, LocalModel, ModelError, PrefixCache,
    SamplingParams,
};

use crate::backend::{
    Answer, Backend, Batching, Committee, EncryptedLocal, Failure, LocalBackend, Request,
    SharedPrefixCache, SwarmChain, SwarmConnection, VerifiedChain,
};
use crate::key_rotation::KeyedModel;
use dashboard::{NodeRow, RecentRequests, RequestRecord};
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
    /// Continuous batching for a plaintext model in this process: off (one generation at a
    /// time with MetaInf's per-request methods), always, or MetaInf's choice per request.
    pub batch: Batching,
}

/// Where the gateway's requests run.
pub enum Serving {
    /// The plaintext model in this process, MetaInf's selector (and the model's features)
    /// choosing each request's method.
    Local {
        /// The selector; `None`: the plain method.
        selector: Option<(veil_meta::Selector, veil_meta::ModelFeatures)>,
    },
    /// An encrypted model in this process; its key may rotate.
    Encrypted(KeyedModel),
    /// The swarm's nodes: plain chains, and committees and verified chains on request.
    Swarm {
        /// The client and the records it keeps.
        connection: Box<SwarmConnection>,
        /// The key, when the nodes serve an encrypted model.
        key: Option<KeyedModel>,
        /// With `--zk-public`: the committed private model whose proved answers
        /// `/v1/veil/classify` returns.
        private_model: Option<Arc<veil_zk::proof::Verifier>>,
    },
}

/// A critical request to the committed private model.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    /// 64 pixels of 0..16 (an 8×8 digit).
    pub input: Vec<u8>,
}

/// What the gateway serves and how.
pub struct Gateway {
    /// The model's tokenizer, chat template and configuration (and, for a plaintext model in
    /// this process, its weights).
    model: Arc<LocalModel>,
    /// Where requests without `veil.verify` run.
    plain: Box<dyn Backend>,
    /// The swarm, where verified requests run (`None`: the model runs here).
    swarm: Option<Arc<SwarmConnection>>,
    /// The key of an encrypted model.
    keyed: Option<Arc<KeyedModel>>,
    /// The committed private model critical requests are proved on.
    private_model: Option<Arc<veil_zk::proof::Verifier>>,
    model_id: String,
    info: VeilInfo,
    limits: Limits,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    metrics: GatewayMetrics,
    recent: RecentRequests,
    /// Keys and values of recent prompts, for the prefix-cache methods: one cache per tenant.
    prefixes: std::sync::Mutex<HashMap<access::Tenant, SharedPrefixCache>>,
}

/// Prefix caches the gateway keeps, one per API key (tenants past it run without one).
const MAX_TENANT_CACHES: usize = 16;

/// The most keys and values the gateway's prefix cache keeps (a quarter of it per API key).
const PREFIX_CACHE_BYTES: usize = 256 << 20;

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

/// What a running generation reports.
enum Progress {
    Text(String),
    /// The answer, or why there is none.
    Done(Box<Result<Answer, Failure>>),
}

/// What a failure tells the client.
fn failure_to_api(failure: &Failure) -> ApiError {
    match failure {
        Failure::NoRoute(e) => ApiError::no_route(&e.to_string()),
        Failure::Verification(why) => ApiError::verification_failed(why),
        e => ApiError::internal(e.to_string()),
    }
}

impl Gateway {
    /// A gateway serving `model` (loaded, or only its tokenizer and template when the weights
    /// run elsewhere) under the name `model_id`.
    pub fn new(
        model: Arc<LocalModel>,
        serving: Serving,
        model_id: String,
        info: VeilInfo,
        limits: Limits,
    ) -> Self {
        let mut metrics = GatewayMetrics::new();
        let (plain, swarm, keyed, private_model): (Box<dyn Backend>, _, _, _) = match serving {
            Serving::Local { selector } => {
                let local = LocalBackend::new(Arc::clone(&model), info.format.clone(), selector)
                    .batching(limits.batch);
                (Box::new(local), None, None, None)
            }
            Serving::Encrypted(keyed) => {
                let keyed = Arc::new(keyed);
                let local = EncryptedLocal::new(Arc::clone(&model), Arc::clone(&keyed));
                (Box::new(local), None, Some(keyed), None)
            }
            Serving::Swarm {
                connection,
                key,
                private_model,
            } => {
                let connection = Arc::new(*connection);
                let key = key.map(Arc::new);
                let chain = SwarmChain::new(Arc::clone(&connection), key.clone())
                    .counting_sessions(metrics.open_node_sessions.clone());
                (Box::new(chain), Some(connection), key, private_model)
            }
        };
        if let Some(keyed) = &keyed {
            metrics.count_key_rotations(keyed.rotation_counters());
        }
        Self {
            prefixes: std::sync::Mutex::new(HashMap::new()),
            model,
            plain,
            swarm,
            keyed,
            private_model,
            metrics,
            model_id,
            info,
            slots: Arc::new(Semaphore::new(
                limits.max_concurrent.max(limits.batch.slots()).max(1),
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
        let Some(swarm) = &self.swarm else {
            return Err(ApiError::invalid("critical requests go to the swarm: start the gateway with --bootstrap and --zk-public", None));
        };
        let Some(verifier) = self.private_model.clone() else {
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
        if self.swarm.is_some() || self.keyed.is_some() {
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
            if method.batch && self.limits.batch == Batching::Off {
                return wrong(format!(
                    "veil.accel {asked:?} batches requests together: start the gateway with --batch N or --batch auto"
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
        let encrypted = self.keyed.is_some();
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
        match (verify, &self.swarm) {
            (None, _) => {}
            (Some(_), None) => {
                return Err(ApiError::invalid(
                    "verification needs the swarm: this gateway runs the model itself (--local)",
                    Some("veil.verify"),
                ))
            }
            (Some(n), Some(_)) if !(2..=16).contains(&n) => {
                return Err(ApiError::invalid(
                    format!("veil.verify is a committee size from 2 to 16, got {n}"),
                    Some("veil.verify"),
                ))
            }
            (Some(_), Some(_)) => {}
        }
        if options.veil.chain && verify.is_none() {
            return Err(ApiError::invalid(
                "veil.chain verifies a split chain: set veil.verify too",
                Some("veil.chain"),
            ));
        }
        if options.veil.chain && self.keyed.is_some() {
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
        let reply = Reply::new(&self, &job);
        let stream = job.stream;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            self.generate(&job, &tx);
        });
        if stream {
            return Ok(reply.stream(rx).into_response());
        }
        reply.collect(rx).await
    }

    /// The backend for `job`: a committee or a verified chain when it asks for verification
    /// (checked to be on the swarm), else the gateway's plain one.
    fn backend_for(&self, job: &Job) -> Option<Box<dyn Backend>> {
        let (size, swarm) = (job.verify?, self.swarm.as_ref()?);
        Some(if job.chain {
            Box::new(VerifiedChain::new(Arc::clone(swarm), size - 1))
        } else {
            Box::new(Committee::new(Arc::clone(swarm), size, self.keyed.clone()))
        })
    }

    /// One generation on this thread, reporting text and the end through `tx`. Stops at the
    /// next token once nobody listens.
    fn generate(&self, job: &Job, tx: &mpsc::Sender<Progress>) {
        let verified = self.backend_for(job);
        let backend = verified.as_deref().unwrap_or(self.plain.as_ref());
        let cancelled = || tx.is_closed();
        let request = Request {
            prompt: &job.prompt,
            params: &job.params,
            method: job.accel,
            prefixes: self.tenant_cache(job.tenant),
            cancelled: &cancelled,
        };
        self.metrics.active_generations.inc();
        let result = backend.generate(&request, &mut |text| {
            // A closed channel means the client left: `cancelled` stops the generation.
            let _ = tx.blocking_send(Progress::Text(text.to_string()));
        });
        self.metrics.active_generations.dec();
        match &result {
            Ok(answer) => {
                let tokens = answer.completion.tokens.len() as u64;
                self.metrics.generated_tokens.inc_by(tokens);
            }
            Err(_) if cancelled() => {
                self.metrics.cancelled_generations.inc();
            }
            Err(_) => {}
        }
        self.recent
            .push(self.record(job, backend, &result, cancelled()));
        let _ = tx.blocking_send(Progress::Done(Box::new(result)));
    }

    /// `tenant`'s prefix cache, made on first use; `None` if the lock is poisoned or the
    /// gateway already holds [`MAX_TENANT_CACHES`] caches.
    fn tenant_cache(&self, tenant: access::Tenant) -> Option<SharedPrefixCache> {
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

    /// What the dashboard remembers of a finished generation.
    fn record(
        &self,
        job: &Job,
        backend: &dyn Backend,
        result: &Result<Answer, Failure>,
        cancelled: bool,
    ) -> RequestRecord {
        let (completion_tokens, tokens_per_second, outcome) = match result {
            Ok(a) => (
                a.completion.tokens.len(),
                crate::backend::decode_speed(&a.completion),
                finish_reason(a.completion.finish).to_string(),
            ),
            Err(_) if cancelled => (0, 0.0, "cancelled".to_string()),
            Err(Failure::NoRoute(_)) => (0, 0.0, "no route".to_string()),
            Err(Failure::Verification(_)) => (0, 0.0, "not verified".to_string()),
            Err(_) => (0, 0.0, "error".to_string()),
        };
        let (route, verification) = match result {
            Ok(a) => (a.route.to_string(), verification_of(a)),
            Err(_) if job.verify.is_some() => (backend.describe(), "failed".into()),
            Err(_) => (backend.describe(), "none".into()),
        };
        RequestRecord {
            finished: unix_now(),
            endpoint: if job.chat { "chat" } else { "completions" },
            route,
            prompt_tokens: job.prompt.len(),
            completion_tokens,
            tokens_per_second,
            outcome,
            verification,
        }
    }

    /// The nodes the dashboard lists: this process, or what the swarm says it serves.
    async fn nodes(&self) -> Vec<NodeRow> {
        let Some(swarm) = &self.swarm else {
            return vec![NodeRow {
                name: format!("local ({})", self.model_id),
                ranges: self.plain.describe(),
                replicas: 1,
                reputation: None,
            }];
        };
        let privacy = self.keyed.as_ref().map(|keyed| keyed.current());
        let (digest, _) = swarm.target(privacy.as_deref());
        let mut found = swarm.client.discover(digest).await.unwrap_or_default();
        found.sort_by_key(|c| (c.info.first_block, c.info.end_block));
        let reputation: HashMap<String, i64> = swarm
            .state
            .as_ref()
            .and_then(|state| state.reputations().ok())
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

/// `veil.verification` for an answer: how it was checked, or "none".
fn verification_of(answer: &Answer) -> String {
    answer
        .verification
        .as_ref()
        .map_or_else(|| "none".into(), |v| v.summary())
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
                    Some(Progress::Done(done)) => match *done {
                        Ok(answer) => {
                            let c = &answer.completion;
                            let mut last = reply.chunk(None, Some(finish_reason(c.finish)), false);
                            last["usage"] = serde_json::json!(usage(c));
                            last["veil"] = serde_json::json!(reply.info_for(&answer));
                            (last, Stage::Finish)
                        }
                        Err(e) => (failure_to_api(&e).body(), Stage::Finish),
                    },
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
        let answer = loop {
            match rx.recv().await {
                Some(Progress::Text(_)) => {}
                Some(Progress::Done(done)) => match *done {
                    Ok(answer) => break answer,
                    Err(e) => return Err(failure_to_api(&e)),
                },
                None => return Err(ApiError::internal("the generation ended early")),
            }
        };
        let completion = &answer.completion;
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
            "usage": usage(completion),
            "veil": self.info_for(&answer),
        }))
        .into_response())
    }

    fn info_for(&self, answer: &Answer) -> VeilInfo {
        VeilInfo {
            tokens_per_second: crate::backend::decode_speed(&answer.completion),
            verification: verification_of(answer),
            accel: answer.accel.clone(),
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
