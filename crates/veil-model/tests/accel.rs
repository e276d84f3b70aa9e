//! The exact acceleration methods on the real default model: chunked prefill, prefix caching,
//! prompt-lookup speculative decoding and continuous batching each give the plain path's
//! tokens (greedy, and seeded sampling where the method applies to it).

use std::num::NonZeroUsize;

use veil_model::prompts::SAMPLE_PROMPTS;
use veil_model::{
    generate, generate_accelerated, generate_batch, serve_batched, Accel, BatchConfig,
    BatchRequest, ChatMessage, Completion, DraftStats, Drafting, GenerationParams, LiveRequest,
    LocalModel, ModelStore, PrefixCache, SamplingParams, WeightFormat, SMOLLM2_135M,
};

/// Tokens generated per answer.
const TOKENS: usize = 40;

fn model() -> LocalModel {
    let path = ModelStore::from_env()
        .ensure(&SMOLLM2_135M, &mut |_| {})
        .expect("the default model can be fetched");
    LocalModel::load(&path, WeightFormat::AsStored, &[]).expect("model loads")
}

fn prompt(model: &LocalModel, question: &str) -> Vec<u32> {
    model.chat_prompt(&[ChatMessage::user(question)]).unwrap()
}

fn greedy() -> GenerationParams {
    GenerationParams {
        max_tokens: TOKENS,
        ..GenerationParams::default()
    }
}

fn seeded(seed: u64) -> GenerationParams {
    GenerationParams {
        max_tokens: TOKENS,
        sampling: SamplingParams {
            temperature: 0.8,
            top_p: Some(0.95),
            seed,
            ..SamplingParams::default()
        },
        ..GenerationParams::default()
    }
}

/// The plain path: the whole prompt in one pass, then one token per step.
fn plain(model: &LocalModel, prompt: &[u32], params: &GenerationParams) -> Vec<u32> {
    let context = model.config.context_length;
    generate(
        &mut model.session(),
        &model.tokenizer,
        prompt,
        context,
        params,
        &mut |_| {},
    )
    .unwrap()
    .tokens
}

/// `generate_accelerated` on `session` of `model`.
fn accelerated(
    model: &LocalModel,
    session: &mut dyn Drafting,
    prompt: &[u32],
    params: &GenerationParams,
    accel: &Accel,
) -> (Completion, DraftStats) {
    let context = model.config.context_length;
    generate_accelerated(
        session,
        &model.tokenizer,
        prompt,
        context,
        params,
        accel,
        &mut |_| {},
    )
    .unwrap()
}

fn nz(n: usize) -> Option<NonZeroUsize> {
    NonZeroUsize::new(n)
}

#[test]
fn chunked_prefill_gives_the_plain_tokens() {
    let model = model();
    for (question, chunk) in SAMPLE_PROMPTS.iter().take(6).zip([1, 5, 8, 13, 16, 64]) {
        let prompt = prompt(&model, question);
        let want = plain(&model, &prompt, &greedy());
        let accel = Accel {
            prefill_chunk: nz(chunk),
            ..Accel::default()
        };
        let (got, _) = accelerated(&model, &mut model.session(), &prompt, &greedy(), &accel);
        assert_eq!(got.tokens, want, "{question:?} in chunks of {chunk}");
    }
}

#[test]
fn a_cached_prefix_is_reused_and_gives_the_plain_tokens() {
    let model = model();
    let mut prefixes = PrefixCache::new(256 << 20);
    let system = ChatMessage::system(
        "You are a careful assistant for a hiking club. Answer briefly and mention safety.",
    );
    let mut reused_any = false;
    for (i, question) in SAMPLE_PROMPTS.iter().take(5).enumerate() {
        let prompt = model
            .chat_prompt(&[system.clone(), ChatMessage::user(*question)])
            .unwrap();
        let params = if i % 2 == 0 {
            greedy()
        } else {
            seeded(i as u64)
        };
        let want = plain(&model, &prompt, &params);
        let mut session = model.session_from(&mut prefixes, &prompt).unwrap();
        let (got, stats) = accelerated(&model, &mut session, &prompt, &params, &Accel::default());
        // Kept without a copy (the session is done) or copied (as for one still decoding).
        if i % 2 == 0 {
            prefixes.keep(&prompt, session).unwrap();
        } else {
            prefixes.insert(&prompt, &session).unwrap();
        }
        assert_eq!(got.tokens, want, "{question:?}");
        if i > 0 {
            assert!(
                stats.reused > 10,
                "the system prompt was not reused: {stats:?}"
            );
            reused_any = true;
        } else {
            assert_eq!(stats.reused, 0);
        }
    }
    assert!(reused_any);
    assert!(!prefixes.is_empty() && prefixes.bytes() > 0);
    // The same prompt again reuses all but its last token, and still answers the same.
    let prompt = model
        .chat_prompt(&[system, ChatMessage::user(SAMPLE_PROMPTS[0])])
        .unwrap();
    let mut session = model.session_from(&mut prefixes, &prompt).unwrap();
    let (got, stats) = accelerated(&model, &mut session, &prompt, &greedy(), &Accel::default());
    assert_eq!(stats.reused, prompt.len() - 1);
    assert_eq!(got.tokens, plain(&model, &prompt, &greedy()));
}

#[test]
fn a_prefix_cache_keeps_within_its_memory_bound() {
    let model = model();
    let first = prompt(&model, SAMPLE_PROMPTS[0]);
    let mut session = model.session();
    veil_model::TokenStep::step(&mut session, &first).unwrap();
    let mut one = PrefixCache::new(usize::MAX);
    one.insert(&first, &session).unwrap();
    let size = one.bytes();
    assert!(size > 0);
    // Room for one prompt: the second evicts the first; a bound below one prompt keeps none.
    let mut tight = PrefixCache::new(size + size / 2);
    for question in &SAMPLE_PROMPTS[..3] {
        let p = prompt(&model, question);
        let mut s = model.session();
        veil_model::TokenStep::step(&mut s, &p).unwrap();
        tight.insert(&p, &s).unwrap();
        assert!(tight.bytes() <= size + size / 2);
        assert_eq!(tight.len(), 1);
    }
    let mut none = PrefixCache::new(size / 2);
    none.insert(&first, &session).unwrap();
    assert!(none.is_empty());
    // A session shorter than the prompt it claims is refused.
    assert!(none
        .insert(&[first.clone(), vec![1]].concat(), &session)
        .is_err());
}

#[test]
fn prompt_lookup_drafts_are_confirmed_and_give_the_plain_tokens() {
    let model = model();
    let questions = [
        "Repeat this sentence exactly: the quick brown fox jumps over the lazy dog near the river bank.",
        "Copy the list: apples, pears, plums, cherries, grapes, melons.",
        SAMPLE_PROMPTS[4],
        SAMPLE_PROMPTS[15],
        SAMPLE_PROMPTS[0],
    ];
    let mut accepted = 0;
    for question in questions {
        let prompt = prompt(&model, question);
        for drafts in [1, 4, 8] {
            let want = plain(&model, &prompt, &greedy());
            let accel = Accel {
                lookup_drafts: nz(drafts),
                ..Accel::default()
            };
            let (got, stats) =
                accelerated(&model, &mut model.session(), &prompt, &greedy(), &accel);
            assert_eq!(got.tokens, want, "{question:?} with {drafts} drafts");
            assert!(stats.accepted <= stats.drafted);
            accepted += stats.accepted;
        }
    }
    assert!(accepted > 0, "no draft was ever confirmed");
}

#[test]
fn sampled_requests_decode_plainly_under_prompt_lookup() {
    let model = model();
    let prompt = prompt(&model, "Repeat exactly: one two three four five six seven.");
    let accel = Accel {
        lookup_drafts: nz(4),
        ..Accel::default()
    };
    let (got, stats) = accelerated(&model, &mut model.session(), &prompt, &seeded(7), &accel);
    assert_eq!(stats.drafted, 0);
    assert_eq!(got.tokens, plain(&model, &prompt, &seeded(7)));
}

#[test]
fn continuous_batching_gives_each_request_its_plain_tokens() {
    let model = model();
    // Different prompt lengths, budgets and sampling, more requests than batch slots: sequences
    // leave at different steps and waiting ones join.
    let requests: Vec<BatchRequest> = SAMPLE_PROMPTS
        .iter()
        .take(7)
        .enumerate()
        .map(|(i, q)| BatchRequest {
            prompt: prompt(&model, q),
            params: GenerationParams {
                max_tokens: 8 + 5 * i,
                ..if i % 3 == 1 {
                    seeded(i as u64)
                } else {
                    greedy()
                }
            },
        })
        .collect();
    for (max_batch, chunk) in [(3, None), (7, nz(9))] {
        let mut prefixes = PrefixCache::new(64 << 20);
        let answers = generate_batch(
            &model,
            &requests,
            nz(max_batch).unwrap(),
            chunk,
            (max_batch == 3).then_some(&mut prefixes),
        );
        assert_eq!(answers.len(), requests.len());
        for (request, answer) in requests.iter().zip(answers) {
            let answer = answer.unwrap();
            assert_eq!(
                answer.tokens,
                plain(&model, &request.prompt, &request.params),
                "batch of {max_batch}"
            );
        }
    }
    // A bad request fails alone; the others are answered.
    let mut mixed = requests[..2].to_vec();
    mixed.insert(
        1,
        BatchRequest {
            prompt: Vec::new(),
            params: greedy(),
        },
    );
    let answers = generate_batch(&model, &mixed, nz(2).unwrap(), None, None);
    assert!(answers[0].is_ok() && answers[1].is_err() && answers[2].is_ok());
}

/// A model step that sleeps before answering with the real model's logits, so each step takes
/// at least `PAUSE` (a lower bound that `sleep` guarantees, not a speed).
struct Paced<'a>(veil_model::LocalSession<'a>);

const PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

impl veil_model::TokenStep for Paced<'_> {
    fn step(&mut self, tokens: &[u32]) -> veil_model::Result<Vec<f32>> {
        std::thread::sleep(PAUSE);
        self.0.step(tokens)
    }
}

#[test]
fn the_prefill_and_decode_clocks_split_an_answer_where_its_first_token_appears() {
    // The clock once started only when the answer finished: the prefill took the whole time
    // and the decode none, and speeds read 10^8 tokens a second.
    let model = model();
    let prompt = prompt(&model, SAMPLE_PROMPTS[0]);
    let params = GenerationParams {
        max_tokens: 6,
        ..GenerationParams::default()
    };
    let mut session = Paced(model.session());
    let c = generate(
        &mut session,
        &model.tokenizer,
        &prompt,
        model.config.context_length,
        &params,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(c.tokens.len(), 6);
    // Five more steps after the first token, each at least PAUSE.
    assert!(c.decode_time >= 5 * PAUSE, "{c:?}");
    assert!(c.prefill_time >= PAUSE, "{c:?}");
}

#[test]
fn the_live_batching_engine_gives_each_request_its_plain_answer_and_drops_the_cancelled() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc, Mutex};
    let model = model();
    // Requests with their own sampling, stop strings and budgets; one with bad sampling; one
    // whose client leaves at its first text. A batch of 3 with prompts run 5 tokens at a time.
    let mut params: Vec<GenerationParams> = (0..6)
        .map(|i| GenerationParams {
            max_tokens: 6 + 4 * i,
            ..if i % 2 == 1 {
                seeded(i as u64)
            } else {
                greedy()
            }
        })
        .collect();
    params[2].stop = vec![".".into()];
    params[3].sampling.temperature = -1.0;
    let prompts: Vec<Vec<u32>> = SAMPLE_PROMPTS[..6]
        .iter()
        .map(|q| prompt(&model, q))
        .collect();
    let (tx, rx) = mpsc::channel();
    type Answered = Option<veil_model::Result<(Vec<u32>, String)>>;
    let results: Arc<Mutex<Vec<Answered>>> = Arc::new(Mutex::new((0..6).map(|_| None).collect()));
    let texts = Arc::new(Mutex::new(vec![String::new(); 6]));
    let leaving = Arc::new(AtomicBool::new(false));
    // One prefix cache for all: the chat template's common start is run once, then reused.
    let cache = Arc::new(Mutex::new(PrefixCache::new(64 << 20)));
    for (i, (prompt, params)) in prompts.iter().zip(&params).enumerate() {
        let (results, texts) = (Arc::clone(&results), Arc::clone(&texts));
        let cancelled = if i == 4 {
            Arc::clone(&leaving)
        } else {
            Arc::new(AtomicBool::new(false))
        };
        let leave = Arc::clone(&cancelled);
        tx.send(LiveRequest {
            prompt: prompt.clone(),
            params: params.clone(),
            on_text: Box::new(move |t| {
                texts.lock().unwrap()[i].push_str(t);
                if i == 4 {
                    leave.store(true, Ordering::Relaxed);
                }
            }),
            cancelled,
            prefixes: Some(Arc::clone(&cache)),
            on_done: Box::new(move |r| {
                results.lock().unwrap()[i] = Some(r.map(|c| (c.tokens, c.text)));
            }),
        })
        .unwrap();
    }
    drop(tx);
    let config = BatchConfig {
        max_batch: nz(3).unwrap(),
        prefill_chunk: nz(5).unwrap(),
        admit: None,
    };
    serve_batched(&model, &rx, config);
    let cache = cache.lock().unwrap();
    assert_eq!(
        cache.shared_len(&prompts[0]),
        prompts[0].len() - 1,
        "the prompts were kept"
    );
    let results = results.lock().unwrap();
    for (i, result) in results.iter().enumerate() {
        let result = result.as_ref().expect("every request is answered");
        match i {
            3 => assert!(result.is_err(), "bad sampling fails alone"),
            4 => assert!(
                matches!(result, Err(veil_model::ModelError::Cancelled)),
                "{result:?}"
            ),
            _ => {
                let (tokens, text) = result.as_ref().unwrap();
                assert_eq!(
                    *tokens,
                    plain(&model, &prompts[i], &params[i]),
                    "request {i}"
                );
                assert_eq!(
                    *text,
                    texts.lock().unwrap()[i],
                    "request {i} streamed its text"
                );
            }
        }
    }
}

/// An engine told to admit one request at a time (MetaInf's choice under `--batch auto`) runs
/// its requests one after another in arrival order, each giving its plain answer; told to
/// admit its slots again, it batches the next ones.
#[test]
fn the_engines_admission_limit_runs_requests_one_at_a_time_until_it_opens() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc, Mutex};
    let model = model();
    let prompts: Vec<Vec<u32>> = SAMPLE_PROMPTS[..3]
        .iter()
        .map(|q| prompt(&model, q))
        .collect();
    let params = GenerationParams {
        max_tokens: 6,
        ..greedy()
    };
    // Events in the order the engine made them: (request, "text" or "done").
    let events: Arc<Mutex<Vec<(usize, &'static str)>>> = Arc::default();
    let admit = Arc::new(std::sync::atomic::AtomicUsize::new(1));
    let run = |admit_now: usize| {
        admit.store(admit_now, Ordering::Relaxed);
        events.lock().unwrap().clear();
        let (tx, rx) = mpsc::channel();
        for (i, prompt) in prompts.iter().enumerate() {
            let (on_text, on_done) = (Arc::clone(&events), Arc::clone(&events));
            tx.send(LiveRequest {
                prompt: prompt.clone(),
                params: params.clone(),
                on_text: Box::new(move |_| on_text.lock().unwrap().push((i, "text"))),
                cancelled: Arc::new(AtomicBool::new(false)),
                prefixes: None,
                on_done: Box::new(move |r| {
                    assert!(r.is_ok(), "request {i}: {r:?}");
                    on_done.lock().unwrap().push((i, "done"));
                }),
            })
            .unwrap();
        }
        drop(tx);
        let config = BatchConfig {
            max_batch: nz(3).unwrap(),
            prefill_chunk: nz(64).unwrap(),
            admit: Some(Arc::clone(&admit)),
        };
        serve_batched(&model, &rx, config);
        events.lock().unwrap().clone()
    };
    // One at a time: every event of request 0, then of 1, then of 2.
    let alone = run(1);
    let order: Vec<usize> = alone.iter().map(|(i, _)| *i).collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "one at a time: {alone:?}");
    assert_eq!(alone.iter().filter(|(_, e)| *e == "done").count(), 3);
    // Open: the three run together, so their texts interleave.
    let together = run(3);
    let order: Vec<usize> = together.iter().map(|(i, _)| *i).collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_ne!(order, sorted, "batched: {together:?}");
}
