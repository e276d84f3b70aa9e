//! `veil shard`, `veil node`, and the client side of the swarm used by `generate` and `demo`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use libp2p::Multiaddr;
use veil_model::{GgufFile, LayerRange, LlamaConfig, Shard, ShardModel, WeightFormat};
use veil_net::{ClientSplit, NodeConfig, RemoteChain, SessionLimits, SwarmClient};
use veil_serve::backend::Route;

use crate::args::ModelArgs;
use crate::commands::network_runtime::runtime;
use crate::progress;

/// Arguments of `veil shard`.
#[derive(Args, Debug)]
pub struct ShardArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Layer ranges, one file each, e.g. 0-10,10-20,20-30; together they must cover every block
    /// after `--client-layers`.
    #[arg(long, value_delimiter = ',', required = true)]
    pub ranges: Vec<LayerRange>,
    /// For a client-side split: the ranges start after the client's first K blocks, and the
    /// last file carries no head (the client applies it).
    #[arg(long, default_value_t = 0)]
    pub client_layers: usize,
    /// Directory to write the shard files and manifest.json into.
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs `veil shard`.
pub fn shard(args: ShardArgs) -> Result<()> {
    let path = args.model.resolve_path()?;
    let config = LlamaConfig::from_gguf(&GgufFile::open(&path)?)?;
    let shards = plan_shards(&args.ranges, args.client_layers, config.block_count)?;
    let bar = progress::bar(shards.len() as u64, "writing shards");
    let manifests = veil_model::write_shard_files(&path, &shards, &args.out, &mut |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    for m in &manifests {
        eprintln!("wrote {} ({})", args.out.join(&m.file).display(), m.shard());
    }
    Ok(())
}

/// The shards for `ranges`, which must tile `client_layers..block_count`.
pub fn plan_shards(
    ranges: &[LayerRange],
    client_layers: usize,
    block_count: usize,
) -> Result<Vec<Shard>> {
    if client_layers >= block_count {
        bail!("--client-layers {client_layers} leaves no block for the nodes (the model has {block_count})");
    }
    let mut next = client_layers;
    let mut shards = Vec::new();
    for r in ranges {
        let r = &r.0;
        if r.start != next {
            bail!(
                "ranges must cover blocks {client_layers}..{block_count} in order without gaps; {}-{} starts at {} but should start at {next}",
                r.start, r.end, r.start
            );
        }
        let mut shard = Shard::span(r.clone(), block_count)?;
        shard.head &= client_layers == 0;
        shards.push(shard);
        next = r.end;
    }
    if next != block_count {
        bail!("ranges end at block {next}, but the model has {block_count} blocks");
    }
    Ok(shards)
}

/// Arguments of `veil node`.
#[derive(Args, Debug)]
pub struct NodeArgs {
    /// The shard file to serve (from `veil shard`), or a whole model file.
    #[arg(long)]
    pub shard: PathBuf,
    /// Addresses to listen on (default: every interface, TCP and QUIC, ports chosen by the OS).
    #[arg(long, default_values = ["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"])]
    pub listen: Vec<Multiaddr>,
    /// A peer to join through, as printed by that node: /ip4/.../tcp/PORT/p2p/PEER_ID.
    #[arg(long)]
    pub bootstrap: Vec<Multiaddr>,
    /// The node's database (identity key, known peers); default $VEIL_HOME/node.redb.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Weight format to run in: stored, f32, f16, q8_0 or q4_0 (verification is calibrated for
    /// f32).
    #[arg(long, default_value = "stored", value_parser = parse_format)]
    pub dtype: WeightFormat,
    /// Worker threads for the tensor kernels (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
    /// Sessions served at once.
    #[arg(long, default_value_t = 16)]
    pub max_sessions: usize,
    /// Positions one session may hold.
    #[arg(long, default_value_t = 8192)]
    pub max_session_tokens: usize,
    /// Seconds an unused session is kept.
    #[arg(long, default_value_t = 120)]
    pub idle_timeout: u64,
    /// Sessions one peer may hold at once, so no peer takes every slot.
    #[arg(long, default_value_t = 4)]
    pub max_sessions_per_peer: usize,
    /// Positions one peer's sessions may hold together.
    #[arg(long, default_value_t = 16384)]
    pub max_tokens_per_peer: usize,
    /// Positions (prompts and answers) one peer may have this node judge a minute: a judge
    /// recomputes what it is sent, so this bounds what a stranger can make it spend.
    #[arg(long, default_value_t = 8192)]
    pub judge_tokens_per_minute: usize,
    /// Take no new connections while this process uses more than this many MiB (default: 90%
    /// of the machine's memory).
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_memory: Option<u64>,
    /// Cheat, to see verification catch it (tests and demos only): other-model,
    /// lower-precision, altered-prompt, altered-token, skipped-layers or random-output.
    #[arg(long, value_name = "KIND")]
    pub misbehave: Option<veil_verify::Misbehaviour>,
    /// Keep this node's run records (MetaInf's history) to itself instead of sharing them with
    /// peers; they still go into `--state`.
    #[arg(long)]
    pub no_share_runs: bool,
    /// What an hour of this machine costs, for the run records' cost model.
    #[arg(long, default_value_t = 1.0)]
    pub price: f64,
    /// The configfs-tsm report directory to obtain TEE evidence from (default:
    /// /sys/kernel/config/tsm/report when this machine has it).
    #[arg(long, value_name = "DIR", conflicts_with = "no_tee")]
    pub tee_report_dir: Option<PathBuf>,
    /// Serve without TEE evidence even where the interface exists.
    #[arg(long)]
    pub no_tee: bool,
    /// Intel DCAP collateral (JSON) sent with each quote, so verifiers need nothing online.
    #[arg(long, value_name = "FILE")]
    pub tee_collateral: Option<PathBuf>,
    /// This chip's VCEK certificate (DER or PEM) sent with each SEV-SNP report.
    #[arg(long, value_name = "FILE")]
    pub tee_vcek: Option<PathBuf>,
    /// Prove answers of the committed private model set up in DIR (`veil zk setup`) for
    /// critical requests.
    #[arg(long, value_name = "DIR")]
    pub zk_setup: Option<PathBuf>,
    /// Take the shards of an encrypted model re-encrypted under a new key from this key holder
    /// (the peer id a `veil serve` gateway over the swarm prints when its key rotates),
    /// repeatable; from no one by default.
    #[arg(long = "accept-shards-from", value_name = "PEER_ID")]
    pub accept_shards_from: Vec<libp2p::PeerId>,
    /// The largest shard file taken from a key holder, in MiB (default: twice the file this
    /// node was started with, at least 64 MiB).
    #[arg(long, value_name = "MIB", requires = "accept_shards_from")]
    pub max_shard_mib: Option<u64>,
    /// Relay for nodes behind NATs (circuit relay v2): for a node others can dial directly.
    #[arg(long)]
    pub relay_server: bool,
    /// With --relay-server: circuits relayed at once (4 per peer at most).
    #[arg(long, default_value_t = 16, requires = "relay_server",
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub relay_max_circuits: u32,
    /// With --relay-server: MiB one circuit may carry before the relay closes it.
    #[arg(long, default_value_t = 256, requires = "relay_server",
          value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub relay_circuit_mib: u64,
    /// With --relay-server: minutes one circuit may last.
    #[arg(long, default_value_t = 30, requires = "relay_server",
          value_parser = clap::value_parser!(u64).range(1..=1440))]
    pub relay_circuit_minutes: u64,
    /// A relay to reserve a slot on and be reached through, as that node prints its address
    /// (/ip4/.../tcp/PORT/p2p/PEER_ID): for a node behind a NAT. Repeat for more relays.
    #[arg(long, value_name = "MULTIADDR")]
    pub relay: Vec<Multiaddr>,
    /// Reserve slots on up to N relays found in the DHT (nodes started with --relay-server
    /// announce themselves there), besides those named with --relay.
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u8).range(0..=8))]
    pub find_relays: u8,
    /// Listen only through relays (--relay, --find-relays), on no address of this machine: for
    /// a node that can take no inbound connection at all.
    #[arg(long, conflicts_with = "listen")]
    pub only_relayed: bool,
    /// Treat addresses in private ranges (10/8, 192.168/16, ...) as an internet: AutoNAT then
    /// probes this node's, and dials back other nodes', for a swarm on a LAN or in namespaces.
    #[arg(long)]
    pub private_network: bool,
}

fn parse_format(s: &str) -> Result<WeightFormat, String> {
    s.parse().map_err(|e: veil_model::ModelError| e.to_string())
}

/// Runs `veil node` until interrupted.
pub fn node(args: NodeArgs) -> Result<()> {
    if args.only_relayed && args.relay.is_empty() && args.find_relays == 0 {
        bail!(
            "--only-relayed needs a relay to listen through: give --relay ADDR or --find-relays N"
        );
    }
    if let Some(threads) = args.threads {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    if [
        args.max_sessions,
        args.max_session_tokens,
        args.max_sessions_per_peer,
        args.max_tokens_per_peer,
        args.judge_tokens_per_minute,
    ]
    .contains(&0)
        || args.idle_timeout == 0
    {
        bail!("--max-sessions, --max-session-tokens, --max-sessions-per-peer, --max-tokens-per-peer, --judge-tokens-per-minute and --idle-timeout must be positive");
    }
    if !args.shard.is_file() {
        bail!("no shard file at {}", args.shard.display());
    }
    if !(args.price.is_finite() && args.price > 0.0) {
        bail!("--price must be a positive number");
    }
    let state = args
        .state
        .clone()
        .unwrap_or_else(|| veil_model::ModelStore::from_env().home().join("node.redb"));
    // A cheating node's timings say nothing about the method, so it records none.
    let history = match args.misbehave {
        Some(_) => None,
        None => veil_serve::accel::node_run_template(
            &args.shard,
            args.dtype,
            args.price,
            !args.no_share_runs,
        )?,
    };
    let config = NodeConfig {
        shard: args.shard,
        format: args.dtype,
        listen: if args.only_relayed {
            Vec::new()
        } else {
            args.listen
        },
        bootstrap: args.bootstrap,
        state,
        limits: SessionLimits {
            max_sessions: args.max_sessions,
            max_tokens: args.max_session_tokens,
            idle_timeout: Duration::from_secs(args.idle_timeout),
            max_sessions_per_peer: args.max_sessions_per_peer,
            max_tokens_per_peer: args.max_tokens_per_peer,
        },
        judge_tokens_per_minute: args.judge_tokens_per_minute,
        request_timeout: Duration::from_secs(60),
        max_memory_bytes: args
            .max_memory
            .map(|mib| usize::try_from(mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX)),
        on_listen: None,
        misbehave: args.misbehave,
        history,
        tee: crate::commands::tee::evidence_source(
            args.no_tee,
            args.tee_report_dir.as_deref(),
            args.tee_collateral.as_deref(),
            args.tee_vcek.as_deref(),
        )?,
        zk: match &args.zk_setup {
            Some(dir) => Some(std::sync::Arc::new(crate::commands::zk::open_prover(dir)?)),
            None => None,
        },
        relay_server: args.relay_server.then(|| {
            let circuits = args.relay_max_circuits as usize;
            veil_net::behaviour::RelayLimits {
                max_circuits: circuits,
                max_circuits_per_peer: circuits.min(4),
                max_circuit_bytes: args.relay_circuit_mib << 20,
                max_circuit_duration: Duration::from_secs(args.relay_circuit_minutes * 60),
                ..Default::default()
            }
        }),
        relays: args.relay,
        find_relays: usize::from(args.find_relays),
        probes: veil_net::behaviour::ReachabilityProbes {
            private_addresses: args.private_network,
        },
        handoff: veil_net::protocol::handoff::HandoffPolicy {
            from: args.accept_shards_from.into_iter().collect(),
            max_bytes: args
                .max_shard_mib
                .map_or(0, |mib| mib.saturating_mul(1 << 20)),
        },
    };
    let runtime = runtime()?;
    runtime
        .block_on(veil_net::run_node(config, shutdown_signal()))
        .context("the node stopped")
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}

/// How to reach the swarm from a client command.
#[derive(Args, Debug, Clone)]
pub struct SwarmArgs {
    /// Run through the swarm, joining through this node (as printed by `veil node`); may be
    /// given several times.
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<Multiaddr>,
    /// Run the embedding, the first K blocks and the head here, so nodes see only hidden states.
    #[arg(long, value_name = "K", requires = "bootstrap")]
    pub client_layers: Option<usize>,
    /// Random chunks of its weights each node must open, against this machine's copy of the
    /// model, before it serves or judges (0: believe what nodes announce).
    #[arg(long, value_name = "N", default_value_t = veil_net::DEFAULT_OPENINGS as u16,
          value_parser = clap::value_parser!(u16).range(0..=veil_zk::MAX_OPENINGS as i64))]
    pub weights_openings: u16,
    /// Use only these nodes: a file of peer ids, one per line (blank lines and `#` comments
    /// are skipped).
    #[arg(long, value_name = "PATH")]
    pub allow_nodes: Option<PathBuf>,
    /// Listen on this peer-to-peer address too (/ip4/0.0.0.0/tcp/0, say): behind a NAT, nodes
    /// that are behind NATs too can then punch a hole to this client instead of relaying every
    /// step.
    #[arg(long = "p2p-listen", value_name = "MULTIADDR", requires = "bootstrap")]
    pub p2p_listen: Vec<Multiaddr>,
}

impl SwarmArgs {
    /// Joins the swarm as a client, listening where `--p2p-listen` says.
    pub async fn connect(
        &self,
        request_timeout: Duration,
        join_timeout: Duration,
    ) -> Result<SwarmClient> {
        Ok(SwarmClient::connect_listening(
            &self.bootstrap,
            &self.p2p_listen,
            request_timeout,
            join_timeout,
        )
        .await?)
    }

    /// [`SwarmArgs::connect`] under the identity `key`, which nodes recognize.
    pub async fn connect_as(
        &self,
        key: libp2p::identity::Keypair,
        request_timeout: Duration,
        join_timeout: Duration,
    ) -> Result<SwarmClient> {
        Ok(SwarmClient::connect_as(
            key,
            &self.bootstrap,
            &self.p2p_listen,
            request_timeout,
            join_timeout,
        )
        .await?)
    }

    /// The checks a node must pass to serve or judge for this client, with `served` the model
    /// file the nodes serve shards of; `tee` adds a TEE policy.
    pub fn admission(
        &self,
        served: &Path,
        tee: Option<veil_net::TeeGate>,
    ) -> Result<Option<std::sync::Arc<veil_net::Admission>>> {
        let mut admission = veil_net::Admission::default();
        if self.weights_openings > 0 {
            admission = admission.with_weights(veil_net::WeightsGate::new(
                served.to_path_buf(),
                usize::from(self.weights_openings),
            ));
        }
        if let Some(file) = &self.allow_nodes {
            admission = admission.with_allow_list(read_allow_list(file)?);
        }
        if let Some(tee) = tee {
            admission = admission.with_tee(tee);
        }
        Ok(admission
            .checks_anything()
            .then(|| std::sync::Arc::new(admission)))
    }
}

/// Peer ids, one per line, from an operator's allow-list file.
fn read_allow_list(file: &Path) -> Result<std::collections::HashSet<libp2p::PeerId>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the allow-list {}", file.display()))?;
    let mut peers = std::collections::HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let peer = line.parse().with_context(|| {
            format!(
                "{}:{}: {line:?} is not a peer id (as `veil node` prints it)",
                file.display(),
                n + 1
            )
        })?;
        peers.insert(peer);
    }
    if peers.is_empty() {
        bail!(
            "the allow-list {} names no node: every request would fail",
            file.display()
        );
    }
    Ok(peers)
}

/// Opens a generation chain over the swarm for the model file at `model` (plaintext or
/// encrypted: nodes serve shards cut from that very file).
pub fn open_chain(
    runtime: &tokio::runtime::Runtime,
    swarm: &SwarmArgs,
    model: &Path,
    format: WeightFormat,
    avoid: &std::collections::HashSet<libp2p::PeerId>,
) -> Result<RemoteChain> {
    let admission = swarm.admission(model, None)?;
    let config = LlamaConfig::from_gguf(&GgufFile::open(model)?)?;
    let digest = veil_model::store::file_digest(model)?.1;
    let split =
        client_split(swarm, model, format)?.map(|(front, head)| ClientSplit { front, head });
    let client =
        runtime.block_on(swarm.connect(Duration::from_secs(60), Duration::from_secs(10)))?;
    let chain = RemoteChain::open_gated(
        client,
        runtime.handle().clone(),
        &digest,
        config.block_count,
        split,
        avoid,
        admission,
    )?;
    Ok(chain)
}

/// With `--client-layers K`: the blocks this process runs itself, loaded from `model` in
/// `format`: the embedding and the first K blocks, and the head.
pub fn client_split(
    swarm: &SwarmArgs,
    model: &Path,
    format: WeightFormat,
) -> Result<Option<(Arc<ShardModel>, Arc<ShardModel>)>> {
    let Some(k) = swarm.client_layers else {
        return Ok(None);
    };
    let mut gguf = GgufFile::open(model)?;
    let n = LlamaConfig::from_gguf(&gguf)?.block_count;
    if k == 0 || k >= n {
        bail!("--client-layers must be between 1 and {}", n - 1)
    }
    let front = Shard {
        layers: 0..k,
        embedding: true,
        head: false,
    };
    let head = Shard {
        layers: n..n,
        embedding: false,
        head: true,
    };
    Ok(Some((
        ShardModel::load(&mut gguf, &front, format)?.into(),
        ShardModel::load(&mut gguf, &head, format)?.into(),
    )))
}

/// One line per hop of a chain's route: blocks, node, steps, time spent and bytes sent.
pub fn route_lines(route: &Route) -> Vec<String> {
    let Route::Chain { hops, .. } = route else {
        return Vec::new();
    };
    hops.iter()
        .map(|hop| {
            format!(
                "blocks {:>2}-{:<2} on {}{}: {} steps, {:.0} ms, {} KiB sent",
                hop.blocks.0,
                hop.blocks.1,
                hop.peer,
                if hop.relayed { " (relayed)" } else { "" },
                hop.stats.steps,
                hop.stats.busy.as_secs_f64() * 1000.0,
                hop.stats.bytes_sent / 1024
            )
        })
        .collect()
}

/// One line per node a chain replaced on the way.
pub fn failover_lines(route: &Route) -> Vec<String> {
    let Route::Chain { failovers, .. } = route else {
        return Vec::new();
    };
    failovers
        .iter()
        .map(|f| {
            let (first, end) = f.blocks;
            let moved = match f.from == f.to {
                true => format!("reached {} again", f.to),
                false => format!("moved from {} to {}", f.from, f.to),
            };
            format!(
                "blocks {first}-{end} {moved} after {} ({} steps replayed)",
                f.reason, f.replayed_steps
            )
        })
        .collect()
}
