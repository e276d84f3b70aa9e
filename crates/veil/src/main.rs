//! `veil`: the command-line face of Veil.
//!
//! Each subcommand lives in its own module under `commands/`; this file parses the command line,
//! sets up logging and threads, and turns errors into a message and an exit code.

mod args;
mod commands;
mod progress;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Private, verifiable, fast LLM inference on a swarm nobody has to trust.
#[derive(Parser)]
#[command(name = "veil", version, about, long_about = None)]
struct Cli {
    /// Log filter for stderr (e.g. `info`, `veil_model=debug`); also read from VEIL_LOG.
    #[arg(
        long,
        global = true,
        env = "VEIL_LOG",
        default_value = "warn,libp2p_kad=error"
    )]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer one prompt, streaming the text.
    Generate(Box<commands::generate::GenerateArgs>),
    /// Talk with the model; the conversation is kept between turns.
    Chat(commands::chat::ChatArgs),
    /// Measure prefill and decode speed and peak memory.
    Bench(commands::bench_args::BenchArgs),
    /// Fetch and list cached models.
    Models {
        #[command(subcommand)]
        command: commands::models::ModelsCommand,
    },
    /// Equivariant encryption: keys and encrypted models.
    Ee {
        #[command(subcommand)]
        command: commands::ee::EeCommand,
    },
    /// Cut a model into shard files, one per layer range, for nodes to serve.
    Shard(commands::swarm::ShardArgs),
    /// Serve a shard to the swarm.
    Node(commands::swarm::NodeArgs),
    /// Verification: calibration and detection figures, benchmark.
    Verify {
        #[command(subcommand)]
        command: commands::verify::VerifyCommand,
    },
    /// Re-check an evidence file offline: signatures, then the answer recomputed.
    VerifyEvidence(commands::verify::EvidenceArgs),
    /// Run the whole pipeline on this machine and show what happens.
    Demo(commands::demo::DemoArgs),
    /// An OpenAI-compatible HTTP gateway: point any OpenAI client at it.
    Serve(commands::serve::ServeArgs),
    /// MetaInf: measure acceleration methods, train and evaluate the selector.
    Meta {
        #[command(subcommand)]
        command: commands::meta::MetaCommand,
    },
    /// TEE attestation: verify evidence against a policy, obtain this machine's.
    Tee {
        #[command(subcommand)]
        command: commands::tee::TeeCommand,
    },
    /// Model commitments: print them, challenge nodes to prove the weights they hold.
    Zk {
        #[command(subcommand)]
        command: commands::zk::ZkCommand,
    },
}

fn main() -> ExitCode {
    veil_kernels::keep_freed_buffers();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let result = match cli.command {
        Command::Generate(args) => commands::generate::run(*args),
        Command::Chat(args) => commands::chat::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Serve(args) => commands::serve::run(args),
        Command::Models { command } => commands::models::run(command),
        Command::Ee { command } => commands::ee::run(command),
        Command::Shard(args) => commands::swarm::shard(args),
        Command::Node(args) => commands::swarm::node(args),
        Command::Demo(args) => commands::demo::run(args),
        Command::Verify { command } => commands::verify::run(command),
        Command::VerifyEvidence(args) => commands::verify::verify_evidence(args),
        Command::Meta { command } => commands::meta::run(command),
        Command::Tee { command } => commands::tee::run(command),
        Command::Zk { command } => commands::zk::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("veil: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// A closed stdout (`veil generate ... | head`) is the reader's choice, not an error.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    /// No command takes two arguments of one name: flattened groups (the swarm's arguments in
    /// `veil serve`, say) could clash unseen, and clap checks this only in debug builds.
    #[test]
    fn no_command_has_two_arguments_of_one_name() {
        use clap::CommandFactory;
        fn check(command: &clap::Command) {
            let mut seen = std::collections::HashSet::new();
            for long in command.get_arguments().filter_map(|a| a.get_long()) {
                assert!(
                    seen.insert(long),
                    "veil {} takes --{long} twice",
                    command.get_name()
                );
            }
            command.get_subcommands().for_each(check);
        }
        check(&super::Cli::command());
    }
}
