//! Tokenizers built from GGUF metadata give llama.cpp's ids.
//!
//! Tiny in-memory vocabularies pin the algorithms (SentencePiece's score-greedy merging, byte
//! fallback, the errors for what is not supported). The real Gemma 3 and SmolLM2 files are compared
//! with ids printed by llama.cpp b11434's `llama-tokenize` (tests/fixtures/tokenizers, made by its
//! `make_fixture.py`) and with the conformance fixtures of the same build
//! (tests/fixtures/conformance/tokenize), which also cover the committed tiny Gemma 3, Llama 3 and
//! Qwen 2 vocabularies. With `VEIL_LLAMA_CPP_MODELS` set, llama.cpp's own vocabulary test suite
//! runs as well.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::quantized::gguf_file::{self, Value};
use veil_model::{GgufFile, GgufTokenizer, ModelStore, SMOLLM2_135M};

/// Writes a GGUF holding only `metadata` (no tensors) and opens it.
fn gguf_with(metadata: Vec<(&str, Value)>) -> GgufFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    let mut writer = std::io::BufWriter::new(file.reopen().unwrap());
    let refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut writer, &refs, &[]).unwrap();
    drop(writer);
    let gguf = GgufFile::open(file.path()).unwrap();
    drop(file);
    gguf
}

fn strings(items: &[&str]) -> Value {
    Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
}

/// A SentencePiece vocabulary: `<unk>`, `<s>`, `</s>`, `<start>` (control), the 256 byte tokens,
/// then `pieces` with their scores.
fn spm_metadata(pieces: &[(&str, f32)], add_space_prefix: bool) -> Vec<(&'static str, Value)> {
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>", "<start>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut scores = vec![0.0f32; 4];
    let mut types = vec![2i32, 3, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        scores.push(0.0);
        types.push(6);
    }
    for (piece, score) in pieces {
        tokens.push(piece.to_string());
        scores.push(*score);
        types.push(1);
    }
    vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.scores",
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        (
            "tokenizer.ggml.add_space_prefix",
            Value::Bool(add_space_prefix),
        ),
    ]
}

/// The id of the first piece given to [`spm_metadata`].
const FIRST_PIECE: u32 = 4 + 256;

fn spm(pieces: &[(&str, f32)], add_space_prefix: bool) -> GgufTokenizer {
    GgufTokenizer::from_gguf(&gguf_with(spm_metadata(pieces, add_space_prefix))).unwrap()
}

fn pieces_of(tok: &GgufTokenizer, text: &str) -> Vec<String> {
    tok.encode(text)
        .unwrap()
        .into_iter()
        .map(|id| tok.token(id).unwrap().to_string())
        .collect()
}

#[test]
fn sentencepiece_merges_the_best_scoring_pair_first() {
    let letters = [("a", -10.0), ("b", -10.0), ("c", -10.0), ("▁", -10.0)];
    let with = |extra: &[(&'static str, f32)]| {
        let mut pieces = letters.to_vec();
        pieces.extend_from_slice(extra);
        spm(&pieces, false)
    };
    // "bc" scores higher than "ab": a + bc, even though "ab" is leftmost.
    let tok = with(&[("ab", -2.0), ("bc", -1.0)]);
    assert_eq!(pieces_of(&tok, "abc"), ["a", "bc"]);
    // And the other way round.
    let tok = with(&[("ab", -1.0), ("bc", -2.0)]);
    assert_eq!(pieces_of(&tok, "abc"), ["ab", "c"]);
    // Equal pairs: leftmost first ("aaa" is "aa" + "a", not "a" + "aa").
    let tok = with(&[("aa", -1.0)]);
    assert_eq!(pieces_of(&tok, "aaa"), ["aa", "a"]);
    // A merge chain reaches the whole word only through tokens: "abc" needs "ab" or "bc".
    let tok = with(&[("ab", -3.0), ("abc", -1.0)]);
    assert_eq!(pieces_of(&tok, "abc"), ["abc"]);
    let tok = with(&[("abc", -1.0)]);
    assert_eq!(pieces_of(&tok, "abc"), ["a", "b", "c"]);
}

#[test]
fn sentencepiece_spaces_bytes_and_control_tokens() {
    let pieces = [
        ("a", -10.0),
        ("b", -10.0),
        ("▁", -10.0),
        ("▁a", -1.0),
        ("▁b", -2.0),
    ];
    let tok = spm(&pieces, false);
    // Spaces become '▁' and merge with the following letter.
    assert_eq!(pieces_of(&tok, "a b"), ["a", "▁b"]);
    // A character outside the vocabulary falls back to its UTF-8 bytes.
    assert_eq!(pieces_of(&tok, "aé"), ["a", "<0xC3>", "<0xA9>"]);
    // Control tokens in the text are their ids, and the text around them is tokenized alone.
    assert_eq!(pieces_of(&tok, "a<start> a"), ["a", "<start>", "▁a"]);
    for text in ["a b", "aé  b", " a<start>b ", "\n\tä"] {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "ids {ids:?}");
    }
    assert_eq!(
        tok.decode(&tok.encode("a<start>b").unwrap(), true).unwrap(),
        "ab"
    );
    assert!(
        tok.add_bos(),
        "SentencePiece defaults to a BOS like llama.cpp"
    );
    assert_eq!((tok.bos(), tok.eos()), (Some(1), 2));

    // With add_space_prefix, a '▁' starts the text, and decoding drops it again.
    let tok = spm(&pieces, true);
    assert_eq!(pieces_of(&tok, "a b"), ["▁a", "▁b"]);
    let ids = tok.encode("a b").unwrap();
    assert_eq!(ids, [FIRST_PIECE + 3, FIRST_PIECE + 4]);
    assert_eq!(tok.decode(&ids, false).unwrap(), "a b");
}

#[test]
fn unsupported_tokenizers_are_refused_by_name() {
    let mut metadata = spm_metadata(&[("a", -1.0)], false);
    metadata[0].1 = Value::String("bert".into());
    let err = GgufTokenizer::from_gguf(&gguf_with(metadata))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("\"bert\"") && err.contains("gpt2") && err.contains("llama"),
        "{err}"
    );

    let bpe = |pre: &str| {
        vec![
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String(pre.into())),
            ("tokenizer.ggml.tokens", strings(&["a", "b", "ab"])),
            ("tokenizer.ggml.merges", strings(&["a b"])),
            ("tokenizer.ggml.eos_token_id", Value::U32(0)),
        ]
    };
    let err = GgufTokenizer::from_gguf(&gguf_with(bpe("tekken")))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("\"tekken\"") && err.contains("\"smollm\""),
        "{err}"
    );
    for pre in ["smollm", "llama-bpe", "qwen2", "gpt-2", "default"] {
        let mut metadata = bpe(pre);
        metadata.push(("tokenizer.ggml.bos_token_id", Value::U32(1)));
        let tok = GgufTokenizer::from_gguf(&gguf_with(metadata)).unwrap();
        assert_eq!(tok.encode("ab").unwrap(), [2], "{pre}");
        // llama.cpp's defaults: a BOS for Llama 3, none for other byte-level BPEs.
        assert_eq!(tok.add_bos(), pre == "llama-bpe", "{pre}");
    }
    // Asking for a BOS the vocabulary does not name is refused.
    let mut metadata = bpe("gpt-2");
    metadata.push(("tokenizer.ggml.add_bos_token", Value::Bool(true)));
    let err = GgufTokenizer::from_gguf(&gguf_with(metadata))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("bos_token_id"), "{err}");
}

#[test]
fn scores_that_do_not_match_the_tokens_are_refused() {
    let mut metadata = spm_metadata(&[("a", -1.0)], false);
    let scores = metadata
        .iter_mut()
        .find(|(k, _)| *k == "tokenizer.ggml.scores")
        .unwrap();
    if let Value::Array(values) = &mut scores.1 {
        values.pop();
    }
    let err = GgufTokenizer::from_gguf(&gguf_with(metadata))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("tokenizer.ggml.scores") && err.contains("scores for"),
        "{err}"
    );

    let mut metadata = spm_metadata(&[("a", -1.0)], false);
    metadata.retain(|(k, _)| *k != "tokenizer.ggml.scores");
    assert!(GgufTokenizer::from_gguf(&gguf_with(metadata)).is_err());
}

/// Reference ids from llama.cpp, per model.
#[derive(serde::Deserialize)]
struct Reference {
    llama_cpp: String,
    gemma3_270m: Vec<Case>,
    smollm2_135m: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

fn reference() -> Reference {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizers/llama_cpp_ids.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Checks every reference case and the round trip, reporting all mismatches at once.
fn check_against_llama_cpp(tok: &GgufTokenizer, cases: &[Case], build: &str) {
    let mut failures = Vec::new();
    for case in cases {
        let ids = tok.encode(&case.text).unwrap();
        if ids != case.ids {
            failures.push(format!(
                "{:?}:\n  veil      {ids:?}\n  llama.cpp {:?}",
                case.text, case.ids
            ));
        }
        let back = tok.decode(&ids, false).unwrap();
        if back != case.text {
            failures.push(format!("{:?} decodes back as {back:?}", case.text));
        }
    }
    assert!(
        failures.is_empty(),
        "differences from llama.cpp ({build}):\n{}",
        failures.join("\n")
    );
}

/// The Gemma 3 270M GGUF, from `VEIL_GEMMA_GGUF` until the store knows the model.
fn gemma_path() -> Option<PathBuf> {
    Some(
        veil_model::ModelStore::from_env()
            .ensure(&veil_model::GEMMA3_270M, &mut |_| {})
            .expect("Gemma 3 270M can be fetched"),
    )
}

#[test]
fn gemma3_ids_match_llama_cpp() {
    let Some(path) = gemma_path() else { return };
    let gguf = GgufFile::open(&path).unwrap();
    let start = Instant::now();
    let tok = GgufTokenizer::from_gguf(&gguf).unwrap();
    eprintln!(
        "built the Gemma 3 tokenizer ({} tokens) in {:?}",
        tok.vocab_size(),
        start.elapsed()
    );
    assert_eq!(tok.vocab_size(), 262_144);
    assert_eq!((tok.bos(), tok.eos()), (Some(2), 1));
    assert!(tok.add_bos());
    assert_eq!(tok.token(106), Some("<end_of_turn>"));
    assert!(tok.is_eog(1) && tok.is_eog(106), "{:?}", tok.eog_ids());
    assert!(!tok.is_eog(105));
    assert_eq!(tok.encode("<start_of_turn>").unwrap(), [105]);

    let reference = reference();
    check_against_llama_cpp(&tok, &reference.gemma3_270m, &reference.llama_cpp);
    check_conformance(&tok, "gemma-3-270m");
}

#[test]
fn smollm2_ids_match_llama_cpp() {
    let path = ModelStore::from_env()
        .ensure(&SMOLLM2_135M, &mut |_| {})
        .expect("the default model is fetched for the real-model tests");
    let tok = GgufTokenizer::from_gguf(&GgufFile::open(path).unwrap()).unwrap();
    assert!(!tok.add_bos());
    assert!(tok.is_eog(2), "{:?}", tok.eog_ids());
    let reference = reference();
    check_against_llama_cpp(&tok, &reference.smollm2_135m, &reference.llama_cpp);
    check_conformance(&tok, "smollm2-135m-instruct");
}

/// One of the conformance helper's `tests/fixtures/conformance/tokenize/<model>.json` files: the
/// same llama.cpp build's ids for 36 fixture strings, without and with the BOS it adds.
#[derive(serde::Deserialize)]
struct Conformance {
    llama_cpp: String,
    n_vocab: usize,
    add_bos: bool,
    bos: u32,
    eos: u32,
    cases: Vec<ConformanceCase>,
}

#[derive(serde::Deserialize)]
struct ConformanceCase {
    text: String,
    ids: Vec<u32>,
    ids_add_special: Vec<u32>,
}

/// Checks `tok` against `tokenize/<name>.json`, with the BOS added as `add_bos` says.
fn check_conformance(tok: &GgufTokenizer, name: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/conformance/tokenize")
        .join(format!("{name}.json"));
    let reference: Conformance =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(tok.vocab_size(), reference.n_vocab, "{name}");
    assert_eq!(tok.add_bos(), reference.add_bos, "{name}");
    assert_eq!(tok.eos(), reference.eos, "{name}");
    if tok.add_bos() {
        assert_eq!(tok.bos(), Some(reference.bos), "{name}");
    }
    let cases: Vec<Case> = reference
        .cases
        .iter()
        .map(|c| Case {
            text: c.text.clone(),
            ids: c.ids.clone(),
        })
        .collect();
    check_against_llama_cpp(tok, &cases, &reference.llama_cpp);
    for case in &reference.cases {
        let mut ids = tok
            .bos()
            .filter(|_| tok.add_bos())
            .into_iter()
            .collect::<Vec<_>>();
        ids.extend(tok.encode(&case.text).unwrap());
        assert_eq!(ids, case.ids_add_special, "{name} {:?}", case.text);
    }
}

/// The committed tiny conformance models: SentencePiece like Gemma 3 (control and user-defined
/// tokens, byte fallback), Llama 3's and Qwen 2's byte-level BPE pre-tokenizers.
#[test]
fn tiny_conformance_vocabularies_match_llama_cpp() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/conformance");
    for (file, reference) in [
        ("tiny-gemma3-q4_k_m.gguf", "tiny-gemma3"),
        ("tiny-llama-q8_0.gguf", "tiny-llama"),
        ("tiny-qwen2-q8_0.gguf", "tiny-qwen2"),
    ] {
        let path = dir.join(file);
        if !path.exists() {
            eprintln!("{} is missing: skipping {reference}", path.display());
            continue;
        }
        let tok = GgufTokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
        check_conformance(&tok, reference);
    }
}

/// llama.cpp's own tokenizer test suite (its `models/ggml-vocab-*.gguf` with `.inp`/`.out`), run
/// when `VEIL_LLAMA_CPP_MODELS` names that directory: many more edge cases than the fixture, on
/// vocabularies of each supported kind (Llama 2 and Phi-3 SentencePiece with a space prefix,
/// Llama 3, Qwen 2, GPT-2, Command-R, StarCoder...).
#[test]
fn llama_cpp_vocab_suite_matches() {
    let Some(dir) = std::env::var_os("VEIL_LLAMA_CPP_MODELS").filter(|d| !d.is_empty()) else {
        eprintln!("VEIL_LLAMA_CPP_MODELS is not set: skipping llama.cpp's vocabulary tests");
        return;
    };
    let dir = PathBuf::from(dir);
    let vocabs = [
        "llama-spm",
        "phi-3",
        "llama-bpe",
        "qwen2",
        "gpt-2",
        "command-r",
        "starcoder",
        "refact",
        "mpt",
    ];
    let mut failures = Vec::new();
    for name in vocabs {
        let path = dir.join(format!("ggml-vocab-{name}.gguf"));
        let (Ok(inp), Ok(out)) = (
            std::fs::read_to_string(path.with_extension("gguf.inp")),
            std::fs::read_to_string(path.with_extension("gguf.out")),
        ) else {
            eprintln!("{name}: no .inp/.out beside {}", path.display());
            continue;
        };
        let tok = GgufTokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
        let sep = "\n__ggml_vocab_test__\n";
        let texts: Vec<&str> = inp.strip_suffix(sep).unwrap_or(&inp).split(sep).collect();
        let expected: Vec<Vec<u32>> = out
            .lines()
            .map(|l| l.split_whitespace().map(|id| id.parse().unwrap()).collect())
            .collect();
        assert_eq!(texts.len(), expected.len(), "{name}");
        for (text, ids) in texts.iter().zip(&expected) {
            let got = tok.encode(text).unwrap();
            if &got != ids {
                failures.push(format!(
                    "{name} {text:?}:\n  veil      {got:?}\n  llama.cpp {ids:?}"
                ));
            }
        }
        eprintln!("{name}: {} cases", texts.len());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
