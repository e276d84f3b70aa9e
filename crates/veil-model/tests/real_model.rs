//! End-to-end tests of the inference core on the real default model (fetched on first use).

use std::sync::OnceLock;

use veil_model::{
    generate, ChatMessage, FinishReason, GenerationParams, LocalModel, LogitsAt, ModelError,
    ModelStore, SamplingParams, ShardInput, TokenStep, WeightFormat, SMOLLM2_135M,
};

fn model_path() -> std::path::PathBuf {
    ModelStore::from_env()
        .ensure(&SMOLLM2_135M, &mut |_| {})
        .expect("the default model can be fetched")
}

/// The default model with F32 weights, loaded once for every test that only reads it.
fn f32_model() -> &'static LocalModel {
    static MODEL: OnceLock<LocalModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        LocalModel::load(&model_path(), WeightFormat::F32, &[]).expect("model loads")
    })
}

fn greedy(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_tokens,
        ..GenerationParams::default()
    }
}

fn answer(model: &LocalModel, question: &str, params: &GenerationParams) -> veil_model::Completion {
    let prompt = model.chat_prompt(&[ChatMessage::user(question)]).unwrap();
    let mut session = model.session();
    generate(
        &mut session,
        &model.tokenizer,
        &prompt,
        model.config.context_length,
        params,
        &mut |_| {},
    )
    .unwrap()
}

fn max_abs_diff(a: &veil_model::Tensor, b: &veil_model::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn config_is_read_from_metadata() {
    let c = &f32_model().config;
    assert_eq!(
        (
            c.block_count,
            c.hidden_size,
            c.ffn_size,
            c.head_count,
            c.kv_head_count,
            c.head_dim
        ),
        (30, 576, 1536, 9, 3, 64)
    );
    assert_eq!((c.vocab_size, c.context_length), (49152, 8192));
    assert_eq!(c.rope_base, 100_000.0);
}

#[test]
fn tokenizer_round_trips_varied_text() {
    let tok = &f32_model().tokenizer;
    let samples = [
        "Hello, world! Ünïcödé → 日本語のテキスト 🚀🎉 and emoji.",
        "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n}\n",
        "tabs\tand    runs   of     spaces\n\n\n  and trailing   ",
        "numbers 1234567890 3.14159 -42 1e-5",
        "<|im_start|>user\nspecial tokens inline<|im_end|>",
    ];
    for text in samples {
        let ids = tok.encode(text).unwrap();
        assert!(!ids.is_empty());
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "ids {ids:?}");
    }
}

#[test]
fn tokenizer_agrees_with_the_gguf_vocabulary() {
    let tok = &f32_model().tokenizer;
    let id = |piece: &str| {
        (0..tok.vocab_size() as u32)
            .find(|&i| tok.token(i) == Some(piece))
            .unwrap()
    };
    assert_eq!(tok.encode("<|im_start|>").unwrap(), vec![1]);
    assert_eq!(tok.encode("<|im_end|>").unwrap(), vec![2]);
    assert_eq!(tok.eos(), 2);
    assert_eq!(
        tok.encode("Hello world").unwrap(),
        vec![id("Hello"), id("Ġworld")]
    );
    // Digits are split one by one before BPE.
    let digits = tok.encode("2026").unwrap();
    assert_eq!(digits, vec![id("2"), id("0"), id("2"), id("6")]);
    // Ids llama.cpp gives for the same strings with this GGUF (llama-cpp-python 0.3, tokenize
    // with add_bos=False, special=True).
    for (text, ids) in LLAMA_CPP_IDS {
        assert_eq!(tok.encode(text).unwrap(), *ids, "{text:?}");
    }
}

include!("fixtures/llama_cpp_ids.rs");

#[test]
fn chat_template_renders_the_smollm2_format() {
    let model = f32_model();
    let text = model
        .chat_template()
        .unwrap()
        .render(&[ChatMessage::user("Hi there")], true)
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    );
    let text = model
        .chat_template()
        .unwrap()
        .render(
            &[ChatMessage::system("Be brief."), ChatMessage::user("Hi")],
            false,
        )
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
}

#[test]
fn f32_greedy_answer_names_paris() {
    let c = answer(f32_model(), "What is the capital of France?", &greedy(32));
    assert!(c.text.contains("Paris"), "answer: {:?}", c.text);
    assert_eq!(c.finish, FinishReason::Eos);
}

#[test]
fn stop_strings_cut_the_answer_and_are_not_returned() {
    let mut params = greedy(32);
    params.stop = vec!["Paris".into()];
    let mut streamed = String::new();
    let model = f32_model();
    let prompt = model
        .chat_prompt(&[ChatMessage::user("What is the capital of France?")])
        .unwrap();
    let mut session = model.session();
    let c = generate(
        &mut session,
        &model.tokenizer,
        &prompt,
        model.config.context_length,
        &params,
        &mut |t| streamed.push_str(t),
    )
    .unwrap();
    assert_eq!(c.finish, FinishReason::Stop);
    assert!(
        !c.text.contains("Paris") && !c.text.is_empty(),
        "{:?}",
        c.text
    );
    assert_eq!(streamed, c.text);
}

#[test]
fn max_tokens_bounds_the_answer() {
    let c = answer(
        f32_model(),
        "Write a long story about a dragon.",
        &greedy(5),
    );
    assert_eq!(c.tokens.len(), 5);
    assert_eq!(c.finish, FinishReason::Length);
}

#[test]
fn same_seed_gives_the_same_sampled_text() {
    let params = |seed| GenerationParams {
        max_tokens: 24,
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: Some(50),
            top_p: Some(0.95),
            seed,
        },
        stop: vec![],
    };
    let model = f32_model();
    let a = answer(model, "Tell me about cats.", &params(42));
    let b = answer(model, "Tell me about cats.", &params(42));
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.text, b.text);
    let others: Vec<_> = (1..4)
        .map(|s| answer(model, "Tell me about cats.", &params(s)).tokens)
        .collect();
    assert!(
        others.iter().any(|t| *t != a.tokens),
        "every seed gave the same tokens"
    );
}

#[test]
fn three_shards_give_the_same_logits_as_one() {
    let whole = f32_model();
    let split =
        LocalModel::load(&model_path(), WeightFormat::F32, &[0..10, 10..20, 20..30]).unwrap();
    assert_eq!(split.shards.len(), 3);
    let prompt = whole
        .chat_prompt(&[ChatMessage::user("Name three colours.")])
        .unwrap();
    let a = whole.session().forward(&prompt, LogitsAt::All).unwrap();
    let b = split.session().forward(&prompt, LogitsAt::All).unwrap();
    assert_eq!(a.dims(), &[prompt.len(), 49152]);
    let diff = max_abs_diff(&a, &b);
    eprintln!("one shard vs three: max abs diff {diff}");
    assert!(diff <= 1e-4, "max abs diff {diff}");
}

#[test]
fn kv_cache_decode_matches_a_full_recompute() {
    let model = f32_model();
    let prompt = model
        .chat_prompt(&[ChatMessage::user("Count to five.")])
        .unwrap();
    let mut session = model.session();
    let mut logits = session.step(&prompt).unwrap();
    let mut tokens = prompt.clone();
    let mut stepped = Vec::new();
    for _ in 0..8 {
        let next = veil_model::sampling::argmax(&logits);
        tokens.push(next);
        logits = session.step(&[next]).unwrap();
        stepped.push(logits.clone());
    }
    let full = model.session().forward(&tokens, LogitsAt::All).unwrap();
    for (i, step) in stepped.iter().enumerate() {
        let row = full
            .get(prompt.len() + i)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let diff = row
            .iter()
            .zip(step)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("position {}: max abs diff {diff}", prompt.len() + i);
        assert!(
            diff <= 5e-4,
            "position {}: max abs diff {diff}",
            prompt.len() + i
        );
    }
}

#[test]
fn every_weight_format_runs_close_to_f32() {
    let reference = f32_model();
    let prompt = reference
        .chat_prompt(&[ChatMessage::user("Hello!")])
        .unwrap();
    let want = reference
        .session()
        .forward(&prompt, LogitsAt::Last)
        .unwrap();
    for (format, bound) in [
        (WeightFormat::F16, 0.5),
        (WeightFormat::Q8_0, 2.0),
        (WeightFormat::AsStored, 3.0),
    ] {
        let model = LocalModel::load(&model_path(), format, &[]).unwrap();
        let got = model.session().forward(&prompt, LogitsAt::Last).unwrap();
        let diff = max_abs_diff(&want, &got);
        eprintln!("{format}: max abs logit diff from f32 {diff}");
        assert!(
            diff.is_finite() && diff <= bound,
            "{format}: max abs diff {diff}"
        );
    }
}

#[test]
fn shards_reject_inputs_that_do_not_fit() {
    let split = LocalModel::load(&model_path(), WeightFormat::AsStored, &[0..15, 15..30]).unwrap();
    let (first, second) = (&split.shards[0], &split.shards[1]);
    let wrong_width =
        veil_model::Tensor::zeros((3, 100), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    let err = second.forward(
        ShardInput::Hidden(wrong_width),
        &mut second.new_cache(),
        LogitsAt::Last,
    );
    assert!(matches!(err, Err(ModelError::InvalidInput(_))), "{err:?}");
    let err = second.forward(
        ShardInput::Tokens(&[1, 2]),
        &mut second.new_cache(),
        LogitsAt::Last,
    );
    assert!(matches!(err, Err(ModelError::InvalidInput(_))), "{err:?}");
    let err = first.forward(
        ShardInput::Tokens(&[1, 999_999]),
        &mut first.new_cache(),
        LogitsAt::Last,
    );
    assert!(matches!(err, Err(ModelError::InvalidInput(_))), "{err:?}");
}

#[test]
fn prompts_that_do_not_fit_the_context_are_rejected_before_running() {
    let model = f32_model();
    let prompt = vec![42u32; model.config.context_length];
    let err = generate(
        &mut model.session(),
        &model.tokenizer,
        &prompt,
        model.config.context_length,
        &greedy(4),
        &mut |_| {},
    );
    assert!(
        matches!(err, Err(ModelError::ContextOverflow { .. })),
        "{err:?}"
    );
    let err = generate(
        &mut model.session(),
        &model.tokenizer,
        &[],
        model.config.context_length,
        &greedy(4),
        &mut |_| {},
    );
    assert!(matches!(err, Err(ModelError::EmptyPrompt)), "{err:?}");
}

#[test]
fn taps_see_every_block_output_in_order() {
    let whole = f32_model();
    let split = LocalModel::load(&model_path(), WeightFormat::F32, &[0..15, 15..30]).unwrap();
    let prompt = whole.chat_prompt(&[ChatMessage::user("Hi")]).unwrap();
    let mut seen = Vec::new();
    whole.shards[0]
        .forward_tapped(
            ShardInput::Tokens(&prompt),
            &mut whole.shards[0].new_cache(),
            LogitsAt::Last,
            &mut |layer, hidden| {
                seen.push((layer, hidden.clone()));
                Ok(())
            },
        )
        .unwrap();
    assert_eq!(
        seen.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
        (0..30).collect::<Vec<_>>()
    );
    assert!(seen.iter().all(|(_, h)| h.dims() == [prompt.len(), 576]));
    // The tap after block 14 is exactly what the first of two shards hands on.
    let first = &split.shards[0];
    let handed_on = first
        .forward(
            ShardInput::Tokens(&prompt),
            &mut first.new_cache(),
            LogitsAt::Last,
        )
        .unwrap();
    assert_eq!(max_abs_diff(&seen[14].1, &handed_on), 0.0);
    assert!(max_abs_diff(&seen[13].1, &handed_on) > 0.0);
}

#[test]
fn shard_files_hold_only_their_range_and_compute_what_the_whole_model_does() {
    let dir = tempfile::tempdir().unwrap();
    let path = model_path();
    let plan = veil_model::Shard::tiling(&[0..10, 10..20, 20..30], 30).unwrap();
    let mut steps = Vec::new();
    let manifests =
        veil_model::write_shard_files(&path, &plan, dir.path(), &mut |d, t| steps.push((d, t)))
            .unwrap();
    assert_eq!(steps.last(), Some(&(3, 3)));
    assert_eq!(manifests.len(), 3);
    let json = std::fs::read_to_string(dir.path().join("manifest.json")).unwrap();
    let listed: Vec<veil_model::ShardManifest> = serde_json::from_str(&json).unwrap();
    assert_eq!(listed, manifests);

    // Each file names its part, holds no block outside it, and together they are smaller than
    // three copies of the model.
    let mut shards = Vec::new();
    let mut total = 0;
    for m in &manifests {
        let file = dir.path().join(&m.file);
        total += std::fs::metadata(&file).unwrap().len();
        let mut gguf = veil_model::GgufFile::open(&file).unwrap();
        let read = veil_model::ShardManifest::of(&gguf).unwrap();
        assert_eq!(&read, m);
        for name in gguf.content().tensor_infos.keys() {
            if let Some(block) = name.strip_prefix("blk.") {
                let b: usize = block.split('.').next().unwrap().parse().unwrap();
                assert!(m.shard().layers.contains(&b), "{name} in {}", m.file);
            }
        }
        shards.push(
            veil_model::ShardModel::load(&mut gguf, &m.shard(), WeightFormat::AsStored).unwrap(),
        );
    }
    let whole_size = std::fs::metadata(&path).unwrap().len();
    assert!(total < 2 * whole_size, "{total} vs {whole_size}");

    // Bit-identical logits: the blocks were copied, not re-encoded.
    let whole = LocalModel::load(&path, WeightFormat::AsStored, &[]).unwrap();
    let prompt = whole
        .chat_prompt(&[ChatMessage::user("Name three colours.")])
        .unwrap();
    let a = whole.session().forward(&prompt, LogitsAt::Last).unwrap();
    let mut caches: Vec<_> = shards.iter().map(|s| s.new_cache()).collect();
    let b = veil_model::forward_chain(&shards, &mut caches, &prompt, LogitsAt::Last).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);

    // The whole model file describes itself as the whole model.
    let whole_info = veil_model::ShardManifest::of(&veil_model::GgufFile::open(&path).unwrap());
    assert_eq!(whole_info.unwrap().model_digest, manifests[0].model_digest);
}
