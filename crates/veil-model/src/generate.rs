//! The generation loop: prefill, then one token at a time, streaming text as it firms up.
//!
//! It runs over anything that turns new tokens into next-token logits ([`TokenStep`]): a model in
//! this process, a chain of local shards, or (in `veil-net`) a chain of nodes.

use std::time::{Duration, Instant};

use crate::error::{ModelError, Result};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::GgufTokenizer;

/// Feeds new tokens to a model session and returns the logits after the last one.
pub trait TokenStep {
    /// Appends `tokens` to the session and returns the next-token logits (`vocab_size` long).
    fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>>;
}

impl<T: TokenStep + ?Sized> TokenStep for &mut T {
    fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        (**self).step(tokens)
    }
}

impl<T: TokenStep + ?Sized> TokenStep for Box<T> {
    fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        (**self).step(tokens)
    }
}

/// What to generate and when to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// The most tokens to generate.
    pub max_tokens: usize,
    /// How to pick each token.
    pub sampling: SamplingParams,
    /// Strings that end the answer; they are not part of the returned text.
    pub stop: Vec<String>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: SamplingParams::greedy(),
            stop: Vec::new(),
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced its end-of-sequence token.
    Eos,
    /// A stop string appeared.
    Stop,
    /// `max_tokens` (or the context window) ran out.
    Length,
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FinishReason::Eos => "end of sequence",
            FinishReason::Stop => "stop string",
            FinishReason::Length => "length limit",
        })
    }
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The answer, without the stop string or end token.
    pub text: String,
    /// Every sampled token, including a final end-of-sequence token if there was one.
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub finish: FinishReason,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Time spent on the prompt (prefill and first token).
    pub prefill_time: Duration,
    /// Time spent on the tokens after the first.
    pub decode_time: Duration,
}

/// Runs generation from `prompt` over `model`, calling `on_text` with each new piece of text.
pub fn generate(
    model: &mut dyn TokenStep,
    tokenizer: &GgufTokenizer,
    prompt: &[u32],
    context_length: usize,
    params: &GenerationParams,
    on_text: &mut dyn FnMut(&str),
) -> Result<Completion> {
    generate_in_order(
        model,
        &PlainOrder,
        tokenizer,
        prompt,
        context_length,
        params,
        on_text,
    )
}

/// The order of token ids a model works in, when it is not the tokenizer's: an encrypted
/// model's vocabulary is a secret permutation of the plaintext one.
pub trait TokenOrder {
    /// The model's id for plaintext token `id`.
    fn to_model(&self, id: u32) -> u32;
    /// The plaintext token for the model's id `id`.
    fn to_plain(&self, id: u32) -> u32;
}

/// The tokenizer's own order: nothing moves.
pub struct PlainOrder;

impl TokenOrder for PlainOrder {
    fn to_model(&self, id: u32) -> u32 {
        id
    }

    fn to_plain(&self, id: u32) -> u32 {
        id
    }
}

/// [`generate`] over a model that works in another token order. The sampler draws from the
/// model's logits in the model's order, as a judge recomputing those logits will, and each
/// draw is turned into plaintext for the text; the prompt is given and the answer's tokens
/// returned in plaintext.
pub fn generate_in_order(
    model: &mut dyn TokenStep,
    order: &dyn TokenOrder,
    tokenizer: &GgufTokenizer,
    prompt: &[u32],
    context_length: usize,
    params: &GenerationParams,
    on_text: &mut dyn FnMut(&str),
) -> Result<Completion> {
    let mut answer = Answer::new(tokenizer, prompt, context_length, params)?;
    let started = Instant::now();
    answer.start_clock(started);
    let model_prompt: Vec<u32> = prompt.iter().map(|&t| order.to_model(t)).collect();
    let mut logits = model.step(&model_prompt)?;
    while let Some(drawn) = answer.draw(&logits)? {
        match answer.push(order.to_plain(drawn), on_text)? {
            Some(_) => logits = model.step(&[drawn])?,
            None => break,
        }
    }
    Ok(answer.finish(started, on_text))
}

/// One answer being generated: the sampler, the tokens so far, the text released so far, and
/// why it ended. The plain loop, the accelerated loop and continuous batching all drive it, so
/// they stop, stream and count alike.
pub(crate) struct Answer<'a> {
    sampler: Sampler,
    text: TextStream<'a>,
    tokens: Vec<u32>,
    budget: usize,
    /// The tokens that end generation (EOS, and end-of-turn tokens such as Gemma's).
    end: Vec<u32>,
    finish: Option<FinishReason>,
    prompt_tokens: usize,
    prefill_time: Option<Duration>,
    started: Option<Instant>,
}

impl<'a> Answer<'a> {
    /// Checks the prompt fits the context and sets the budget of new tokens.
    pub(crate) fn new(
        tokenizer: &'a GgufTokenizer,
        prompt: &[u32],
        context_length: usize,
        params: &GenerationParams,
    ) -> Result<Self> {
        if prompt.is_empty() {
            return Err(ModelError::EmptyPrompt);
        }
        if prompt.len() >= context_length {
            return Err(ModelError::ContextOverflow {
                needed: prompt.len() + 1,
                context: context_length,
            });
        }
        Ok(Self {
            sampler: Sampler::new(params.sampling.clone())?,
            text: TextStream::new(tokenizer, &params.stop),
            tokens: Vec::new(),
            budget: params.max_tokens.min(context_length - prompt.len()),
            end: tokenizer.eog_ids().to_vec(),
            finish: if params.max_tokens == 0 {
                Some(FinishReason::Length)
            } else {
                None
            },
            prompt_tokens: prompt.len(),
            prefill_time: None,
            started: None,
        })
    }

    /// Samples the next token from `logits` and records it; returns it when the answer goes on
    /// (the caller feeds it to the model), `None` when the answer is complete.
    pub(crate) fn sample(
        &mut self,
        logits: &[f32],
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Option<u32>> {
        match self.draw(logits)? {
            Some(next) => self.push(next, on_text),
            None => Ok(None),
        }
    }

    /// Draws the next token from `logits` without recording it; `None` when the answer is
    /// already complete.
    pub(crate) fn draw(&mut self, logits: &[f32]) -> Result<Option<u32>> {
        if self.finish.is_some() {
            return Ok(None);
        }
        self.sampler.sample(logits).map(Some)
    }

    /// Records `token` as the next one; returns it when the answer goes on.
    pub(crate) fn push(
        &mut self,
        token: u32,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Option<u32>> {
        if self.finish.is_some() {
            return Ok(None);
        }
        self.tokens.push(token);
        if self.tokens.len() == 1 {
            self.prefill_time = self.started.map(|s| s.elapsed());
        }
        if self.end.contains(&token) {
            self.finish = Some(FinishReason::Eos);
        } else if self.text.push(token, on_text)? {
            self.finish = Some(FinishReason::Stop);
        } else if self.tokens.len() >= self.budget {
            self.finish = Some(FinishReason::Length);
        }
        Ok(self.finish.is_none().then_some(token))
    }

    /// New tokens the answer may still take.
    pub(crate) fn remaining(&self) -> usize {
        self.budget.saturating_sub(self.tokens.len())
    }

    /// Whether sampling is greedy (what speculative decoding can check drafts against).
    pub(crate) fn is_greedy(&self) -> bool {
        self.sampler.is_greedy()
    }

    /// Notes when work on this answer began (for its prefill time).
    pub(crate) fn start_clock(&mut self, at: Instant) {
        self.started.get_or_insert(at);
    }

    /// The finished answer; `started` is when its prompt began to run.
    pub(crate) fn finish(mut self, started: Instant, on_text: &mut dyn FnMut(&str)) -> Completion {
        let started = *self.started.get_or_insert(started);
        let finish = self.finish.unwrap_or(FinishReason::Length);
        let prefill_time = self.prefill_time.unwrap_or_else(|| started.elapsed());
        let decode_time = started.elapsed().saturating_sub(prefill_time);
        Completion {
            text: self.text.finish(finish != FinishReason::Stop, on_text),
            tokens: self.tokens,
            finish,
            prompt_tokens: self.prompt_tokens,
            prefill_time,
            decode_time,
        }
    }
}

/// Turns a stream of tokens into a stream of text.
///
/// A token can end in the middle of a UTF-8 character, and the text may be heading into a stop
/// string, so text is released only once it can no longer change or be cut.
pub struct TextStream<'a> {
    tokenizer: &'a GgufTokenizer,
    stop: Vec<String>,
    tokens: Vec<u32>,
    text: String,
    released: usize,
}

impl<'a> TextStream<'a> {
    /// A stream that ends at any of `stop`.
    pub fn new(tokenizer: &'a GgufTokenizer, stop: &[String]) -> Self {
        Self {
            tokenizer,
            stop: stop.to_vec(),
            tokens: Vec::new(),
            text: String::new(),
            released: 0,
        }
    }

    /// Adds a token; returns true when a stop string has appeared (the text before it has then
    /// been released and the stream is done).
    pub fn push(&mut self, token: u32, on_text: &mut dyn FnMut(&str)) -> Result<bool> {
        self.tokens.push(token);
        let decoded = self.tokenizer.decode(&self.tokens, true)?;
        if decoded.ends_with('\u{FFFD}') {
            return Ok(false); // the rest of the character is in the next token
        }
        self.text = decoded;
        let search_from = self
            .released
            .saturating_sub(self.stop.iter().map(String::len).max().unwrap_or(0));
        let search_from = floor_char_boundary(&self.text, search_from);
        let hit = self
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text[search_from..].find(s.as_str()))
            .min();
        if let Some(at) = hit {
            self.text.truncate(search_from + at);
            self.release(self.text.len(), on_text);
            return Ok(true);
        }
        let held = self.held_back();
        self.release(self.text.len() - held, on_text);
        Ok(false)
    }

    /// Releases what is left (unless a stop string cut it) and returns the whole text.
    pub fn finish(mut self, flush: bool, on_text: &mut dyn FnMut(&str)) -> String {
        if flush {
            if let Ok(all) = self.tokenizer.decode(&self.tokens, true) {
                if all.len() >= self.text.len() {
                    self.text = all;
                }
            }
            self.release(self.text.len(), on_text);
        }
        self.text
    }

    /// Length of the longest tail of the text that could still grow into a stop string.
    fn held_back(&self) -> usize {
        self.stop
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&n| s.is_char_boundary(n))
                    .map(move |n| &s[..n])
            })
            .filter(|prefix| prefix.len() <= self.text.len() - self.released)
            .filter(|prefix| self.text.ends_with(*prefix))
            .map(str::len)
            .max()
            .unwrap_or(0)
    }

    fn release(&mut self, upto: usize, on_text: &mut dyn FnMut(&str)) {
        let upto = floor_char_boundary(&self.text, upto);
        if upto > self.released {
            on_text(&self.text[self.released..upto]);
            self.released = upto;
        }
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
