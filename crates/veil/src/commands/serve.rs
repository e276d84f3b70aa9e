//! `veil serve`: the OpenAI-compatible gateway.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;

use veil_serve::backend::{Batching, SwarmConnection};
use veil_serve::gateway::openai::VeilInfo;
use veil_serve::gateway::{Gateway, Limits, Serving};
use veil_serve::key_handoff::HandToNodes;
use veil_serve::key_rotation::{KeptKey, KeyInstaller, KeyRotation, KeyedModel, LoadHere, Privacy};

use crate::args::ModelArgs;
use crate::commands::swarm::SwarmArgs;

/// Arguments of `veil serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Run the model in this process instead of on the swarm.
    #[arg(long, conflicts_with = "bootstrap")]
    pub local: bool,

    /// Address to listen on (loopback by default: the gateway holds your keys).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Generations running at once; more requests wait in arrival order.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub max_concurrent: u16,

    /// Requests decoding together (continuous batching: requests join and leave the batch at
    /// each step, prompts run in pieces of up to 128 tokens in the same passes, starting from
    /// the API key's prefix cache), for a model in this process without --encrypted; with 1,
    /// generations run one at a time with MetaInf's per-request methods; with `auto`, MetaInf
    /// chooses for each request, from the requests in flight, between the batch (16 slots) and
    /// a one-at-a-time method. Admits max(this, --max-concurrent) requests at once.
    #[arg(long, value_name = "N|auto", default_value = "1")]
    pub batch: Batching,

    /// Requests allowed to wait; more are answered 429.
    #[arg(long, default_value_t = 16)]
    pub max_queued: usize,

    /// Largest request body in bytes; larger ones are answered 413.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,

    /// Seconds a client may take to send a request's headers; slower ones are cut off.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_timeout: u64,

    /// Seconds a request body may stall between its parts; a stalled one is answered 408.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub body_timeout: u64,

    /// Connections open at once; more clients wait until one closes.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_connections: u16,

    /// Largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tokens: u32,

    /// Serve this encrypted model (from `veil ee encrypt`): the gateway keeps the key, the
    /// tokenizer and the chat template; the model (or the swarm's nodes) sees only permuted ids
    /// and rotated activations. The key's passphrase comes from $VEIL_KEY_PASSPHRASE.
    #[arg(long, value_name = "PATH", requires = "key")]
    pub encrypted: Option<std::path::PathBuf>,

    /// The key the encrypted model was made with.
    #[arg(long, value_name = "PATH", requires = "encrypted")]
    pub key: Option<std::path::PathBuf>,

    /// With --encrypted: replace the key once it has served this many tokens (prompts and
    /// answers), re-encrypting --model under a fresh key in the background (on the swarm, each
    /// node is handed its shard of it and must take shards from this gateway: `veil node
    /// --accept-shards-from`); requests running then finish under the old key. 0: never by
    /// tokens.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 10_000,
        requires = "encrypted"
    )]
    pub rotate_after_tokens: u64,

    /// With --encrypted: replace the key once it has been in use this long (checked as requests
    /// finish). 0: never by age.
    #[arg(
        long,
        value_name = "MINUTES",
        default_value_t = 60,
        requires = "encrypted"
    )]
    pub rotate_after_minutes: u64,

    /// The client's database of node reputations, moved by committee verdicts (default:
    /// $VEIL_HOME/client.redb; one process at a time).
    #[arg(long, value_name = "PATH")]
    pub state: Option<std::path::PathBuf>,

    /// Where evidence against nodes a committee caught lying is written (default:
    /// $VEIL_HOME/evidence).
    #[arg(long, value_name = "DIR")]
    pub evidence_dir: Option<std::path::PathBuf>,

    /// Serve critical requests (`POST /v1/veil/classify`) for the committed private model
    /// whose public files (public.json, params.bin from `veil zk setup`) are in DIR: nodes
    /// answer with a zero-knowledge proof, checked here before the answer is returned.
    #[arg(long, value_name = "DIR", conflicts_with = "local")]
    pub zk_public: Option<std::path::PathBuf>,

    /// Require an API key: a file of keys, one per line (blank lines and `#` comments are
    /// skipped); clients send `Authorization: Bearer <key>`, as OpenAI clients do with
    /// `api_key`. Without it the gateway takes no keys: keep it on loopback.
    #[arg(long, value_name = "PATH")]
    pub api_key_file: Option<std::path::PathBuf>,

    /// A host name clients reach the gateway by, besides IP addresses and `localhost`
    /// (repeatable). Requests through any other Host header are refused, against DNS rebinding
    /// from web pages.
    #[arg(long = "allowed-host", value_name = "NAME")]
    pub allowed_hosts: Vec<String>,

    /// Route only to nodes whose TEE evidence passes this policy (a TOML file: see
    /// `veil tee verify`); each node is challenged with a fresh nonce.
    #[arg(long, value_name = "POLICY", conflicts_with = "local")]
    pub require_tee: Option<std::path::PathBuf>,

    /// Recompute here, loading the whole model on the first rejection, any answer a committee
    /// rejects, before anyone is punished: judges that failed an answer that passes here are
    /// avoided instead, and the answer stands (against a majority of Sybils framing honest
    /// nodes).
    #[arg(long, conflicts_with = "local")]
    pub recheck: bool,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub swarm: SwarmArgs,
}

/// Runs `veil serve` until interrupted.
pub fn run(args: ServeArgs) -> Result<()> {
    if !args.local && args.swarm.bootstrap.is_empty() {
        bail!("give --bootstrap ADDR to serve through the swarm, or --local to run the model here");
    }
    if args.swarm.client_layers.is_some() {
        bail!("veil serve does not split the model with the swarm yet: drop --client-layers");
    }
    let access = Arc::new(veil_serve::gateway::access::Access::new(
        args.api_key_file.as_deref(),
        &args.allowed_hosts,
    )?);
    let tee_gate = match &args.require_tee {
        Some(file) => Some(veil_net::TeeGate::new(crate::commands::tee::read_policy(
            file,
        )?)),
        None => None,
    };
    let private_model = match &args.zk_public {
        Some(dir) => Some(Arc::new(crate::commands::zk::open_verifier(dir)?)),
        None => None,
    };
    let path = args.model.resolve_path()?;
    let (privacy, passphrase) = match (&args.encrypted, &args.key) {
        (Some(encrypted), Some(key)) => {
            let (key, passphrase) = crate::commands::ee::read_key_and_passphrase(key)?;
            let shards = if args.local {
                crate::commands::ee::load_encrypted(encrypted, &key, &args.model)?
            } else {
                Vec::new()
            };
            (Some(Privacy::new(key, shards)), Some(passphrase))
        }
        _ => (None, None),
    };
    let rotates = !(args.rotate_after_tokens == 0 && args.rotate_after_minutes == 0);
    if privacy.is_some() && rotates && !args.local && args.recheck {
        bail!(
            "--recheck recomputes against the encrypted file given, which a rotated key \
             replaces: drop --recheck, or keep the key (--rotate-after-tokens 0 \
             --rotate-after-minutes 0)"
        );
    }
    // On the swarm the key's rotation needs the connection, made below.
    let (privacy, swarm_privacy) = match privacy {
        Some(privacy) if args.local => {
            let loader = args.model.clone();
            let load_here = LoadHere(Box::new(move |file, key| {
                crate::commands::ee::load_encrypted(file, key, &loader).map_err(Into::into)
            }));
            let rotation = key_rotation(&args, &path, Box::new(load_here), None);
            (Some(KeyedModel::new(privacy, rotation)), None)
        }
        swarm => (None, swarm),
    };
    let model = Arc::new(if args.local && privacy.is_none() {
        args.model.load()?
    } else {
        veil_model::LocalModel::open_text(&path)?
    });
    // Nodes serve shards cut from the file they run: the encrypted one when there is a key.
    let served = args.encrypted.clone().unwrap_or_else(|| path.clone());
    let admission = args.swarm.admission(&served, tee_gate)?;
    let model_id = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let model_id = model_id.split('.').next().unwrap_or(&model_id).to_string();
    let info = VeilInfo {
        mode: if args.local { "local" } else { "swarm" },
        // On the swarm, each node runs the format and kernels it was started with.
        format: if args.local {
            args.model.dtype.to_string()
        } else {
            "the nodes'".into()
        },
        kernels: if args.local {
            args.model.kernels.to_string()
        } else {
            "the nodes'".into()
        },
        tokens_per_second: 0.0,
        verification: "none".into(),
        accel: "plain".into(),
        privacy: if privacy.is_some() {
            "encrypted"
        } else {
            "plain"
        },
    };
    let limits = Limits {
        max_concurrent: usize::from(args.max_concurrent),
        max_queued: args.max_queued,
        max_body_bytes: args.max_body_bytes,
        max_tokens: args.max_tokens as usize,
        batch: args.batch,
    };
    // MetaInf chooses per request for a plaintext model in this process.
    let selector = if args.local && privacy.is_none() {
        match crate::commands::meta::load_selector() {
            Ok(s) => Some((s, veil_serve::accel::model_features(&model, &path))),
            Err(e) => {
                tracing::warn!("no MetaInf selector ({e:#}): every request runs the plain method");
                None
            }
        }
    } else {
        None
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let home = veil_model::ModelStore::from_env().home().to_path_buf();
    runtime.block_on(async move {
        let serving = match (args.local, privacy) {
            (true, None) => Serving::Local { selector },
            (true, Some(keyed)) => Serving::Encrypted(keyed),
            (false, _) => {
                let state_path = args
                    .state
                    .clone()
                    .unwrap_or_else(|| home.join("client.redb"));
                let state = veil_net::NodeState::open(&state_path).context(
                    "cannot open the reputation database (is another veil client using it?)",
                )?;
                let (request_timeout, join_timeout) = (
                    std::time::Duration::from_secs(60),
                    std::time::Duration::from_secs(10),
                );
                // A key that rotates is handed to nodes under a lasting identity, which they
                // accept shards from; otherwise each run joins as a stranger.
                let client = if swarm_privacy.is_some() && rotates {
                    let identity = state
                        .identity()
                        .context("cannot read the gateway's identity")?;
                    let client = args
                        .swarm
                        .connect_as(identity, request_timeout, join_timeout)
                        .await;
                    // On stderr: stdout's first line is the gateway's address, which scripts read.
                    if let Ok(client) = &client {
                        eprintln!(
                            "key holder peer id: {} (nodes take this gateway's re-encrypted \
                             shards with `veil node --accept-shards-from {}`)",
                            client.local_id(),
                            client.local_id()
                        );
                    }
                    client
                } else {
                    args.swarm.connect(request_timeout, join_timeout).await
                }
                .context("cannot join the swarm")?;
                let digest = veil_model::store::file_digest(&served)?.1;
                let key = swarm_privacy.map(|privacy| {
                    let swarm_args = args.swarm.clone();
                    let install = HandToNodes::new(
                        client.clone(),
                        tokio::runtime::Handle::current(),
                        digest.clone(),
                        Box::new(move |file: &std::path::Path| {
                            swarm_args
                                .admission(file, None)
                                .map_err(|e| veil_serve::ServeError::Invalid(format!("{e:#}")))
                        }),
                    );
                    // Each new key is kept beside the gateway's database, sealed with the
                    // passphrase of the key given, and resumed by the next run.
                    let kept = passphrase.map(|passphrase| KeptKey {
                        path: kept_key_path(&state_path),
                        passphrase,
                    });
                    let rotation = key_rotation(&args, &path, Box::new(install), kept);
                    let resumed = match &rotation {
                        // Re-encrypting takes seconds: off the runtime's scheduling.
                        Some(rotation) => {
                            tokio::task::block_in_place(|| rotation.resume(&privacy))?
                        }
                        None => None,
                    };
                    Ok::<_, anyhow::Error>(KeyedModel::new(resumed.unwrap_or(privacy), rotation))
                });
                let key = key.transpose()?;
                let connection = SwarmConnection {
                    client,
                    runtime: tokio::runtime::Handle::current(),
                    text: Arc::clone(&model),
                    digest,
                    evidence_dir: args
                        .evidence_dir
                        .clone()
                        .unwrap_or_else(|| home.join("evidence")),
                    state: Some(state),
                    admission,
                    recheck: args
                        .recheck
                        .then(|| veil_verify::LocalRecheck::new(served.clone())),
                };
                Serving::Swarm {
                    connection: Box::new(connection),
                    key,
                    private_model,
                }
            }
        };
        let gateway = Arc::new(Gateway::new(model, serving, model_id.clone(), info, limits));
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        println!(
            "veil gateway listening on http://{addr} (model {model_id}, OpenAI API under /v1)"
        );
        use std::io::Write;
        std::io::stdout().flush()?;
        let router =
            gateway
                .router(access)
                .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
                    std::time::Duration::from_secs(args.body_timeout),
                ));
        let limits = veil_serve::gateway::server::ConnectionLimits {
            header_timeout: std::time::Duration::from_secs(args.header_timeout),
            max_connections: usize::from(args.max_connections),
        };
        veil_serve::gateway::server::serve(listener, router, limits, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
        Ok(())
    })
}

/// How the key of the encrypted model rotates: the plaintext `model` is re-encrypted under
/// each new key, and `install` readies it where the model runs (here, or on the nodes).
fn key_rotation(
    args: &ServeArgs,
    model: &std::path::Path,
    install: Box<dyn KeyInstaller>,
    keep: Option<KeptKey>,
) -> Option<KeyRotation> {
    let never = |n: u64| n == 0;
    if never(args.rotate_after_tokens) && never(args.rotate_after_minutes) {
        return None;
    }
    let config = veil_model::GgufFile::open(model)
        .and_then(|gguf| veil_model::LlamaConfig::from_gguf(&gguf));
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            tracing::warn!(
                "the key will not rotate: cannot read {}: {e}",
                model.display()
            );
            return None;
        }
    };
    Some(KeyRotation {
        policy: veil_ee::RotationPolicy {
            max_tokens: match args.rotate_after_tokens {
                0 => u64::MAX,
                n => n,
            },
            max_age: match args.rotate_after_minutes {
                0 => std::time::Duration::MAX,
                m => std::time::Duration::from_secs(m.saturating_mul(60)),
            },
        },
        plain: model.to_path_buf(),
        config,
        install,
        keep,
    })
}

/// Where a gateway keeps its rotated key: beside its database, named after it.
fn kept_key_path(state: &std::path::Path) -> std::path::PathBuf {
    let mut name = state
        .file_name()
        .map_or_else(|| "client.redb".into(), std::ffi::OsStr::to_os_string);
    name.push(".rotated-key.veil");
    state.with_file_name(name)
}
