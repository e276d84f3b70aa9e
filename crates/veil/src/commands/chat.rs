//! `veil chat`: a REPL that keeps the conversation and its KV cache between turns.

use std::io::{BufRead, Write};

use anyhow::Result;
use clap::Args;
use veil_model::{generate, ChatMessage};

use crate::args::{ModelArgs, SamplingArgs};
use crate::commands::generate::{print_stats, StdoutStream};

/// Arguments of `veil chat`.
#[derive(Args, Debug)]
pub struct ChatArgs {
    /// A system prompt (default: the model's own).
    #[arg(long)]
    pub system: Option<String>,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Runs `veil chat`.
pub fn run(args: ChatArgs) -> Result<()> {
    let params = args.sampling.params()?;
    let model = args.model.load()?;
    let mut messages: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|s| ChatMessage::system(s.clone()))
        .collect();
    let mut session = model.session();
    // Tokens already in the session's cache: a new turn only feeds what follows them.
    let mut cached: Vec<u32> = Vec::new();

    eprintln!("veil chat: type a message; /reset forgets the conversation, /exit or Ctrl-D quits.");
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        print!("you> ");
        std::io::stdout().flush()?;
        let Some(line) = lines.next() else { break };
        let line = line?;
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.retain(|m| m.role == "system");
                session.reset();
                cached.clear();
                eprintln!("(conversation forgotten)");
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::user(line));
        let prompt = model.chat_prompt(&messages)?;
        if !prompt.starts_with(&cached) {
            session.reset();
            cached.clear();
        }
        let new = &prompt[cached.len()..];
        let room = model.config.context_length - session.position();
        print!("veil> ");
        let mut out = StdoutStream::default();
        let completion = match generate(
            &mut session,
            &model.tokenizer,
            new,
            room,
            &params,
            &mut |t| out.write(t),
        ) {
            Ok(c) => c,
            Err(e) => {
                // The turn failed (context full, say): forget it and keep the REPL alive.
                messages.pop();
                session.reset();
                cached.clear();
                eprintln!("\nveil: {e}");
                continue;
            }
        };
        out.finish()?;
        print_stats(&completion);
        cached.extend_from_slice(new);
        // Every sampled token but the last was fed back into the cache.
        cached.extend_from_slice(&completion.tokens[..completion.tokens.len().saturating_sub(1)]);
        messages.push(ChatMessage::assistant(completion.text));
    }
    Ok(())
}
