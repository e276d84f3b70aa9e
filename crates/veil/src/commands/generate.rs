//! `veil generate`: answer one prompt, streaming the text to stdout.

use std::io::Write;
use std::path::PathBuf;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use veil_model::{ChatMessage, Completion, LocalModel, ModelError};
use veil_serve::backend::{
    Answer, Backend, Committee, EncryptedLocal, LocalBackend, Request, Route, Seating, SwarmChain,
    SwarmConnection, Verification, VerifiedChain,
};
use veil_serve::key_rotation::{KeyedModel, Privacy};

use crate::args::{ModelArgs, SamplingArgs};
use crate::commands::swarm::{client_split, failover_lines, route_lines, SwarmArgs};

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

/// Runs `veil generate`: builds the backend the arguments name, runs the prompt through it,
/// and reports the answer and how it was made.
pub fn run(args: GenerateArgs) -> Result<()> {
    let params = args.sampling.params()?;
    if args.prompt.trim().is_empty() {
        return Err(ModelError::EmptyPrompt.into());
    }
    let remote = args.verify.verify.is_some() || !args.swarm.bootstrap.is_empty();
    if (remote || args.encrypted.is_some()) && !matches!(args.accel.as_str(), "auto" | "plain") {
        bail!("--accel {} applies to local plaintext generation; on the swarm and for encrypted models each node runs its own kernels", args.accel);
    }
    let built = build(&args)?;
    let prompt = prompt_ids(&args, &built.text)?;
    let request = Request {
        prompt: &prompt,
        params: &params,
        method: built.method,
        prefixes: None,
        cancelled: &|| false,
    };
    let mut out = StdoutStream::default();
    let result = built
        .backend
        .generate(&request, &mut |text| out.write(text));
    let answer = match (result, &built.verified) {
        (Ok(answer), _) => answer,
        (Err(e), Some(what)) => return Err(anyhow::Error::new(e).context(format!("{what} failed"))),
        (Err(e), None) => return Err(e.into()),
    };
    out.finish()?;
    print_stats(&answer.completion);
    report(&answer, built.request_id.as_deref())
}

/// A backend built from the command line, with what running and reporting it needs.
struct Built {
    backend: Box<dyn Backend>,
    /// The plaintext model's tokenizer and template (and weights, for a local model).
    text: Arc<LocalModel>,
    /// The method `--accel` forces, for a local plaintext model.
    method: Option<&'static veil_meta::Method>,
    /// For a verified request: its id, and what to call it when it fails.
    request_id: Option<String>,
    verified: Option<&'static str>,
    /// The runtime the swarm client runs on, kept alive while the backend runs.
    _runtime: Option<tokio::runtime::Runtime>,
}

/// The backend the arguments name: a committee or verified chain (`--verify`), a chain of
/// nodes (`--bootstrap`), an encrypted model here (`--encrypted`), or the plaintext model here.
fn build(args: &GenerateArgs) -> Result<Built> {
    if let Some(size) = args.verify.verify {
        return build_verified(args, size);
    }
    if !args.swarm.bootstrap.is_empty() {
        return build_swarm(args);
    }
    if let (Some(encrypted), Some(key)) = (&args.encrypted, &args.key) {
        let key = crate::commands::ee::read_key(key)?;
        let text = Arc::new(LocalModel::open_text(&args.model.resolve_path()?)?);
        let shards = crate::commands::ee::load_encrypted(encrypted, &key, &args.model)?;
        let keyed = Arc::new(KeyedModel::new(Privacy::new(key, shards), None));
        return Ok(Built {
            backend: Box::new(EncryptedLocal::new(Arc::clone(&text), keyed)),
            text,
            method: None,
            request_id: None,
            verified: None,
            _runtime: None,
        });
    }
    build_local(args)
}

/// The plaintext model here, with the acceleration method `--accel` names or the selector
/// picks (`auto`, which keeps the answer exact: it chooses among methods for the format
/// `--dtype` names; a format change happens only when asked for).
fn build_local(args: &GenerateArgs) -> Result<Built> {
    let path = args.model.resolve_path()?;
    let mut model_args = args.model.clone();
    let (selector, method) = match args.accel.as_str() {
        "auto" => match crate::commands::meta::load_selector() {
            Ok(s) => (Some(s), None),
            Err(e) => {
                tracing::warn!("no selector ({e:#}); running the plain method");
                (None, None)
            }
        },
        forced => {
            let method = veil_meta::method(forced)?;
            if args.model.dtype != veil_model::WeightFormat::AsStored
                && method.format != args.model.dtype.to_string()
            {
                bail!(
                    "--accel {forced} runs {} weights but the model is loaded as {}",
                    method.format,
                    args.model.dtype
                );
            }
            model_args.dtype = veil_serve::accel::format_of(method)?;
            (None, Some(method))
        }
    };
    let model = Arc::new(model_args.load()?);
    let selector = selector.map(|s| (s, veil_serve::accel::model_features(&model, &path)));
    let backend = LocalBackend::new(Arc::clone(&model), args.model.dtype.to_string(), selector);
    Ok(Built {
        backend: Box::new(backend),
        text: model,
        method,
        request_id: None,
        verified: None,
        _runtime: None,
    })
}

/// `veil generate --bootstrap ...`: the same answer, computed by a chain of the swarm's nodes
/// (serving the encrypted file when there is a key), split with this process under
/// `--client-layers`.
fn build_swarm(args: &GenerateArgs) -> Result<Built> {
    let path = args.model.resolve_path()?;
    let text = Arc::new(LocalModel::open_text(&path)?);
    let key = match &args.key {
        Some(key) => Some(Arc::new(KeyedModel::new(
            Privacy::new(crate::commands::ee::read_key(key)?, Vec::new()),
            None,
        ))),
        None => None,
    };
    // Nodes serve shards of the file the client names: the encrypted one when there is a key.
    let served = args.encrypted.clone().unwrap_or(path);
    let split = client_split(&args.swarm, &served, args.model.dtype)?;
    let runtime = crate::commands::network_runtime::runtime()?;
    let connection = connect(
        args,
        &runtime,
        &served,
        &text,
        read_liars(args.verify.state.as_deref()),
        Duration::from_secs(60),
    )?;
    let mut chain = SwarmChain::new(Arc::new(connection), key);
    if let Some((front, head)) = split {
        chain = chain.split_with(front, head);
    }
    Ok(Built {
        backend: Box::new(chain),
        text,
        method: None,
        request_id: None,
        verified: None,
        _runtime: Some(runtime),
    })
}

/// `veil generate --bootstrap ... --verify N [--chain]`: a committee generates and checks the
/// answer, or a split chain generates and `N - 1` other nodes serving each hop's blocks
/// replay that hop. With a key, the committee serves the encrypted file and works in the
/// key's token order; the plaintext model only supplies the tokenizer.
fn build_verified(args: &GenerateArgs, size: usize) -> Result<Built> {
    if args.swarm.client_layers.is_some() {
        bail!("--verify works with whole-model nodes; drop --client-layers");
    }
    if size < 2 {
        bail!("--verify needs a committee of at least 2 (one generates, one judges)");
    }
    if args.verify.chain && args.encrypted.is_some() {
        bail!("--chain verifies plaintext split chains; drop --encrypted");
    }
    let request_id = request_id(args)?;
    let path = args.model.resolve_path()?;
    let text = Arc::new(LocalModel::open_text(&path)?);
    let (served, key) = match (&args.encrypted, &args.key) {
        (Some(encrypted), Some(key)) => {
            let key = crate::commands::ee::read_key(key)?;
            veil_ee::check_key(&veil_model::GgufFile::open(encrypted)?, &key)?;
            let keyed = KeyedModel::new(Privacy::new(key, Vec::new()), None);
            (encrypted.clone(), Some(Arc::new(keyed)))
        }
        _ => (path, None),
    };
    let runtime = crate::commands::network_runtime::runtime()?;
    let mut connection = connect(
        args,
        &runtime,
        &served,
        &text,
        Some(open_state(args)?),
        // Judging can take a while: two minutes per request.
        Duration::from_secs(120),
    )?;
    let seating = Seating {
        seed: args.verify.committee_seed.clone(),
        request_id: Some(request_id.clone()),
    };
    let (backend, verified): (Box<dyn Backend>, _) = if args.verify.chain {
        let chain = VerifiedChain::new(Arc::new(connection), size - 1).seated(seating);
        (Box::new(chain), "verified chain generation")
    } else {
        if args.verify.recheck {
            connection.recheck = Some(veil_verify::LocalRecheck::new(served));
        }
        let committee = Committee::new(Arc::new(connection), size, key).seated(seating);
        (Box::new(committee), "verified generation")
    };
    Ok(Built {
        backend,
        text,
        method: None,
        request_id: Some(request_id),
        verified: Some(verified),
        _runtime: Some(runtime),
    })
}

/// A client joined to the swarm for the model file `served`, with the node checks of
/// `--weights-openings`, `--allow-nodes` and the records in `state`.
fn connect(
    args: &GenerateArgs,
    runtime: &tokio::runtime::Runtime,
    served: &std::path::Path,
    text: &Arc<LocalModel>,
    state: Option<veil_net::NodeState>,
    request_timeout: Duration,
) -> Result<SwarmConnection> {
    let admission = args.swarm.admission(served, None)?;
    let digest = veil_model::store::file_digest(served)?.1;
    let client = runtime.block_on(args.swarm.connect(request_timeout, Duration::from_secs(10)))?;
    let evidence_dir = args
        .verify
        .evidence_dir
        .clone()
        .unwrap_or_else(|| veil_model::ModelStore::from_env().home().join("evidence"));
    Ok(SwarmConnection {
        client,
        runtime: runtime.handle().clone(),
        text: Arc::clone(text),
        digest,
        state,
        admission,
        evidence_dir,
        recheck: None,
    })
}

/// Prints how the answer was made: the accel method, the route and failovers, or the
/// committee's verdicts, and the evidence written against liars. Fails if evidence could not
/// be kept.
fn report(answer: &Answer, request_id: Option<&str>) -> Result<()> {
    if matches!(answer.route, Route::Local { .. }) && answer.accel != "plain" {
        eprintln!("accel: {}", answer.accel);
    }
    for line in route_lines(&answer.route) {
        eprintln!("route: {line}");
    }
    for line in failover_lines(&answer.route) {
        eprintln!("failover: {line}");
    }
    let id = request_id.unwrap_or_default();
    match &answer.verification {
        Some(Verification::Committee(c)) => {
            eprintln!(
                "request {id}: committee {} ({} commitments)",
                c.committee.join(", "),
                c.mode
            );
            eprintln!(
                "accepted the answer of {}: passed by {} of {} judges; generation {:.2} s, judging {:.2} s",
                c.generator,
                c.tally.passed.len(),
                c.tally.passed.len() + c.tally.failed.len(),
                c.generate_time.as_secs_f64(),
                c.judge_time.as_secs_f64()
            );
            for (peer, verdict) in &c.tally.failed {
                eprintln!("  dissent from {peer}: {verdict}");
            }
            if !c.overruled.is_empty() {
                eprintln!(
                    "  the answer recomputes here, so the judges that failed it lied and are avoided from now on: {}",
                    c.overruled.join(", ")
                );
            }
        }
        Some(Verification::Chain(c)) => {
            eprintln!(
                "request {id}: every hop replayed by its judges; generation {:.2} s, judging {:.2} s",
                c.generate_time.as_secs_f64(),
                c.judge_time.as_secs_f64()
            );
            for hop in &c.hops {
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
        }
        None => {}
    }
    let mut unkept = None;
    for kept in &answer.evidence {
        match &kept.file {
            Ok(file) => eprintln!(
                "caught {} lying: evidence in {} (re-check: veil verify-evidence {})",
                kept.against,
                file.display(),
                file.display()
            ),
            Err(e) => unkept = Some(e),
        }
    }
    if let Some(e) = unkept {
        bail!("evidence against a node caught lying could not be kept: {e}");
    }
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

/// The client's database of node reputations, for a plain route to leave out the nodes a
/// committee caught lying. It is read only if it exists; another `veil` process holding it
/// (a gateway, a verified run) leaves this route without it, with a warning.
fn read_liars(state: Option<&std::path::Path>) -> Option<veil_net::NodeState> {
    let path = state.map_or_else(
        || {
            veil_model::ModelStore::from_env()
                .home()
                .join("client.redb")
        },
        std::path::Path::to_path_buf,
    );
    if !path.exists() {
        return None;
    }
    match veil_net::NodeState::open(&path) {
        Ok(state) => Some(state),
        Err(e) => {
            eprintln!(
                "warning: cannot read the liars to avoid from {}: {e}",
                path.display()
            );
            None
        }
    }
}

/// `--request-id`, or a fresh random one.
fn request_id(args: &GenerateArgs) -> Result<String> {
    Ok(match &args.verify.request_id {
        Some(id) if veil_verify::is_request_id(id) => id.to_lowercase(),
        Some(id) => bail!("--request-id must be 64 hex digits, got {id:?}"),
        None => veil_verify::random_request_id(),
    })
}

/// The client's reputation database (`--state`), which verified requests move.
fn open_state(args: &GenerateArgs) -> Result<veil_net::NodeState> {
    let path = args.verify.state.clone().unwrap_or_else(|| {
        veil_model::ModelStore::from_env()
            .home()
            .join("client.redb")
    });
    Ok(veil_net::NodeState::open(&path)?)
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
