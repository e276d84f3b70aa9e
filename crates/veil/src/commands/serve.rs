//! `veil serve`: the OpenAI-compatible gateway.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::args::ModelArgs;
use crate::gateway::openai::VeilInfo;
use crate::gateway::{Gateway, Limits};

/// Arguments of `veil serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Run the model in this process. (The gateway in front of the swarm comes later; for now
    /// this flag is required.)
    #[arg(long)]
    pub local: bool,

    /// Address to listen on (loopback by default: the gateway holds your keys).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Generations running at once; more requests wait in arrival order.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub max_concurrent: u16,

    /// Requests allowed to wait; more are answered 429.
    #[arg(long, default_value_t = 16)]
    pub max_queued: usize,

    /// Largest request body in bytes; larger ones are answered 413.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,

    /// Largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tokens: u32,

    #[command(flatten)]
    pub model: ModelArgs,
}

/// Runs `veil serve` until interrupted.
pub fn run(args: ServeArgs) -> Result<()> {
    if !args.local {
        bail!(
            "veil serve needs --local for now: the gateway in front of the swarm is not built yet"
        );
    }
    let path = args.model.resolve_path()?;
    let model = args.model.load()?;
    let model_id = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let model_id = model_id.split('.').next().unwrap_or(&model_id).to_string();
    let info = VeilInfo {
        mode: "local",
        format: args.model.dtype.to_string(),
        kernels: args.model.kernels.to_string(),
        tokens_per_second: 0.0,
    };
    let limits = Limits {
        max_concurrent: usize::from(args.max_concurrent),
        max_queued: args.max_queued,
        max_body_bytes: args.max_body_bytes,
        max_tokens: args.max_tokens as usize,
    };
    let gateway = Arc::new(Gateway::new(model, model_id.clone(), info, limits));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        println!(
            "veil gateway listening on http://{addr} (model {model_id}, OpenAI API under /v1)"
        );
        use std::io::Write;
        std::io::stdout().flush()?;
        axum::serve(listener, gateway.router())
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("the gateway stopped")
    })
}
