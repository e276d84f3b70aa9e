//! The gateway in process: requests go through its router with tower's `oneshot`, no socket
//! and no child process (the real-process tests are in `tests/gateway.rs`).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{json, Value};
use tower::ServiceExt;
use veil_model::{ChatMessage, GenerationParams, LocalModel, WeightFormat};

use super::access::Access;
use super::openai::VeilInfo;
use super::{Gateway, Limits, Serving};

const MODEL: &str = "SmolLM2-135M-Instruct";

fn load() -> LocalModel {
    let path = veil_model::ModelStore::from_env()
        .ensure(&veil_model::SMOLLM2_135M, &mut |_| {})
        .expect("the default model can be fetched");
    LocalModel::load(&path, WeightFormat::AsStored, &[]).expect("the model loads")
}

/// A gateway on the default model in this process, taking `max_tokens` at most.
fn router() -> axum::Router {
    let info = VeilInfo {
        mode: "local",
        format: "stored".into(),
        kernels: "veil".into(),
        accel: "plain".into(),
        tokens_per_second: 0.0,
        verification: "none".into(),
        privacy: "plain",
    };
    let limits = Limits {
        max_concurrent: 1,
        max_queued: 4,
        max_body_bytes: 1 << 20,
        max_tokens: 64,
        batch: crate::backend::Batching::Off,
    };
    let gateway = Gateway::new(
        Arc::new(load()),
        Serving::Local { selector: None },
        MODEL.into(),
        info,
        limits,
    );
    Arc::new(gateway).router(Arc::new(Access::default()))
}

/// Sends `body` (JSON) or a GET to `path`; the status and the JSON answer.
async fn send(router: &axum::Router, path: &str, body: Option<&str>) -> (StatusCode, Value) {
    let request = Request::builder()
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json");
    let request = match body {
        Some(body) => request.method("POST").body(Body::from(body.to_string())),
        None => request.method("GET").body(Body::empty()),
    }
    .expect("a request");
    let response = router.clone().oneshot(request).await.expect("an answer");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("a body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn chat(extra: Value) -> String {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
        "max_tokens": 8,
    });
    for (k, v) in extra.as_object().into_iter().flatten() {
        body[k] = v.clone();
    }
    body.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_answers_as_one_process_and_refuses_bad_requests_in_openais_shape() {
    let router = router();

    let (status, models) = send(&router, "/v1/models", None).await;
    assert_eq!(status, StatusCode::OK, "{models}");
    assert_eq!(models["data"][0]["id"], MODEL, "{models}");

    let (status, reply) = send(&router, "/v1/chat/completions", Some(&chat(json!({})))).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let model = load();
    let prompt = model
        .chat_prompt(&[ChatMessage::user("What is the capital of France?")])
        .expect("a prompt");
    let params = GenerationParams {
        max_tokens: 8,
        ..Default::default()
    };
    let alone = veil_model::generate(
        &mut model.session(),
        &model.tokenizer,
        &prompt,
        model.config.context_length,
        &params,
        &mut |_| {},
    )
    .expect("it generates");
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        alone.text.as_str(),
        "{reply}"
    );
    assert_eq!(reply["veil"]["mode"], "local", "{reply}");

    // Each bad request gets its status and an error object, and the gateway serves on.
    let bad: [(String, StatusCode); 4] = [
        (
            chat(json!({"max_tokens": 100_000})),
            StatusCode::BAD_REQUEST,
        ),
        (chat(json!({"model": "gpt-4"})), StatusCode::NOT_FOUND),
        (chat(json!({"temperature": -1})), StatusCode::BAD_REQUEST),
        ("{not json".to_string(), StatusCode::BAD_REQUEST),
    ];
    for (body, want) in bad {
        let (status, reply) = send(&router, "/v1/chat/completions", Some(&body)).await;
        assert_eq!(status, want, "{body}: {reply}");
        assert!(reply["error"]["message"].is_string(), "{body}: {reply}");
    }
    let (status, again) = send(&router, "/v1/chat/completions", Some(&chat(json!({})))).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(
        again["choices"][0]["message"]["content"],
        alone.text.as_str()
    );
}
