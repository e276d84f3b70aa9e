//! Acceleration methods that keep the answer exact: chunked prefill, prefix caching and
//! speculative decoding by prompt lookup. (Continuous batching is in `batch`; the weight
//! format and thread count are chosen when the model loads.)
//!
//! Each gives the plain path's greedy tokens: the kernels sum each row in one order however
//! the rows are grouped, and attention over cached positions is attention over the same keys.

use std::num::NonZeroUsize;
use std::time::Instant;

use crate::error::{ModelError, Result};
use crate::generate::{Answer, Completion, GenerationParams, TokenStep};
use crate::tokenizer::GgufTokenizer;

/// The runtime knobs of one generation (beside the weight format and threads, fixed at load).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accel {
    /// Run the prompt in chunks of this many tokens rather than in one pass.
    pub prefill_chunk: Option<NonZeroUsize>,
    /// Draft up to this many tokens by prompt lookup and check them in one pass (greedy
    /// requests only; others decode plainly).
    pub lookup_drafts: Option<NonZeroUsize>,
}

/// How speculative decoding fared in one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DraftStats {
    /// Prompt tokens a cached prefix saved.
    pub reused: usize,
    /// Tokens drafted by prompt lookup.
    pub drafted: usize,
    /// Drafted tokens the model confirmed (each saved one decode step).
    pub accepted: usize,
}

/// A session that can check several drafted tokens in one pass and take back the ones the
/// model does not confirm: what speculative decoding needs beyond [`TokenStep`].
pub trait Drafting: TokenStep {
    /// Appends `tokens` and returns the next-token logits after each of them.
    fn step_each(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>>;
    /// Drops the last `positions` positions.
    fn rewind(&mut self, positions: usize) -> Result<()>;
    /// Positions the session holds (a reused prompt prefix counts).
    fn position(&self) -> usize;
}

/// The n-grams this lookup matches, longest first. A single repeated token predicts too
/// little: drafting from it cost more checking passes than it saved on text that does not
/// repeat (measured with `veil meta collect`).
const LOOKUP_NGRAM: std::ops::RangeInclusive<usize> = 2..=3;

/// Drafts up to `max` tokens that followed the latest occurrence of the sequence's last
/// two or three tokens (three first) earlier in `context`: answers often quote their prompt.
pub fn prompt_lookup(context: &[u32], max: usize) -> &[u32] {
    for n in LOOKUP_NGRAM.rev() {
        if context.len() <= n {
            continue;
        }
        let tail = &context[context.len() - n..];
        // Latest match first: it is the most likely continuation of what is being written.
        let found = (0..context.len() - n)
            .rev()
            .find(|&i| &context[i..i + n] == tail);
        if let Some(i) = found {
            let from = i + n;
            return &context[from..(from + max).min(context.len())];
        }
    }
    &[]
}

/// [`generate`](crate::generate::generate) with acceleration methods. Positions the session
/// already holds are taken to be the prompt's first tokens (a cached prefix) and are not run
/// again.
pub fn generate_accelerated(
    model: &mut dyn Drafting,
    tokenizer: &GgufTokenizer,
    prompt: &[u32],
    context_length: usize,
    params: &GenerationParams,
    accel: &Accel,
    on_text: &mut dyn FnMut(&str),
) -> Result<(Completion, DraftStats)> {
    let mut answer = Answer::new(tokenizer, prompt, context_length, params)?;
    let started = Instant::now();
    answer.start_clock(started);
    let cached = model.position();
    if cached >= prompt.len() {
        return Err(ModelError::InvalidInput(format!(
            "the session holds {cached} positions, the prompt only {}",
            prompt.len()
        )));
    }
    let mut stats = DraftStats {
        reused: cached,
        ..DraftStats::default()
    };
    let rest = &prompt[cached..];
    let chunk = accel.prefill_chunk.map_or(rest.len(), NonZeroUsize::get);
    let mut logits = Vec::new();
    for piece in rest.chunks(chunk) {
        logits = model.step(piece)?;
    }
    let drafts = accel
        .lookup_drafts
        .filter(|_| answer.is_greedy())
        .map_or(0, NonZeroUsize::get);
    // The sequence so far, where drafts are looked up.
    let mut context = prompt.to_vec();
    // How many tokens to draft next: halved after a draft the model rejects outright, doubled
    // after one it takes whole, so text that does not repeat costs little.
    let mut window = drafts;
    'decode: while let Some(next) = answer.sample(&logits, on_text)? {
        context.push(next);
        let max = window.min(answer.remaining().saturating_sub(1));
        let draft = prompt_lookup(&context, max).to_vec();
        if draft.is_empty() {
            logits = model.step(&[next])?;
            continue;
        }
        let mut fed = vec![next];
        fed.extend_from_slice(&draft);
        let each = model.step_each(&fed)?;
        stats.drafted += draft.len();
        for (i, guess) in draft.iter().enumerate() {
            // Greedy: the model's own pick at this position, checked against the draft.
            let confirmed = crate::sampling::argmax(&each[i]);
            if confirmed != *guess {
                model.rewind(draft.len() - i)?;
                logits = each[i].clone();
                if i == 0 {
                    window = (window / 2).max(1);
                }
                continue 'decode;
            }
            context.push(*guess);
            stats.accepted += 1;
            if answer.push(*guess, on_text)?.is_none() {
                break 'decode;
            }
        }
        logits = each[draft.len()].clone();
        window = (window * 2).min(drafts);
    }
    Ok((answer.finish(started, on_text), stats))
}
