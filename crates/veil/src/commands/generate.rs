//! `veil generate`: answer one prompt, streaming the text to stdout.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use veil_model::{generate, ChatMessage, Completion, LocalModel, ModelError, TokenStep};

use crate::args::{ModelArgs, SamplingArgs};
use crate::commands::evidence_file::write_evidence;
use crate::commands::swarm::{describe_route, open_chain, SwarmArgs};

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

    /// Run this encrypted model (from `veil ee encrypt`); `--model` then only supplies the
    /// tokenizer and chat template, which stay on this side.
    #[arg(long, value_name = "PATH", requires = "key")]
    pub encrypted: Option<PathBuf>,

    /// The key the encrypted model was made with.
    #[arg(long, value_name = "PATH", requires = "encrypted")]
    pub key: Option<PathBuf>,

    /// Acceleration method: `auto` (MetaInf's selector picks one for this request and logs
    /// it), or a method from `veil meta methods`. Local plaintext generation only.
    #[arg(long, default_value = "auto")]
    pub accel: String,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub sampling: SamplingArgs,

    #[command(flatten)]
    pub swarm: SwarmArgs,

    #[command(flatten)]
    pub verify: VerifyArgs,
}

/// Verified generation through the swarm.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Have a committee of N whole-model nodes check the answer: one generates, the others
    /// recompute it and vote; the answer is shown only once a majority accepts it.
    #[arg(long, value_name = "N", requires = "bootstrap")]
    pub verify: Option<usize>,
    /// Verify a split chain instead of whole-model nodes: the answer goes through a chain of
    /// exact shard nodes, each hop signs what it was sent and handed on, and N-1 other nodes
    /// serving the same blocks replay each hop.
    #[arg(long, requires = "verify")]
    pub chain: bool,
    /// Public seed mixed into the committee choice.
    #[arg(long, default_value = "veil", requires = "verify")]
    pub committee_seed: String,
    /// The request id (64 hex digits; default: random). Fixing it fixes the committee.
    #[arg(long, requires = "verify")]
    pub request_id: Option<String>,
    /// Where to write evidence against nodes caught lying (default: $VEIL_HOME/evidence).
    #[arg(long, requires = "verify")]
    pub evidence_dir: Option<PathBuf>,
    /// This client's database of node reputations (default: $VEIL_HOME/client.redb): nodes a
    /// committee caught lying are left out of committees and of plain routes.
    #[arg(long, requires = "bootstrap")]
    pub state: Option<PathBuf>,
    /// Recompute here, loading the whole model, any answer the committee rejects, before
    /// anyone is punished: judges that failed an answer that passes here are avoided instead,
    /// and the answer stands (against a majority of Sybils framing honest nodes).
    #[arg(long, requires = "verify", conflicts_with = "chain")]
    pub recheck: bool,
}

/// Runs `veil generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let params = args.sampling.params()?;
    if args.prompt.trim().is_empty() {
        return Err(ModelError::EmptyPrompt.into());
    }
    let remote = args.verify.verify.is_some() || !args.swarm.bootstrap.is_empty();
    if (remote || args.encrypted.is_some()) && !matches!(args.accel.as_str(), "auto" | "plain") {
        bail!("--accel {} applies to local plaintext generation; on the swarm and for encrypted models each node runs its own kernels", args.accel);
    }
    if args.verify.verify.is_some() {
        return run_verified(&args, &params);
    }
    if !args.swarm.bootstrap.is_empty() {
        return run_on_swarm(&args, &params);
    }
    if args.encrypted.is_none() {
        return run_accelerated(&args, &params);
    }
    let (model, encrypted) = match (&args.encrypted, &args.key) {
        (Some(enc), Some(key)) => {
            let key = crate::commands::ee::read_key(key)?;
            let text = LocalModel::open_text(&args.model.resolve_path()?)?;
            let shards = crate::commands::ee::load_encrypted(enc, &key, &args.model)?;
            (text, Some((key, shards)))
        }
        _ => (args.model.load()?, None),
    };
    let prompt = prompt_ids(&args, &model)?;
    let mut local;
    let mut blind;
    let session: &mut dyn TokenStep = match &encrypted {
        Some((key, shards)) => {
            blind = veil_ee::EncryptedSession::new(key, shards);
            &mut blind
        }
        None => {
            local = model.session();
            &mut local
        }
    };
    answer(session, &model, &prompt, &params)?;
    Ok(())
}

/// Local plaintext generation with the acceleration method `--accel` names or the selector
/// picks.
fn run_accelerated(args: &GenerateArgs, params: &veil_model::GenerationParams) -> Result<()> {
    let path = args.model.resolve_path()?;
    let text = LocalModel::open_text(&path)?;
    let prompt = prompt_ids(args, &text)?;
    let features = veil_meta::Features {
        model: crate::accel::model_features(&text, &path),
        hardware: crate::accel::hardware_features(1.0),
        workload: veil_meta::WorkloadFeatures {
            prompt_tokens: prompt.len().max(1) as u32,
            output_tokens: params.max_tokens.max(1) as u32,
            batch: 1,
            shared_prefix: 0.0,
            rewrite: false,
        },
    };
    let selector = match args.accel.as_str() {
        "auto" => match crate::commands::meta::load_selector() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("no selector ({e:#}); running the plain method");
                None
            }
        },
        _ => None,
    };
    // `auto` keeps the answer exact: it chooses among methods for the format --dtype names.
    // A format change (another answer, another quality) happens only when asked for.
    let pick = match args.accel.as_str() {
        "auto" => crate::accel::pick_method(
            "auto",
            selector.as_ref(),
            &features,
            Some(&args.model.dtype.to_string()),
        )?,
        forced => crate::accel::pick_method(
            forced,
            None,
            &features,
            (args.model.dtype != veil_model::WeightFormat::AsStored)
                .then(|| args.model.dtype.to_string())
                .as_deref(),
        )?,
    };
    tracing::info!("accel: {} ({})", pick.method.name, pick.why);
    let mut model_args = args.model.clone();
    if args.accel != "auto" {
        model_args.dtype = crate::accel::format_of(pick.method)?;
    }
    let model = model_args.load()?;
    let mut out = StdoutStream::default();
    let (completion, _) = veil_model::generate_accelerated(
        &mut model.session(),
        &model.tokenizer,
        &prompt,
        model.config.context_length,
        params,
        &crate::accel::accel_of(pick.method),
        &mut |text| out.write(text),
    )?;
    out.finish()?;
    print_stats(&completion);
    eprintln!("accel: {} ({})", pick.method.name, pick.why);
    Ok(())
}

/// The prompt's token ids: chat-formatted unless `--raw`.
fn prompt_ids(args: &GenerateArgs, model: &LocalModel) -> Result<Vec<u32>> {
    Ok(if args.raw {
        model.raw_prompt(&args.prompt)?
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::system(system.clone()));
        }
        messages.push(ChatMessage::user(args.prompt.clone()));
        model.chat_prompt(&messages)?
    })
}

/// Generates from `prompt`, streaming to stdout, with the stats line on stderr.
fn answer(
    session: &mut dyn TokenStep,
    model: &LocalModel,
    prompt: &[u32],
    params: &veil_model::GenerationParams,
) -> Result<Completion> {
    let mut out = StdoutStream::default();
    let completion = generate(
        session,
        &model.tokenizer,
        prompt,
        model.config.context_length,
        params,
        &mut |text| out.write(text),
    )?;
    out.finish()?;
    print_stats(&completion);
    Ok(completion)
}

/// `veil generate --bootstrap ...`: the same answer, computed by the swarm's nodes.
fn run_on_swarm(args: &GenerateArgs, params: &veil_model::GenerationParams) -> Result<()> {
    let text_model = args.model.resolve_path()?;
    let model = LocalModel::open_text(&text_model)?;
    let key = match &args.key {
        Some(key) => Some(crate::commands::ee::read_key(key)?),
        None => None,
    };
    // Nodes serve shards of the file the client names: the encrypted one when there is a key.
    let served = args.encrypted.clone().unwrap_or(text_model);
    let runtime = crate::commands::network_runtime::runtime()?;
    let mut chain = open_chain(
        &runtime,
        &args.swarm,
        &served,
        args.model.dtype,
        &avoided(args.verify.state.as_deref()),
    )?;
    let prompt = prompt_ids(args, &model)?;
    let result = match &key {
        Some(key) => answer(
            &mut veil_ee::EncryptedStep::new(key, &mut chain),
            &model,
            &prompt,
            params,
        ),
        None => answer(&mut chain, &model, &prompt, params),
    };
    for line in describe_route(&chain) {
        eprintln!("route: {line}");
    }
    for f in chain.failovers() {
        let (first, end) = f.blocks;
        let moved = match f.from == f.to {
            true => format!("reached {} again", f.to),
            false => format!("moved from {} to {}", f.from, f.to),
        };
        eprintln!(
            "failover: blocks {first}-{end} {moved} after {} ({} steps replayed)",
            f.reason, f.replayed_steps
        );
    }
    chain.close();
    result.map(|_| ())
}

/// Nodes this client's database says a committee caught lying. The database is read if it can
/// be opened; another `veil` process holding it (a gateway, a verified run) leaves this route
/// without the list, with a warning.
fn avoided(state: Option<&std::path::Path>) -> std::collections::HashSet<libp2p::PeerId> {
    let path = state.map_or_else(
        || {
            veil_model::ModelStore::from_env()
                .home()
                .join("client.redb")
        },
        std::path::Path::to_path_buf,
    );
    if !path.exists() {
        return Default::default();
    }
    match veil_net::NodeState::open(&path).and_then(|s| s.avoided()) {
        Ok(avoid) => avoid,
        Err(e) => {
            eprintln!(
                "warning: cannot read the liars to avoid from {}: {e}",
                path.display()
            );
            Default::default()
        }
    }
}

/// `veil generate --bootstrap ... --verify N`: a committee generates and checks the answer.
fn run_verified(args: &GenerateArgs, params: &veil_model::GenerationParams) -> Result<()> {
    let size = args.verify.verify.unwrap_or(0);
    if args.swarm.client_layers.is_some() {
        bail!("--verify works with whole-model nodes; drop --client-layers");
    }
    if size < 2 {
        bail!("--verify needs a committee of at least 2 (one generates, one judges)");
    }
    let request_id = request_id(args)?;
    if args.verify.chain {
        if args.encrypted.is_some() {
            bail!("--chain verifies plaintext split chains; drop --encrypted");
        }
        return run_verified_chain(args, params, size - 1, request_id);
    }
    let path = args.model.resolve_path()?;
    let model = LocalModel::open_text(&path)?;
    let prompt = prompt_ids(args, &model)?;
    // With a key, the committee serves the encrypted file and works in the key's token order;
    // the plaintext model only supplies the tokenizer.
    let (served, order): (PathBuf, Box<dyn veil_model::TokenOrder + Sync>) =
        match (&args.encrypted, &args.key) {
            (Some(encrypted), Some(key)) => {
                let key = crate::commands::ee::read_key(key)?;
                veil_ee::check_key(&veil_model::GgufFile::open(encrypted)?, &key)?;
                (
                    encrypted.clone(),
                    Box::new(veil_ee::EncryptedOrder::new(&key)),
                )
            }
            _ => (path.clone(), Box::new(veil_model::PlainOrder)),
        };
    let admission = args.swarm.admission(&served, None)?;
    let (state, evidence_dir) = verification_records(args)?;
    let (runtime, client) = verification_client(args)?;
    let digest = veil_model::store::file_digest(&served)?.1;
    let local = veil_verify::LocalRecheck::new(served.clone());
    let recheck = |job: &veil_verify::Job| local.passes(job);
    let request = veil_net::VerifiedRequest {
        model_digest: &digest,
        prompt: &prompt,
        order: order.as_ref(),
        params,
        context_length: model.config.context_length,
        size,
        seed: &args.verify.committee_seed,
        request_id: request_id.clone(),
        gate: admission.as_deref(),
        cancelled: &|| false,
        recheck: match args.verify.recheck {
            true => Some(&recheck),
            false => None,
        },
    };
    let (outcome, written) = keeping_evidence(&evidence_dir, |keep| {
        veil_net::generate_verified(
            &client,
            runtime.handle(),
            &model.tokenizer,
            &request,
            Some(&state),
            keep,
        )
    })?;
    let answer = outcome.context("verified generation failed")?;
    show(&answer.completion)?;
    eprintln!(
        "request {request_id}: committee {} ({} commitments)",
        answer.committee.join(", "),
        answer.mode
    );
    eprintln!(
        "accepted the answer of {}: passed by {} of {} judges; generation {:.2} s, judging {:.2} s",
        answer.generator,
        answer.tally.passed.len(),
        answer.tally.passed.len() + answer.tally.failed.len(),
        answer.generate_time.as_secs_f64(),
        answer.judge_time.as_secs_f64()
    );
    for (peer, verdict) in &answer.tally.failed {
        eprintln!("  dissent from {peer}: {verdict}");
    }
    if !answer.overruled.is_empty() {
        eprintln!(
            "  the answer recomputes here, so the judges that failed it lied and are avoided from now on: {}",
            answer.overruled.join(", ")
        );
    }
    for (file, record) in written.iter().zip(&answer.evidence) {
        eprintln!(
            "caught {} lying: evidence in {} (re-check: veil verify-evidence {})",
            record.job.body.generator,
            file.display(),
            file.display()
        );
    }
    Ok(())
}

/// Runs a verified request, writing each piece of evidence it makes to `dir` at once: before
/// the answer is reported, so evidence survives a failed request. Returns the request's
/// outcome and the files written.
fn keeping_evidence<T, J: veil_verify::Judged>(
    dir: &std::path::Path,
    request: impl FnOnce(&mut dyn FnMut(&veil_verify::Evidence<J>)) -> veil_net::Result<T>,
) -> Result<(veil_net::Result<T>, Vec<PathBuf>)> {
    let mut written = Vec::new();
    let outcome = request(&mut |record| written.push(write_evidence(dir, record)));
    let written = written.into_iter().collect::<Result<Vec<_>>>()?;
    Ok((outcome, written))
}

/// Prints an accepted verified answer and its speed.
fn show(completion: &veil_model::Completion) -> Result<()> {
    let mut out = StdoutStream::default();
    out.write(&completion.text);
    out.finish()?;
    print_stats(completion);
    Ok(())
}

/// The async runtime and a client joined to the swarm, for a verified request (judging can
/// take a while: two minutes per request).
fn verification_client(
    args: &GenerateArgs,
) -> Result<(tokio::runtime::Runtime, veil_net::SwarmClient)> {
    let runtime = crate::commands::network_runtime::runtime()?;
    let client = runtime.block_on(args.swarm.connect(
        std::time::Duration::from_secs(120),
        std::time::Duration::from_secs(10),
    ))?;
    Ok((runtime, client))
}

/// `--request-id`, or a fresh random one.
fn request_id(args: &GenerateArgs) -> Result<String> {
    Ok(match &args.verify.request_id {
        Some(id) if veil_verify::is_request_id(id) => id.to_lowercase(),
        Some(id) => bail!("--request-id must be 64 hex digits, got {id:?}"),
        None => veil_verify::random_request_id(),
    })
}

/// The client's reputation database and evidence folder (`--state`, `--evidence-dir`).
fn verification_records(args: &GenerateArgs) -> Result<(veil_net::NodeState, PathBuf)> {
    let home = veil_model::ModelStore::from_env().home().to_path_buf();
    let state = veil_net::NodeState::open(
        &args
            .verify
            .state
            .clone()
            .unwrap_or_else(|| home.join("client.redb")),
    )?;
    let evidence = args
        .verify
        .evidence_dir
        .clone()
        .unwrap_or_else(|| home.join("evidence"));
    Ok((state, evidence))
}

/// `veil generate --bootstrap ... --verify N --chain`: a split chain generates, and `judges`
/// other nodes serving each hop's blocks replay that hop.
fn run_verified_chain(
    args: &GenerateArgs,
    params: &veil_model::GenerationParams,
    judges: usize,
    request_id: String,
) -> Result<()> {
    let path = args.model.resolve_path()?;
    let model = LocalModel::open_text(&path)?;
    let prompt = prompt_ids(args, &model)?;
    let admission = args.swarm.admission(&path, None)?;
    let (state, evidence_dir) = verification_records(args)?;
    let (runtime, client) = verification_client(args)?;
    let digest = veil_model::store::file_digest(&path)?.1;
    let request = veil_net::VerifiedChainRequest {
        model_digest: &digest,
        block_count: model.config.block_count,
        prompt: &prompt,
        params,
        context_length: model.config.context_length,
        judges,
        seed: &args.verify.committee_seed,
        request_id: request_id.clone(),
        gate: admission,
        cancelled: &|| false,
    };
    let (outcome, written) = keeping_evidence(&evidence_dir, |keep| {
        veil_net::generate_verified_chain(
            &client,
            runtime.handle(),
            &model.tokenizer,
            &request,
            Some(&state),
            keep,
        )
    })?;
    let answer = outcome.context("verified chain generation failed")?;
    show(&answer.completion)?;
    eprintln!(
        "request {request_id}: every hop replayed by its judges; generation {:.2} s, judging {:.2} s",
        answer.generate_time.as_secs_f64(),
        answer.judge_time.as_secs_f64()
    );
    for hop in &answer.hops {
        eprintln!(
            "  blocks {:>2}-{:<2} on {}: passed by {} of {} judges ({} bytes of signed digests)",
            hop.blocks.0,
            hop.blocks.1,
            hop.node,
            hop.tally.passed.len(),
            hop.tally.passed.len() + hop.tally.failed.len(),
            hop.commitment_bytes
        );
    }
    for (file, record) in written.iter().zip(&answer.evidence) {
        eprintln!(
            "caught hop {} (blocks {}-{}) lying: evidence in {}",
            record.job.body.node,
            record.job.body.first_block,
            record.job.body.end_block,
            file.display()
        );
    }
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
    // The first token comes with the prompt; a decode speed needs at least one more.
    let decode = match c.tokens.len() {
        0 | 1 => String::new(),
        n => format!(" at {:.1} tok/s", rate(n - 1, c.decode_time)),
    };
    eprintln!(
        "[{} prompt tokens at {:.1} tok/s, {} generated{decode}, finish: {}]",
        c.prompt_tokens,
        rate(c.prompt_tokens, c.prefill_time),
        c.tokens.len(),
        c.finish
    );
}
