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

/// A request to [`serve_batched`]: what to generate, and where its text and its answer go.
pub struct LiveRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Sampling, stop strings and the token budget: each request its own.
    pub params: GenerationParams,
    /// Told each piece of text as it is released. It must not block: the whole batch waits.
    pub on_text: Box<dyn FnMut(&str) + Send>,
    /// Set once nobody waits for the answer: the request leaves the batch at the next step.
    pub cancelled: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The prefix cache of whoever sent it: the prompt starts from the longest prefix the
    /// cache holds, and is kept there once run.
    pub prefixes: Option<std::sync::Arc<std::sync::Mutex<PrefixCache>>>,
    /// Told the answer, or why there is none, once.
    pub on_done: Box<dyn FnOnce(Result<Completion>) + Send>,
}

/// How [`serve_batched`] batches.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Requests running at once (prefilling or decoding); more wait in arrival order.
    pub max_batch: NonZeroUsize,
    /// Prompt tokens a step takes in all, beside one token of each decoding request, so a
    /// long prompt does not stall the batch.
    pub prefill_chunk: NonZeroUsize,
    /// A lower limit on the requests admitted at once, which whoever feeds the engine may
    /// change while it runs (MetaInf's choice for the live traffic); read at every step and
    /// kept within 1..=`max_batch`. Requests already running are never stopped by it.
    pub admit: Option<std::sync::Arc<std::sync::atomic::AtomicUsize>>,
}

impl BatchConfig {
    /// Requests that may run at once now.
    fn admitted(&self) -> usize {
        let max = self.max_batch.get();
        self.admit.as_ref().map_or(max, |limit| {
            limit
                .load(std::sync::atomic::Ordering::Relaxed)
                .clamp(1, max)
        })
    }
}

/// A request in the engine.
struct Running<'a> {
    request: LiveRequest,
    session: LocalSession<'a>,
    answer: Answer<'a>,
    /// Prompt tokens already run.
    fed: usize,
    /// The token to feed at the next decode step; `None` while the prompt runs.
    next: Option<u32>,
    started: Instant,
    /// Set when the request is done: its answer, or why there is none.
    outcome: Option<Result<()>>,
}

/// Serves requests from `requests` with continuous batching until the channel closes. Up to
/// `max_batch` run at once; a request joins as soon as there is room, its prompt runs in
/// pieces in the same passes as the others' decode tokens (at most `prefill_chunk` prompt
/// tokens a pass), then it decodes with the batch, one pass per token, and it leaves when its
/// answer ends or it is cancelled.
/// Each answer is exactly the one generating it alone gives: the kernels sum each row in one
/// order however many rows a step has.
pub fn serve_batched(
    model: &LocalModel,
    requests: &std::sync::mpsc::Receiver<LiveRequest>,
    config: BatchConfig,
) {
    use std::sync::atomic::Ordering;
    use std::sync::mpsc::TryRecvError;
    let mut running: Vec<Running<'_>> = Vec::new();
    loop {
        // Join: wait for work when idle, else take what has arrived, in order.
        while running.len() < config.admitted() {
            let request = if running.is_empty() {
                match requests.recv() {
                    Ok(r) => r,
                    Err(_) => return,
                }
            } else {
                match requests.try_recv() {
                    Ok(r) => r,
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            };
            let answer = Answer::new(
                &model.tokenizer,
                &request.prompt,
                model.config.context_length,
                &request.params,
            );
            let session = match &request.prefixes {
                Some(cache) => match cache.lock() {
                    Ok(mut cache) => model.session_from(&mut cache, &request.prompt),
                    Err(_) => Ok(model.session()),
                },
                None => Ok(model.session()),
            };
            match answer.and_then(|a| session.map(|s| (a, s))) {
                Ok((mut answer, session)) => {
                    let started = Instant::now();
                    answer.start_clock(started);
                    running.push(Running {
                        request,
                        fed: session.position(),
                        session,
                        answer,
                        next: None,
                        started,
                        outcome: None,
                    });
                }
                Err(e) => (request.on_done)(Err(e)),
            }
        }
        for r in &mut running {
            if r.request.cancelled.load(Ordering::Relaxed) {
                r.outcome = Some(Err(ModelError::Cancelled));
            }
        }
        // One pass over the weights for the whole batch: a token of every request that is
        // decoding, and pieces of the prompts still running, oldest first, up to
        // `prefill_chunk` prompt tokens in all.
        let mut budget = config.prefill_chunk.get();
        let mut stepping: Vec<&mut Running<'_>> = Vec::new();
        let mut pieces: Vec<std::ops::Range<usize>> = Vec::new();
        for r in running.iter_mut().filter(|r| r.outcome.is_none()) {
            if r.next.is_some() {
                pieces.push(0..1);
                stepping.push(r);
            } else if budget > 0 {
                let end = (r.fed + budget).min(r.request.prompt.len());
                budget -= end - r.fed;
                pieces.push(r.fed..end);
                stepping.push(r);
            }
        }
        if !stepping.is_empty() {
            // Copied out (a few hundred ids at most), so the sessions can be borrowed mutably.
            let owned: Vec<Vec<u32>> = stepping
                .iter()
                .zip(&pieces)
                .map(|(r, piece)| match r.next {
                    Some(next) => vec![next],
                    None => r.request.prompt[piece.clone()].to_vec(),
                })
                .collect();
            let tokens: Vec<&[u32]> = owned.iter().map(Vec::as_slice).collect();
            let mut fed = Vec::with_capacity(stepping.len());
            let mut sessions: Vec<&mut LocalSession<'_>> = Vec::with_capacity(stepping.len());
            for (r, piece) in stepping.iter_mut().zip(&pieces) {
                fed.push((r.next.is_none(), piece.end, r.request.prompt.len()));
                sessions.push(&mut r.session);
            }
            let stepped = model.step_pieces(&mut sessions, &tokens);
            drop(sessions);
            match stepped {
                Ok(logits) => {
                    for ((r, logits), (prefilling, end, prompt)) in
                        stepping.into_iter().zip(logits).zip(fed)
                    {
                        if prefilling {
                            r.fed = end;
                            if end < prompt {
                                continue;
                            }
                            r.keep_prompt();
                        }
                        r.take(&logits);
                    }
                }
                Err(e) => {
                    for r in stepping {
                        r.outcome = Some(Err(ModelError::Batch(e.to_string())));
                    }
                }
            }
        }
        // Leave: answers and failures go to their requests.
        let (done, still): (Vec<_>, Vec<_>) =
            running.into_iter().partition(|r| r.outcome.is_some());
        running = still;
        for mut r in done {
            let result = match r.outcome.take() {
                Some(Err(e)) => Err(e),
                _ => Ok(r.answer.finish(r.started, &mut *r.request.on_text)),
            };
            (r.request.on_done)(result);
        }
    }
}

impl Running<'_> {
    /// Keeps the prompt's keys and values in the sender's prefix cache, if it has one.
    fn keep_prompt(&self) {
        let Some(cache) = &self.request.prefixes else {
            return;
        };
        if let Ok(mut cache) = cache.lock() {
            if let Err(e) = cache.insert(&self.request.prompt, &self.session) {
                tracing::warn!("prefix cache: {e}");
            }
        }
    }

    /// Samples the next token from `logits`: the request goes on, or is done.
    fn take(&mut self, logits: &[f32]) {
        match self.answer.sample(logits, &mut *self.request.on_text) {
            Ok(Some(next)) => self.next = Some(next),
            Ok(None) => self.outcome = Some(Ok(())),
            Err(e) => self.outcome = Some(Err(e)),
        }
    }
}
