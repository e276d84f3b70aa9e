//! `veil generate`: answer one prompt, streaming the text to stdout.

use std::io::Write;

use anyhow::Result;
use clap::Args;
use veil_model::{generate, ChatMessage, Completion, ModelError};

use crate::args::{ModelArgs, SamplingArgs};

/// Arguments of `veil generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// The prompt to answer.
    #[arg(long, short)]
    pub prompt: String,

    /// A system prompt (default: the model's own).
    #[arg(long)]
    pub system: Option<String>,

    /// Complete the prompt as plain text, without the chat template.
    #[arg(long)]
    pub raw: bool,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Runs `veil generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let params = args.sampling.params()?;
    if args.prompt.trim().is_empty() {
        return Err(ModelError::EmptyPrompt.into());
    }
    let model = args.model.load()?;
    let prompt = if args.raw {
        model.tokenizer.encode(&args.prompt)?
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::system(system.clone()));
        }
        messages.push(ChatMessage::user(args.prompt.clone()));
        model.chat_prompt(&messages)?
    };
    let mut session = model.session();
    let mut out = StdoutStream::default();
    let completion = generate(
        &mut session,
        &model.tokenizer,
        &prompt,
        model.config.context_length,
        &params,
        &mut |text| out.write(text),
    )?;
    out.finish()?;
    print_stats(&completion);
    Ok(())
}

/// Streams text to stdout, remembering the first write error (a closed pipe, say) so the
/// generation loop need not handle I/O.
#[derive(Default)]
pub struct StdoutStream {
    error: Option<std::io::Error>,
}

impl StdoutStream {
    /// Writes and flushes one piece of text.
    pub fn write(&mut self, text: &str) {
        if self.error.is_none() {
            let mut stdout = std::io::stdout().lock();
            if let Err(e) = stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
            {
                self.error = Some(e);
            }
        }
    }

    /// Ends the line and reports any write error.
    pub fn finish(mut self) -> std::io::Result<()> {
        self.write("\n");
        self.error.map_or(Ok(()), Err)
    }
}

/// One line on stderr: token counts, speeds and why generation stopped.
pub fn print_stats(c: &Completion) {
    let rate = |n: usize, t: std::time::Duration| n as f64 / t.as_secs_f64().max(1e-9);
    eprintln!(
        "[{} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s, finish: {:?}]",
        c.prompt_tokens,
        rate(c.prompt_tokens, c.prefill_time),
        c.tokens.len(),
        rate(c.tokens.len().saturating_sub(1), c.decode_time),
        c.finish
    );
}
