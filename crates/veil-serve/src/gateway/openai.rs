//! The OpenAI wire format: the requests `veil serve` accepts, the responses it sends, and its
//! errors in OpenAI's shape (status code, `error.type`, `error.message`), so a plain OpenAI
//! client works unchanged.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

/// `POST /v1/chat/completions`. Unknown fields are ignored, as OpenAI's clients send many.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessageIn>,
    #[serde(flatten)]
    pub options: GenerationOptions,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: String,
    #[serde(flatten)]
    pub options: GenerationOptions,
}

/// The settings both endpoints share.
#[derive(Debug, Default, Deserialize)]
pub struct GenerationOptions {
    #[serde(default)]
    pub stream: bool,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<StopField>,
    /// Veil's own settings; plain OpenAI clients leave them out.
    #[serde(default)]
    pub veil: VeilOptions,
}

/// Veil's request fields (`"veil": {...}`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VeilOptions {
    /// Have a committee of this many whole-model nodes check the answer (swarm only): one
    /// generates, the others recompute it; the answer is sent once a majority accepts it.
    pub verify: Option<usize>,
    /// With `verify`: check a split chain instead, each hop judged by `verify - 1` other nodes
    /// serving its blocks.
    #[serde(default)]
    pub chain: bool,
    /// `encrypted` or `plain`: what the request expects the gateway to serve; a mismatch is an
    /// error rather than a silent downgrade.
    pub privacy: Option<String>,
    /// The acceleration method: `auto` (the gateway's choice), or the kernels to run with
    /// (`veil`, `candle`, `scalar`, `avx2`, `avx512`), refused when the gateway runs others.
    pub accel: Option<String>,
}

/// `stop` is a string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

/// One message of a chat request.
#[derive(Debug, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: String,
}

/// Token counts, as OpenAI reports them.
#[derive(Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// What Veil adds to a response: how the answer was made.
#[derive(Debug, Clone, Serialize)]
pub struct VeilInfo {
    /// Where the model ran: `local` (in the gateway's process) or `swarm`.
    pub mode: &'static str,
    /// The weight format the model runs in.
    pub format: String,
    /// Whose kernels multiplied the weights.
    pub kernels: String,
    /// The acceleration method and why it was chosen (MetaInf's pick, or forced).
    pub accel: String,
    /// Decode speed of this answer.
    pub tokens_per_second: f64,
    /// How the answer was checked: `none`, or the committee's verdict.
    pub verification: String,
    /// `encrypted` (equivariant encryption: nodes saw permuted ids and rotated activations) or
    /// `plain`.
    pub privacy: &'static str,
}

/// An error in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
    pub message: String,
}

impl ApiError {
    /// A request the gateway will not run as given (400).
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            param,
            message: message.into(),
        }
    }

    /// 401: no API key, or one the gateway does not hold.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: Some("invalid_api_key"),
            ..Self::invalid(message, None)
        }
    }

    /// 403: a request through a Host header that does not name this gateway.
    pub fn foreign_host(host: &str) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            code: Some("foreign_host"),
            ..Self::invalid(
                format!(
                    "Host {host:?} does not name this gateway (a page elsewhere may be trying \
                     to reach it through DNS rebinding); allow the name with --allowed-host"
                ),
                None,
            )
        }
    }

    /// A model this gateway does not serve (404).
    pub fn unknown_model(asked: &str, served: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            code: Some("model_not_found"),
            param: Some("model"),
            message: format!(
                "the model {asked:?} is not served here; this gateway serves {served:?}"
            ),
        }
    }

    /// A prompt and answer that cannot fit the model's context (400).
    pub fn context_too_long(message: String) -> Self {
        Self {
            code: Some("context_length_exceeded"),
            ..Self::invalid(message, Some("messages"))
        }
    }

    /// Too many requests already waiting (429).
    pub fn busy(queued: usize) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            kind: "rate_limit_error",
            code: Some("queue_full"),
            param: None,
            message: format!("{queued} requests are already waiting; try again shortly"),
        }
    }

    /// No chain of nodes covers the model right now (503).
    pub fn no_route(why: &str) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "service_unavailable",
            code: Some("no_route"),
            param: None,
            message: format!("no route through the swarm: {why}"),
        }
    }

    /// A committee could not accept any answer (502).
    pub fn verification_failed(why: &str) -> Self {
        Self {
            status: StatusCode::BAD_GATEWAY,
            kind: "verification_error",
            code: Some("verification_failed"),
            param: None,
            message: format!("verification failed: {why}"),
        }
    }

    /// The gateway failed while answering (500).
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            code: None,
            param: None,
            message: message.into(),
        }
    }

    /// The error as OpenAI's JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}
