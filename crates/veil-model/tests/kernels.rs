//! Veil's CPU kernels on the real default model: every kernel family returns the scalar
//! reference's logits bit for bit, and the default model's greedy answers on the sample prompts
//! are the ones candle's kernels give.

use veil_model::prompts::SAMPLE_PROMPTS;
use veil_model::sampling::argmax;
use veil_model::{
    write_converted, ChatMessage, Kernels, LocalModel, LogitsAt, ModelStore, TokenStep,
    WeightFormat, SMOLLM2_135M,
};

/// Tokens generated per prompt in the greedy comparison.
const GREEDY_TOKENS: usize = 32;

fn model_path() -> std::path::PathBuf {
    ModelStore::from_env()
        .ensure(&SMOLLM2_135M, &mut |_| {})
        .expect("the default model can be fetched")
}

fn load(format: WeightFormat, kernels: Kernels) -> LocalModel {
    LocalModel::load_with(&model_path(), format, &[], kernels).expect("model loads")
}

fn greedy(model: &LocalModel, question: &str) -> Vec<u32> {
    let prompt = model.chat_prompt(&[ChatMessage::user(question)]).unwrap();
    let mut session = model.session();
    let mut logits = session.step(&prompt).unwrap();
    let mut out = Vec::with_capacity(GREEDY_TOKENS);
    for _ in 0..GREEDY_TOKENS {
        out.push(argmax(&logits));
        logits = session.step(&out[out.len() - 1..]).unwrap();
    }
    out
}

fn logits(model: &LocalModel, question: &str) -> Vec<f32> {
    let prompt = model.chat_prompt(&[ChatMessage::user(question)]).unwrap();
    let all = model.session().forward(&prompt, LogitsAt::All).unwrap();
    all.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn every_kernel_family_gives_the_reference_logits_bit_for_bit() {
    let families = veil_kernels_available();
    eprintln!("kernel families here: {families:?}");
    for format in [WeightFormat::AsStored, WeightFormat::Q8_0] {
        let reference = load(format, "scalar".parse().unwrap());
        let want = logits(&reference, SAMPLE_PROMPTS[0]);
        for family in &families {
            let model = load(format, family.parse().unwrap());
            assert!(
                logits(&model, SAMPLE_PROMPTS[0]) == want,
                "{format} on {family}: logits differ from the scalar reference"
            );
        }
    }
}

/// The default model as shipped (Q4_1, with a Q8_0 embedding) answers as it did on candle's
/// kernels. Only the default model: candle's own Q8_0 products quantize activations in
/// 256-value blocks for some matrices on CPUs with AVX-512 VNNI, so its Q8_0 answers depend on
/// the CPU; Veil's follow the reference on every CPU (the test above).
#[test]
fn greedy_answers_of_the_default_model_match_candles_kernels_on_the_sample_prompts() {
    let veil = load(WeightFormat::AsStored, Kernels::default());
    let candle = load(WeightFormat::AsStored, Kernels::Candle);
    for question in &SAMPLE_PROMPTS[..8] {
        let (ours, theirs) = (greedy(&veil, question), greedy(&candle, question));
        assert_eq!(
            ours, theirs,
            "{question:?}: greedy tokens differ from candle's"
        );
    }
}

#[test]
fn a_converted_copy_runs_as_stored_like_the_conversion_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("as-q8_0.gguf");
    write_converted(
        &model_path(),
        candle_core::quantized::GgmlDType::Q8_0,
        &copy,
    )
    .unwrap();
    let converted = LocalModel::load(&copy, WeightFormat::AsStored, &[]).unwrap();
    let at_load = load(WeightFormat::Q8_0, Kernels::default());
    assert_eq!(
        converted.tokenizer.encode("Hello").unwrap(),
        at_load.tokenizer.encode("Hello").unwrap()
    );
    assert!(logits(&converted, SAMPLE_PROMPTS[1]) == logits(&at_load, SAMPLE_PROMPTS[1]));
}

/// The kernel families this CPU runs, by their `--kernels` names.
fn veil_kernels_available() -> Vec<String> {
    ["scalar", "avx2", "avx512"]
        .into_iter()
        .filter(|name| name.parse::<Kernels>().is_ok())
        .map(str::to_string)
        .collect()
}
