//! Conformance with llama.cpp on tiny random-weight models of every architecture and tensor
//! type (`tests/fixtures/conformance`, made by `scripts/conformance/make_reference.sh`): the
//! same GGUF bytes in, logits and greedy tokens compared with the ones llama.cpp computed.
//!
//! Two tiers. The F32 models (written by `scripts/conformance/make_models.py` into the build's
//! temporary directory, checked against the SHA-256 llama.cpp's run recorded) test each
//! architecture alone: no activation is quantized, so logits may differ from llama.cpp's by at
//! most `F32_TOLERANCE` of the row's largest magnitude (sum orders and llama.cpp's f16-table
//! GELU). The quantized files (committed) test the architectures with Veil's kernels: both
//! engines round activations to 8 bits, and on these random weights (scaled up by Gemma's
//! embedding factor) one flipped rounding moves a logit by a few percent, so the bound there is
//! `QUANT_TOLERANCE`; a wrong block layout or architecture detail gives gaps of order 1. In both
//! tiers the argmax must agree wherever llama.cpp's top two are further apart than twice the
//! bound.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::Digest;
use veil_kernels::Isa;
use veil_model::{
    Architecture, GgufFile, Kernels, LlamaConfig, LocalModel, LogitsAt, WeightFormat,
};

/// Relative tolerance on logits of the F32 models (see the module docs).
const F32_TOLERANCE: f32 = 2e-3;
/// Relative tolerance on logits of the quantized models (see the module docs).
const QUANT_TOLERANCE: f32 = 0.08;

#[derive(Deserialize)]
struct Reference {
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
    argmax: Vec<u32>,
    argmax_margin: Vec<f32>,
    greedy: Vec<u32>,
    greedy_margin: Vec<f32>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/conformance")
}

fn reference(name: &str) -> Reference {
    let path = fixtures().join("logits").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).expect("reference JSON")
}

/// The largest `|a - b|` over `scale`, where `scale` is the largest magnitude in `b` (at least 1).
fn relative_gap(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(1f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0 as u32
}

/// The F32 tiny models, written once per build by the fixtures' own script and checked
/// against the digests recorded with llama.cpp's reference (Python with the `gguf` package).
fn f32_models() -> PathBuf {
    static MADE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    MADE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("conformance-f32");
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/conformance/make_models.py");
        let digests: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join("quant_types.json")).unwrap(),
        )
        .unwrap();
        let fresh = |name: &str| {
            let path = dir.join(format!("{name}.gguf"));
            let want = digests[format!("{name}.gguf")]["sha256"]
                .as_str()
                .map(String::from);
            let have = std::fs::read(&path)
                .ok()
                .map(|bytes| hex::encode(sha2::Sha256::digest(bytes)));
            have.is_some() && have == want
        };
        if !F32_MODELS.iter().all(|n| fresh(n)) {
            let python = std::env::var("VEIL_PYTHON").unwrap_or_else(|_| "python3".into());
            let status = std::process::Command::new(&python)
                .arg(&script)
                .arg(&dir)
                .args(["--seed", "1234"])
                .status()
                .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
            assert!(
                status.success(),
                "{script:?} failed: install its dependencies with `{python} -m pip install gguf`"
            );
            for name in F32_MODELS {
                assert!(
                    fresh(name),
                    "{name}.gguf differs from the one llama.cpp ran"
                );
            }
        }
        dir
    })
    .clone()
}

/// The F32 tiny models, one per architecture.
const F32_MODELS: [&str; 5] = [
    "tiny-llama-f32",
    "tiny-llama3rope-f32",
    "tiny-qwen2-f32",
    "tiny-qwen3-f32",
    "tiny-gemma3-f32",
];

/// Runs one fixture model on `kernels` and checks it against llama.cpp's reference.
fn check(name: &str, kernels: Kernels) {
    let (path, tolerance) = if name.ends_with("-f32") {
        (f32_models().join(format!("{name}.gguf")), F32_TOLERANCE)
    } else {
        (fixtures().join(format!("{name}.gguf")), QUANT_TOLERANCE)
    };
    let want = reference(name);
    let model = LocalModel::load_with(&path, WeightFormat::AsStored, &[], kernels)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut session = model.session();
    let logits = session
        .forward(&want.tokens, LogitsAt::All)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut worst = 0f32;
    for (t, (row, ref_row)) in logits.iter().zip(&want.logits).enumerate() {
        let gap = relative_gap(&row[..ref_row.len()], ref_row);
        if std::env::var("VEIL_CONFORMANCE_DEBUG").is_ok() {
            println!("{name} position {t}: gap {gap:.5}");
        }
        worst = worst.max(gap);
        assert!(
            gap <= tolerance,
            "{name} ({kernels}): position {t} logits differ by {gap} of their scale"
        );
        let scale = ref_row.iter().fold(1f32, |m, x| m.max(x.abs()));
        if want.argmax_margin[t] > 2.0 * tolerance * scale {
            assert_eq!(argmax(row), want.argmax[t], "{name}: argmax at {t}");
        }
    }
    // Greedy decoding one token at a time through the KV cache, fed llama.cpp's tokens so a
    // near-tie cannot send the two engines down different paths.
    let mut next = *want.greedy.first().expect("greedy tokens");
    for (k, margin) in want.greedy_margin.iter().enumerate() {
        let step = session.forward(&[next], LogitsAt::Last).unwrap();
        let row = step.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        if let Some(&expected) = want.greedy.get(k + 1) {
            if *margin > 2.0 * tolerance * row.iter().fold(1f32, |m, x| m.max(x.abs())) {
                assert_eq!(argmax(&row), expected, "{name}: greedy step {k}");
            }
            next = expected;
        }
    }
    println!("{name} ({kernels}): worst logit gap {worst:.5} of scale");
}

/// Every fixture model file.
fn models() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".gguf").map(str::to_string)
        })
        .collect();
    names.sort();
    names
}

#[test]
fn every_architecture_in_f32_matches_llama_cpp() {
    for name in F32_MODELS {
        check(name, Kernels::default());
    }
}

#[test]
fn every_architecture_and_tensor_type_matches_llama_cpp() {
    let names = models();
    for arch in ["llama", "llama3rope", "qwen2", "qwen3", "gemma3"] {
        assert!(
            names
                .iter()
                .any(|n| n.starts_with(&format!("tiny-{arch}-"))),
            "no fixture for {arch}"
        );
    }
    for name in &names {
        check(name, Kernels::default());
    }
}

#[test]
fn the_scalar_kernels_match_llama_cpp_too() {
    for name in models() {
        check(&name, Kernels::Veil(Isa::Scalar));
    }
}

#[test]
fn architectures_are_read_from_metadata() {
    let config = |name: &str| {
        LlamaConfig::from_gguf(&GgufFile::open(f32_models().join(format!("{name}.gguf"))).unwrap())
            .unwrap()
    };
    assert_eq!(config("tiny-llama-f32").architecture, Architecture::Llama);
    assert_eq!(config("tiny-qwen2-f32").architecture, Architecture::Qwen2);
    assert_eq!(config("tiny-qwen3-f32").architecture, Architecture::Qwen3);
    let gemma = config("tiny-gemma3-f32");
    assert_eq!(gemma.architecture, Architecture::Gemma3);
    assert_eq!(gemma.head_dim, 128);
    assert_eq!(gemma.q_size(), 512);
    assert_eq!(gemma.sliding_window, Some(8));
    let windows: Vec<Option<usize>> = (0..gemma.block_count).map(|i| gemma.window(i)).collect();
    assert_eq!(
        windows,
        [Some(8), Some(8), Some(8), Some(8), Some(8), None, Some(8)]
    );
}

/// A prompt run in pieces, and decoded one position at a time, gives the bits of one pass:
/// sliding windows and QK-norm included.
#[test]
fn chunked_prompts_give_the_bits_of_one_pass_on_every_architecture() {
    for name in ["tiny-gemma3-q4_k_m", "tiny-qwen3-q4_k_m", "tiny-qwen2-q8_0"] {
        let model = LocalModel::load(
            &fixtures().join(format!("{name}.gguf")),
            WeightFormat::AsStored,
            &[],
        )
        .unwrap();
        let tokens = reference(name).tokens;
        let whole = model
            .session()
            .forward(&tokens, LogitsAt::All)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let mut session = model.session();
        let mut pieces = Vec::new();
        for chunk in [&tokens[..7], &tokens[7..8], &tokens[8..]] {
            pieces.extend(
                session
                    .forward(chunk, LogitsAt::All)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap(),
            );
        }
        assert_eq!(whole, pieces, "{name}");
    }
}

/// Metadata that contradicts the tensors is refused before any weight is used.
#[test]
fn a_file_whose_metadata_contradicts_its_tensors_is_refused() {
    use candle_core::quantized::gguf_file::{self, Value};
    let source = fixtures().join("tiny-qwen3-q8_0.gguf");
    let mut gguf = GgufFile::open(&source).unwrap();
    let names = gguf.tensor_names();
    let tensors: Vec<_> = names
        .iter()
        .map(|n| (n.clone(), gguf.tensor(n).unwrap()))
        .collect();
    let write = |key: &str, value: Value| -> PathBuf {
        let mut metadata: Vec<(&str, &Value)> = gguf
            .content()
            .metadata
            .iter()
            .filter(|(k, _)| k.as_str() != key)
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        metadata.push((key, &value));
        let refs: Vec<_> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let out = tempfile::NamedTempFile::new().unwrap().into_temp_path();
        let mut file = std::fs::File::create(&out).unwrap();
        gguf_file::write(&mut file, &metadata, &refs).unwrap();
        out.keep().unwrap()
    };
    for (key, value, says) in [
        ("qwen3.attention.head_count", Value::U32(8), "expected [32]"),
        ("qwen3.embedding_length", Value::U32(320), "expected [320]"),
        (
            "qwen3.feed_forward_length",
            Value::U32(64),
            "blk.0.ffn_gate.weight",
        ),
        (
            "general.architecture",
            Value::String("mamba".into()),
            "mamba",
        ),
    ] {
        let path = write(key, value);
        let err = LocalModel::load(&path, WeightFormat::AsStored, &[])
            .err()
            .unwrap_or_else(|| panic!("{key} accepted"))
            .to_string();
        assert!(err.contains(says), "{key}: {err}");
        std::fs::remove_file(path).ok();
    }
}

/// A tensor type Veil cannot run (an i-quant) is named in the error, with what it runs.
#[test]
fn an_unsupported_tensor_type_is_named() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/iq4_xs.gguf");
    let err = GgufFile::open(&path).err().expect("refused").to_string();
    assert!(err.contains("IQ4_XS (type 23)"), "{err}");
    assert!(err.contains("Q4_K"), "{err}");
}
