//! The local backends through the `Backend` trait alone, as both `veil serve` and
//! `veil generate` call them: one request at a time and in the batching engine they give the
//! same answer as the model run directly, a forced method is named as forced, and a request
//! whose asker has gone fails as cancelled without disturbing the next.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use veil_model::{ChatMessage, GenerationParams, LocalModel, ModelError, WeightFormat};
use veil_serve::backend::{Backend, Batching, Failure, LocalBackend, Request, Route};

fn model() -> Arc<LocalModel> {
    let path = veil_model::ModelStore::from_env()
        .ensure(&veil_model::SMOLLM2_135M, &mut |_| {})
        .expect("the default model can be fetched");
    Arc::new(LocalModel::load(&path, WeightFormat::AsStored, &[]).expect("the model loads"))
}

/// Runs `prompt` on `backend`, cancelled from the start if `gone`; the answer's text as
/// streamed, and the answer.
fn ask(
    backend: &dyn Backend,
    prompt: &[u32],
    method: Option<&'static veil_meta::Method>,
    gone: bool,
) -> (String, Result<veil_serve::Answer, Failure>) {
    let params = GenerationParams {
        max_tokens: 12,
        ..Default::default()
    };
    let left = AtomicBool::new(gone);
    let cancelled = || left.load(Ordering::Relaxed);
    let request = Request {
        prompt,
        params: &params,
        method,
        prefixes: None,
        cancelled: &cancelled,
    };
    let mut streamed = String::new();
    let answer = backend.generate(&request, &mut |t| streamed.push_str(t));
    (streamed, answer)
}

#[test]
fn local_backends_answer_as_the_model_does_and_a_gone_asker_cancels_only_its_request() {
    let model = model();
    let prompt = model
        .chat_prompt(&[ChatMessage::user("Name three colours.")])
        .expect("a prompt");
    let direct = veil_model::generate(
        &mut model.session(),
        &model.tokenizer,
        &prompt,
        model.config.context_length,
        &GenerationParams {
            max_tokens: 12,
            ..Default::default()
        },
        &mut |_| {},
    )
    .expect("it generates");

    let one_at_a_time = LocalBackend::new(Arc::clone(&model), "stored".into(), None);
    let batching =
        LocalBackend::new(Arc::clone(&model), "stored".into(), None).batching(Batching::Always(3));
    let forced = veil_meta::method("lookup").expect("a catalogued method");
    for (name, backend, method) in [
        ("one at a time", &one_at_a_time, None),
        ("forced method", &one_at_a_time, Some(forced)),
        ("batching", &batching, None),
    ] {
        let (streamed, answer) = ask(backend, &prompt, method, false);
        let answer = answer.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(answer.completion.tokens, direct.tokens, "{name}");
        assert_eq!(streamed, answer.completion.text, "{name}");
        assert!(
            matches!(answer.route, Route::Local { blocks: 30 }),
            "{name}"
        );
        assert!(answer.verification.is_none(), "{name}");
        match method {
            Some(m) => assert_eq!(answer.accel, format!("{} (forced)", m.name), "{name}"),
            None if name == "batching" => {
                assert_eq!(answer.accel, "continuous batching (3 slots)")
            }
            None => assert!(
                answer.accel.contains("auto: no selector"),
                "{}",
                answer.accel
            ),
        }

        let (_, gone) = ask(backend, &prompt, None, true);
        assert!(
            matches!(gone, Err(Failure::Model(ModelError::Cancelled))),
            "{name}: a request whose asker left must fail as cancelled, got {:?}",
            gone.map(|a| a.completion.text)
        );
        let (_, again) = ask(backend, &prompt, None, false);
        assert_eq!(
            again.expect("the next request is served").completion.tokens,
            direct.tokens,
            "{name}"
        );
    }
}
