//! `veil demo`: fetch the model, run it as a chain of shards, answer a prompt.

use anyhow::Result;
use clap::Args;
use veil_model::{generate, ChatMessage, GenerationParams, LayerRange, WeightFormat};

use crate::args::ModelArgs;
use crate::commands::generate::{print_stats, StdoutStream};

/// Arguments of `veil demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// The question to answer.
    #[arg(long, default_value = "What is the capital of France?")]
    pub prompt: String,

    /// The most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
}

/// Runs `veil demo`.
pub fn run(args: DemoArgs) -> Result<()> {
    let model_args = ModelArgs {
        model: None,
        // F32 weights: the shipped Q4_1 file is at a near-tie on this prompt's first token.
        dtype: WeightFormat::F32,
        layers: ["0-10", "10-20", "20-30"]
            .iter()
            .map(|r| r.parse::<LayerRange>())
            .collect::<Result<_, _>>()?,
        threads: None,
    };
    eprintln!("veil demo: the default model, split into three shards, answers one prompt.");
    let model = model_args.load()?;
    for shard in &model.shards {
        eprintln!("  shard {shard}", shard = shard.shard());
    }
    let prompt = model.chat_prompt(&[ChatMessage::user(args.prompt.clone())])?;
    eprintln!(
        "prompt: {:?} ({} tokens with the chat template)",
        args.prompt,
        prompt.len()
    );
    let params = GenerationParams {
        max_tokens: args.max_tokens,
        ..GenerationParams::default()
    };
    let mut session = model.session();
    let mut out = StdoutStream::default();
    let completion = generate(
        &mut session,
        &model.tokenizer,
        &prompt,
        model.config.context_length,
        &params,
        &mut |t| out.write(t),
    )?;
    out.finish()?;
    print_stats(&completion);
    Ok(())
}
