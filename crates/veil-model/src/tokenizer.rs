//! The tokenizer, built from the GGUF file's own vocabulary and merges.
//!
//! candle's `Tokenizer::from_gguf` guesses the pre-tokenizer and gets SmolLM2's (`pre=smollm`)
//! ids wrong. A byte-level BPE from the stored vocabulary and merges, with Digits + ByteLevel
//! pre-tokenizers, a ByteLevel decoder and every control token (`token_type == 3`) registered as
//! special, matches llama.cpp's ids exactly; the `tokenizers` crate does all the work.

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

/// GGUF's `token_type` value for control tokens such as `<|im_start|>`.
const CONTROL_TOKEN: i32 = 3;

/// Text to token ids and back, as the model was trained.
#[derive(Clone)]
pub struct GgufTokenizer {
    inner: Tokenizer,
    eos: u32,
    bos: Option<u32>,
    vocab: Vec<String>,
}

impl GgufTokenizer {
    /// Builds the tokenizer from `tokenizer.ggml.*` metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let model = gguf.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer.ggml.model is {model:?}; only byte-level BPE (\"gpt2\") is supported"
            )));
        }
        let vocab: Vec<String> = strings(gguf, "tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings(gguf, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| ModelError::Tokenizer(format!("merge {m:?} is not two tokens")))
            })
            .collect::<Result<_>>()?;
        let types: Vec<i32> = match gguf.array("tokenizer.ggml.token_type") {
            Ok(values) => values
                .iter()
                .map(|v| v.to_i32().map_err(|e| ModelError::Tokenizer(e.to_string())))
                .collect::<Result<_>>()?,
            Err(ModelError::MissingMetadata { .. }) => Vec::new(),
            Err(e) => return Err(e),
        };
        let eos = token_id(gguf, "tokenizer.ggml.eos_token_id", vocab.len())?.ok_or_else(|| {
            ModelError::MissingMetadata {
                key: "tokenizer.ggml.eos_token_id".into(),
            }
        })?;
        let bos = token_id(gguf, "tokenizer.ggml.bos_token_id", vocab.len())?;

        let ids: Vocab = vocab
            .iter()
            .enumerate()
            .map(|(id, token)| (token.clone(), id as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(ids, merges)
            .build()
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ])));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = types
            .iter()
            .zip(&vocab)
            .filter(|(t, _)| **t == CONTROL_TOKEN)
            .map(|(_, token)| AddedToken::from(token.clone(), true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(Self {
            inner,
            eos,
            bos,
            vocab,
        })
    }

    /// Token ids of `text`; control tokens written in the text (`<|im_start|>`) become their ids.
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

    /// The stored form of token `id` (byte-level characters), if it exists.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.vocab.get(id as usize).map(String::as_str)
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }
}

fn strings(gguf: &GgufFile, key: &str) -> Result<Vec<String>> {
    gguf.array(key)?
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.clone()),
            other => Err(ModelError::BadMetadata {
                key: key.to_string(),
                reason: format!("expected strings, found {other:?}"),
            }),
        })
        .collect()
}

fn token_id(gguf: &GgufFile, key: &str, vocab_size: usize) -> Result<Option<u32>> {
    match gguf.usize(key) {
        Ok(id) if id < vocab_size => Ok(Some(id as u32)),
        Ok(id) => Err(ModelError::BadMetadata {
            key: key.to_string(),
            reason: format!("token id {id} is outside the vocabulary of {vocab_size} tokens"),
        }),
        Err(ModelError::MissingMetadata { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}
