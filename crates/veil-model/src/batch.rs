//! Continuous batching: several sequences decode together, one batched step per token, and
//! sequences join and leave the batch as they start and finish.
//!
//! On a CPU the win is reading each weight matrix once per step for every sequence rather than
//! once per sequence; the answers stay exactly those of generating each request alone.

use std::num::NonZeroUsize;
use std::time::Instant;

use crate::error::{ModelError, Result};
use crate::generate::{Answer, Completion, GenerationParams};
use crate::local::{LocalModel, LocalSession, PrefixCache};
use crate::TokenStep;

/// One request to [`generate_batch`].
#[derive(Debug, Clone)]
pub struct BatchRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// What to generate.
    pub params: GenerationParams,
}

/// A sequence in the batch.
struct Live<'a> {
    index: usize,
    session: LocalSession<'a>,
    answer: Answer<'a>,
    next: u32,
    started: Instant,
}

/// Answers `requests` with up to `max_batch` sequences decoding together. A waiting request
/// joins as soon as a sequence leaves: its prompt runs on its own (in chunks of
/// `prefill_chunk` tokens if given, from the longest prefix `prefixes` holds if given, which
/// then keeps the prompt), then it decodes with the batch. Answers come back in the order of
/// `requests`.
pub fn generate_batch<'a>(
    model: &'a LocalModel,
    requests: &'a [BatchRequest],
    max_batch: NonZeroUsize,
    prefill_chunk: Option<NonZeroUsize>,
    mut prefixes: Option<&mut PrefixCache>,
) -> Vec<Result<Completion>> {
    // Every request arrives now: its prefill time counts from here, waiting included.
    let arrived = Instant::now();
    let mut results: Vec<Option<Result<Completion>>> = requests.iter().map(|_| None).collect();
    let mut waiting = requests.iter().enumerate();
    let mut live: Vec<Live<'a>> = Vec::new();
    loop {
        while live.len() < max_batch.get() {
            let Some((index, request)) = waiting.next() else {
                break;
            };
            match join(
                model,
                index,
                request,
                arrived,
                prefill_chunk,
                prefixes.as_deref_mut(),
            ) {
                Ok(Joined::Live(sequence)) => live.push(*sequence),
                Ok(Joined::Done(completion)) => results[index] = Some(Ok(completion)),
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        if live.is_empty() {
            break;
        }
        let tokens: Vec<u32> = live.iter().map(|l| l.next).collect();
        let mut sessions: Vec<&mut LocalSession<'a>> =
            live.iter_mut().map(|l| &mut l.session).collect();
        let logits = match model.step_batch(&mut sessions, &tokens) {
            Ok(logits) => logits,
            Err(e) => {
                for l in live.drain(..) {
                    results[l.index] = Some(Err(ModelError::Batch(e.to_string())));
                }
                continue;
            }
        };
        let mut still = Vec::with_capacity(live.len());
        for (mut l, logits) in live.into_iter().zip(logits) {
            match l.answer.sample(&logits, &mut |_| {}) {
                Ok(Some(next)) => {
                    l.next = next;
                    still.push(l);
                }
                Ok(None) => results[l.index] = Some(Ok(l.answer.finish(l.started, &mut |_| {}))),
                Err(e) => results[l.index] = Some(Err(e)),
            }
        }
        live = still;
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(ModelError::Batch("the request was never run".into()))))
        .collect()
}

/// What joining the batch gave: a sequence to decode, or an answer already complete.
enum Joined<'a> {
    Live(Box<Live<'a>>),
    Done(Completion),
}

/// Runs a request's prompt and samples its first token.
fn join<'a>(
    model: &'a LocalModel,
    index: usize,
    request: &'a BatchRequest,
    started: Instant,
    prefill_chunk: Option<NonZeroUsize>,
    prefixes: Option<&mut PrefixCache>,
) -> Result<Joined<'a>> {
    let mut answer = Answer::new(
        &model.tokenizer,
        &request.prompt,
        model.config.context_length,
        &request.params,
    )?;
    answer.start_clock(started);
    let mut prefixes = prefixes;
    let mut session = match prefixes.as_deref_mut() {
        Some(cache) if !request.prompt.is_empty() => model.session_from(cache, &request.prompt)?,
        _ => model.session(),
    };
    let rest = &request.prompt[session.position().min(request.prompt.len())..];
    let chunk = prefill_chunk.map_or(rest.len(), NonZeroUsize::get).max(1);
    let mut logits = Vec::new();
    for piece in rest.chunks(chunk) {
        logits = session.step(piece)?;
    }
    if let Some(cache) = prefixes {
        cache.insert(&request.prompt, &session)?;
    }
    Ok(match answer.sample(&logits, &mut |_| {})? {
        Some(next) => Joined::Live(Box::new(Live {
            index,
            session,
            answer,
            next,
            started,
        })),
        None => Joined::Done(answer.finish(started, &mut |_| {})),
    })
}
