//! The tokenizer, built from the GGUF file's own metadata alone, giving the ids llama.cpp gives.
//!
//! Two kinds of GGUF tokenizer are supported, each rebuilt with the `tokenizers` crate so that no
//! merge loop is written by hand here:
//!
//! * Byte-level BPE (`tokenizer.ggml.model = "gpt2"`: SmolLM2, Llama 3, Qwen 2...). The stored
//!   vocabulary and merges feed a `BPE` model; the pre-tokenizer is the one llama.cpp picks for
//!   `tokenizer.ggml.pre` (its regexes, as `Split` pre-tokenizers, then `ByteLevel` without its own
//!   regex). candle's `Tokenizer::from_gguf` guesses the pre-tokenizer instead and gets SmolLM2's
//!   ids wrong.
//! * SentencePiece-style (`tokenizer.ggml.model = "llama"`: Gemma 3, Llama 2...), which has scores
//!   but no merges. See `spm_merges` for how a `BPE` model reproduces llama.cpp's SPM tokenizer.
//!
//! In both, control tokens (`<|im_start|>`, `<start_of_turn>`) and user-defined tokens (Gemma's
//! runs of spaces, newlines and tabs, HTML tags) become added tokens matched on the raw text
//! before anything else, as llama.cpp's special-token partition does.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

/// GGUF's `token_type` value for a normal token.
const NORMAL_TOKEN: i32 = 1;
/// GGUF's `token_type` value for the unknown token (`<unk>` in Llama 2).
const UNKNOWN_TOKEN: i32 = 2;
/// GGUF's `token_type` value for control tokens such as `<|im_start|>`.
const CONTROL_TOKEN: i32 = 3;
/// GGUF's `token_type` value for user-defined tokens (Gemma's `"\n\n"`, `"<table>"`).
const USER_DEFINED_TOKEN: i32 = 4;

/// SentencePiece's word-boundary mark, which stands for a space inside SPM tokens.
const SPM_SPACE: &str = "\u{2581}";

/// The `tokenizer.ggml.model` values this module builds.
const SUPPORTED_MODELS: &str = "\"gpt2\" (byte-level BPE) and \"llama\" (SentencePiece)";

/// Control tokens llama.cpp ends generation on, found by their text (llama-vocab.cpp keeps the
/// same list because converted files rarely name them in `tokenizer.ggml.eot_token_id`; Gemma 3's
/// has no such key). llama.cpp's list also has `</s>` and it takes tokens of any type; here only
/// control tokens count, as Gemma 3's `</s>` is the user-defined HTML strikethrough tag, not an
/// end of turn (files whose EOS is `</s>`, like Llama 2, have it as EOS anyway).
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>",
];

/// GPT-2's split regex (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_GPT2`).
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's split regex, in llama.cpp's case-insensitive-free form.
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's split regex: Llama 3's with digits one by one.
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How llama.cpp pre-tokenizes for one family of `tokenizer.ggml.pre` values.
struct BpePre {
    /// The `tokenizer.ggml.pre` values of this family.
    names: &'static [&'static str],
    /// The regexes applied one after the other; every match and every gap becomes a piece.
    regexes: &'static [&'static str],
    /// Whether a piece that is itself a token skips the merges (llama.cpp's `ignore_merges`).
    ignore_merges: bool,
    /// llama.cpp's default for `add_bos` when the file does not say.
    add_bos: bool,
}

/// The pre-tokenizers supported, after llama.cpp's `llm_tokenizer_bpe` (src/llama-vocab.cpp).
const BPE_PRE: &[BpePre] = &[
    // Digits one by one, then GPT-2's regex. Built as Digits + ByteLevel (its built-in regex is
    // GPT-2's), which is exactly what SmolLM2 was first matched against.
    BpePre {
        names: &[
            "smollm",
            "starcoder",
            "refact",
            "command-r",
            "codeshell",
            "exaone",
            "minerva-7b",
        ],
        regexes: &[],
        ignore_merges: false,
        add_bos: false,
    },
    BpePre {
        names: &["llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"],
        regexes: &[LLAMA3_REGEX],
        ignore_merges: true,
        add_bos: true,
    },
    BpePre {
        names: &["dbrx", "smaug-bpe"],
        regexes: &[LLAMA3_REGEX],
        ignore_merges: false,
        add_bos: false,
    },
    BpePre {
        names: &["qwen2", "deepseek-r1-qwen", "stablelm2"],
        regexes: &[QWEN2_REGEX],
        ignore_merges: false,
        add_bos: false,
    },
    BpePre {
        // "gpt2" is not a llama.cpp name; it is taken as "gpt-2" rather than refused.
        names: &["gpt-2", "gpt2", "phi-2", "olmo", "mpt", "jais"],
        regexes: &[GPT2_REGEX],
        ignore_merges: false,
        add_bos: false,
    },
    BpePre {
        names: &["default"],
        regexes: &[
            r"[\p{P}\$\+<=>\^~\|]+",
            GPT2_REGEX,
            r"\p{N}+",
            r"[0-9][0-9][0-9]",
        ],
        ignore_merges: false,
        add_bos: false,
    },
];

/// Text to token ids and back, as the model was trained.
#[derive(Clone)]
pub struct GgufTokenizer {
    inner: Tokenizer,
    eos: u32,
    bos: Option<u32>,
    add_bos: bool,
    eog: Vec<u32>,
    vocab: Vec<String>,
}

impl GgufTokenizer {
    /// Builds the tokenizer from `tokenizer.ggml.*` metadata alone, so that a GGUF file is all a
    /// model needs and its ids are the ones llama.cpp feeds the same model. Fails, naming the
    /// key, on a tokenizer kind or pre-tokenizer that is not supported (rather than tokenizing
    /// differently from how the model was trained) and on inconsistent metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let model = gguf.string("tokenizer.ggml.model")?;
        if !matches!(model, "gpt2" | "llama") {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer.ggml.model is {model:?}; supported: {SUPPORTED_MODELS}"
            )));
        }
        let vocab: Vec<String> = strings(gguf, "tokenizer.ggml.tokens")?;
        if vocab.is_empty() {
            return Err(bad_metadata(
                "tokenizer.ggml.tokens",
                "the vocabulary is empty",
            ));
        }
        let types: Vec<i32> = match gguf.array("tokenizer.ggml.token_type") {
            Ok(values) => values
                .iter()
                .map(|v| {
                    v.to_i32()
                        .map_err(|e| bad_metadata("tokenizer.ggml.token_type", e))
                })
                .collect::<Result<_>>()?,
            Err(ModelError::MissingMetadata { .. }) => vec![NORMAL_TOKEN; vocab.len()],
            Err(e) => return Err(e),
        };
        if types.len() != vocab.len() {
            return Err(bad_metadata(
                "tokenizer.ggml.token_type",
                format!("{} token types for {} tokens", types.len(), vocab.len()),
            ));
        }
        let eos = token_id(gguf, "tokenizer.ggml.eos_token_id", vocab.len())?.ok_or_else(|| {
            ModelError::MissingMetadata {
                key: "tokenizer.ggml.eos_token_id".into(),
            }
        })?;
        let bos = token_id(gguf, "tokenizer.ggml.bos_token_id", vocab.len())?;

        let (mut inner, default_add_bos) = match model {
            "gpt2" => byte_level_bpe(gguf, &vocab)?,
            _ => (sentencepiece(gguf, &vocab)?, true),
        };

        // Control (and unknown) tokens are special: matched in the text, dropped by
        // `decode(.., true)`. User-defined tokens are matched the same way but are text.
        // Neither is normalized, so they match the raw text as in llama.cpp.
        let mut specials = Vec::new();
        let mut user_defined = Vec::new();
        for (token, &kind) in vocab.iter().zip(&types) {
            match kind {
                CONTROL_TOKEN | UNKNOWN_TOKEN => {
                    specials.push(AddedToken::from(token.clone(), true))
                }
                USER_DEFINED_TOKEN => {
                    user_defined.push(AddedToken::from(token.clone(), false).normalized(false))
                }
                _ => {}
            }
        }
        inner
            .add_special_tokens(specials)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        inner
            .add_tokens(user_defined)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;

        let add_bos = match flag(gguf, "tokenizer.ggml.add_bos_token")? {
            Some(true) if bos.is_none() => {
                return Err(bad_metadata(
                    "tokenizer.ggml.add_bos_token",
                    "a BOS token is asked for but tokenizer.ggml.bos_token_id is missing",
                ))
            }
            Some(asked) => asked,
            // A default cannot ask for a token the file does not have.
            None => default_add_bos && bos.is_some(),
        };

        let mut eog = vec![eos];
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            eog.extend(token_id(gguf, key, vocab.len())?);
        }
        eog.extend(
            vocab
                .iter()
                .zip(&types)
                .enumerate()
                .filter(|(_, (token, &kind))| {
                    kind == CONTROL_TOKEN && END_OF_GENERATION_TEXTS.contains(&token.as_str())
                })
                .map(|(id, _)| id as u32),
        );
        eog.sort_unstable();
        eog.dedup();

        Ok(Self {
            inner,
            eos,
            bos,
            add_bos,
            eog,
            vocab,
        })
    }

    /// Token ids of `text`; control tokens written in the text (`<|im_start|>`) become their ids.
    /// No BOS is added: see [`GgufTokenizer::add_bos`].
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`; control tokens are dropped when `skip_special` is set.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab.len()) {
            return Err(ModelError::Tokenizer(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                self.vocab.len()
            )));
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// The end-of-sequence token: generation stops when it is sampled.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// The beginning-of-sequence token, if the model has one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// Whether a prompt should start with the BOS token: Gemma and Llama are trained that way,
    /// SmolLM2 is not. Read from `tokenizer.ggml.add_bos_token`, else llama.cpp's default for the
    /// tokenizer kind (true for SentencePiece and Llama 3, false for other byte-level BPEs). When
    /// true, [`GgufTokenizer::bos`] is set.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Every token that ends generation, sorted: the EOS, the file's EOT/EOM tokens, and control
    /// tokens llama.cpp treats as end of turn by their text (Gemma's `<end_of_turn>`, ChatML's
    /// `<|im_end|>`), since chat models end a reply with those rather than with EOS.
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    /// Whether sampling `id` ends generation (see [`GgufTokenizer::eog_ids`]).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// The stored form of token `id` (byte-level characters for BPE, `▁` for spaces in
    /// SentencePiece), if it exists.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.vocab.get(id as usize).map(String::as_str)
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }
}

/// A byte-level BPE from the stored merges, with llama.cpp's pre-tokenizer for
/// `tokenizer.ggml.pre`; also returns llama.cpp's default for `add_bos`.
fn byte_level_bpe(gguf: &GgufFile, vocab: &[String]) -> Result<(Tokenizer, bool)> {
    let pre_name = match gguf.string("tokenizer.ggml.pre") {
        Ok(name) => name,
        Err(ModelError::MissingMetadata { .. }) => "default",
        Err(e) => return Err(e),
    };
    let pre = BPE_PRE
        .iter()
        .find(|p| p.names.contains(&pre_name))
        .ok_or_else(|| {
            let supported: Vec<String> = BPE_PRE
                .iter()
                .flat_map(|p| p.names.iter().map(|n| format!("{n:?}")))
                .collect();
            ModelError::Tokenizer(format!(
                "tokenizer.ggml.pre is {pre_name:?}, a pre-tokenizer Veil does not know; supported: {}",
                supported.join(", ")
            ))
        })?;

    let merges: Vec<(String, String)> = strings(gguf, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            // llama.cpp splits at the first space after the first byte (so " " can be a half).
            m.bytes()
                .skip(1)
                .position(|b| b == b' ')
                .map(|at| (m[..at + 1].to_string(), m[at + 2..].to_string()))
                .ok_or_else(|| ModelError::Tokenizer(format!("merge {m:?} is not two tokens")))
        })
        .collect::<Result<_>>()?;
    // Every merge must make a vocabulary token. tokenizers' builder checks this, but panics (a
    // slice out of range) instead of returning its error when the merged text is longer than
    // every token, which a damaged or hostile file can arrange (found by fuzzing GGUF headers).
    let vocab_ids = vocab_map(vocab);
    if let Some((a, b)) = merges
        .iter()
        .find(|(a, b)| !vocab_ids.contains_key(&format!("{a}{b}")))
    {
        return Err(ModelError::Tokenizer(format!(
            "merge {a:?} + {b:?} makes a token that is not in the vocabulary"
        )));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_ids, merges)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;

    let mut inner = Tokenizer::new(bpe);
    let steps: Vec<PreTokenizerWrapper> = if pre.regexes.is_empty() {
        vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ]
    } else {
        let mut steps = pre
            .regexes
            .iter()
            .map(|regex| {
                Split::new(
                    SplitPattern::Regex((*regex).to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map(PreTokenizerWrapper::Split)
                .map_err(|e| ModelError::Tokenizer(format!("pre-tokenizer regex {regex:?}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
            false, true, false,
        )));
        steps
    };
    inner.with_pre_tokenizer(Some(Sequence::new(steps)));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    Ok((inner, pre.add_bos))
}

/// llama.cpp's SentencePiece tokenizer (`llm_tokenizer_spm`) as a `tokenizers` pipeline.
///
/// llama.cpp replaces ' ' with '▁', prepends '▁' when `add_space_prefix` is set, then greedily
/// merges the adjacent pair whose concatenation is a vocabulary token of highest score (leftmost
/// on ties) and writes symbols that are not tokens as byte tokens `<0xXX>`. That is a BPE whose
/// merges are every split of a token into two tokens, ranked by the merged token's score (see
/// [`spm_merges`]), with byte fallback; the normalizer does the space handling and the decoder
/// undoes it.
fn sentencepiece(gguf: &GgufFile, vocab: &[String]) -> Result<Tokenizer> {
    let scores: Vec<f32> = match gguf.array("tokenizer.ggml.scores") {
        Ok(values) => values
            .iter()
            .map(|v| match v {
                Value::F32(x) => Ok(*x),
                Value::F64(x) => Ok(*x as f32),
                other => Err(bad_metadata(
                    "tokenizer.ggml.scores",
                    format!("expected floats, found {other:?}"),
                )),
            })
            .collect::<Result<_>>()?,
        // A SentencePiece vocabulary without scores cannot be tokenized the way it was trained.
        Err(e) => return Err(e),
    };
    if scores.len() != vocab.len() {
        return Err(bad_metadata(
            "tokenizer.ggml.scores",
            format!("{} scores for {} tokens", scores.len(), vocab.len()),
        ));
    }
    let add_space_prefix = flag(gguf, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
    let unk = token_id(gguf, "tokenizer.ggml.unknown_token_id", vocab.len())?;

    let merges = spm_merges(vocab, &scores);
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab_map(vocab), merges)
        .byte_fallback(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(vocab[unk as usize].clone());
    }
    let bpe = builder
        .build()
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;

    let tokenizer_error = |e: tokenizers::Error| ModelError::Tokenizer(e.to_string());
    let mut normalizers = Vec::new();
    if add_space_prefix {
        normalizers.push(NormalizerWrapper::Prepend(Prepend::new(
            SPM_SPACE.to_string(),
        )));
    }
    normalizers.push(NormalizerWrapper::Replace(
        Replace::new(" ", SPM_SPACE).map_err(tokenizer_error)?,
    ));
    let mut decoders = vec![
        DecoderWrapper::Replace(Replace::new(SPM_SPACE, " ").map_err(tokenizer_error)?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if add_space_prefix {
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }

    let mut inner = Tokenizer::new(bpe);
    inner
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(tokenizer_error)?;
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(inner)
}

/// BPE merges equivalent to llama.cpp's score-greedy SentencePiece merging.
///
/// llama.cpp merges two adjacent symbols whenever their concatenation is a token, best score
/// first. So every way of writing a token as two tokens is a merge, and merges rank by the merged
/// token's score, highest first (ties by id, as SentencePiece breaks them). This is what Hugging
/// Face's `SentencePieceExtractor` does, but in one pass over each token's split points with a
/// hash lookup per half, so Gemma 3's 262,144 tokens give their ~515k merges in well under a
/// second. Every token takes part, whatever its type, as in llama.cpp (control and user-defined
/// texts never reach the model anyway: they are cut out of the text as added tokens first).
fn spm_merges(vocab: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let mut ids: HashMap<&str, u32> = HashMap::with_capacity(vocab.len());
    for (id, token) in vocab.iter().enumerate() {
        ids.entry(token.as_str()).or_insert(id as u32);
    }
    // (merged token id, byte offset of the split), sorted best score first.
    let mut splits: Vec<(u32, u32)> = Vec::new();
    for (id, token) in vocab.iter().enumerate() {
        if ids.get(token.as_str()) != Some(&(id as u32)) {
            continue;
        }
        for (at, _) in token.char_indices().skip(1) {
            if ids.contains_key(&token[..at]) && ids.contains_key(&token[at..]) {
                splits.push((id as u32, at as u32));
            }
        }
    }
    splits.sort_by(|a, b| {
        scores[b.0 as usize]
            .total_cmp(&scores[a.0 as usize])
            .then(a.0.cmp(&b.0))
            .then(a.1.cmp(&b.1))
    });
    splits
        .into_iter()
        .map(|(id, at)| {
            let (left, right) = vocab[id as usize].split_at(at as usize);
            (left.to_string(), right.to_string())
        })
        .collect()
}

/// Token text to id, the first id winning if a text repeats (as in llama.cpp's lookups).
fn vocab_map(vocab: &[String]) -> Vocab {
    let mut map = Vocab::with_capacity(vocab.len());
    for (id, token) in vocab.iter().enumerate() {
        map.entry(token.clone()).or_insert(id as u32);
    }
    map
}

fn strings(gguf: &GgufFile, key: &str) -> Result<Vec<String>> {
    gguf.array(key)?
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.clone()),
            other => Err(bad_metadata(
                key,
                format!("expected strings, found {other:?}"),
            )),
        })
        .collect()
}

fn flag(gguf: &GgufFile, key: &str) -> Result<Option<bool>> {
    match gguf.value(key) {
        Ok(Value::Bool(b)) => Ok(Some(*b)),
        Ok(other) => Err(bad_metadata(
            key,
            format!("expected a bool, found {other:?}"),
        )),
        Err(ModelError::MissingMetadata { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

fn token_id(gguf: &GgufFile, key: &str, vocab_size: usize) -> Result<Option<u32>> {
    match gguf.usize(key) {
        Ok(id) if id < vocab_size => Ok(Some(id as u32)),
        Ok(id) => Err(bad_metadata(
            key,
            format!("token id {id} is outside the vocabulary of {vocab_size} tokens"),
        )),
        Err(ModelError::MissingMetadata { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

fn bad_metadata(key: &str, reason: impl ToString) -> ModelError {
    ModelError::BadMetadata {
        key: key.to_string(),
        reason: reason.to_string(),
    }
}
