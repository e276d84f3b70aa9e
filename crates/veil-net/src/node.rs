//! `veil node`: serve one shard to the swarm.
//!
//! The event loop owns the swarm and the session table; each step runs on a blocking thread
//! with its session taken out of the table, so a long prefill does not stall the network or
//! other sessions' requests.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::ResponseChannel;
use libp2p::request_response::{self, Message};
use libp2p::swarm::{DialError, SwarmEvent};
use libp2p::{autonat, dcutr, gossipsub, identify, kad, relay, Multiaddr, PeerId, Swarm};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use veil_model::{GgufFile, ShardManifest, ShardModel, WeightFormat};
use veil_verify::{load_serving_shard, Misbehaviour};
use veil_zk::WeightsCommitment;

use crate::behaviour::{
    build_node_swarm, model_key, range_key, relay_key, speaks_kad, zk_key, ReachabilityProbes,
    RelayLimits, VeilBehaviour, VeilBehaviourEvent,
};
use crate::error::{NetError, Result};
use crate::history::{accept_gossiped, AuthorQuota, RunTemplate, MAX_KEPT_RUNS, RUNS_TOPIC};
use crate::node_models::{NodeModels, ServedShard};
use crate::node_relays::{log_relay, offer_relay_at, RelaySlots};
use crate::node_session::NodeSession;
use crate::node_state::NodeState;
use crate::peer_addresses::PeerAddresses;
use crate::protocol;
use crate::protocol::handoff::{self, HandoffPolicy, HandoffService};
use crate::protocol::infer::{self, Handled};
use crate::protocol::prove::ProveService;
use crate::protocol::verify::VerifyService;
use crate::sessions::{SessionLimits, SessionTable};
use crate::state_writer::{StateWrite, StateWriter};
use crate::wire::{ShardInfo, WeightsRoot};

/// How a node is started.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The shard file (or a whole model file) to serve.
    pub shard: PathBuf,
    /// Weight format to run in.
    pub format: WeightFormat,
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to join through, each ending in `/p2p/<peer id>`.
    pub bootstrap: Vec<Multiaddr>,
    /// The node's database (identity, known peers).
    pub state: PathBuf,
    /// Session limits.
    pub limits: SessionLimits,
    /// Positions each peer may have this node judge a minute
    /// ([`crate::protocol::verify::JudgeBudget`]).
    pub judge_tokens_per_minute: usize,
    /// How long an answer may take before the asker gives up.
    pub request_timeout: Duration,
    /// Take no new connections while this process uses more memory than this (default: 90% of
    /// the machine's memory).
    pub max_memory_bytes: Option<usize>,
    /// Told each address the node listens on (for a node run inside another program).
    pub on_listen: Option<mpsc::UnboundedSender<Multiaddr>>,
    /// Cheat in this way: only for tests and the demo, to show verification catches it.
    pub misbehave: Option<Misbehaviour>,
    /// Record each plain session as a MetaInf run: for a node serving the whole model (a
    /// shard's time is only part of a run).
    pub history: Option<RunTemplate>,
    /// Where this node's TEE evidence comes from, if it runs in one.
    pub tee: Option<veil_tee::EvidenceSource>,
    /// A committed private model whose answers this node proves.
    pub zk: Option<Arc<veil_zk::proof::Prover>>,
    /// Relay circuits for peers behind NATs, within these limits (`None`: relay for no one).
    pub relay_server: Option<RelayLimits>,
    /// Relays to reserve a slot on and be reached through (each ending in `/p2p/<peer id>`):
    /// for a node behind a NAT, which cannot be dialed at the addresses it listens on.
    pub relays: Vec<Multiaddr>,
    /// Relays to find in the DHT (among those announcing [`relay_key`]) and reserve slots on,
    /// besides `relays`.
    pub find_relays: usize,
    /// How this node learns whether others can dial it; one it finds they cannot (behind a
    /// NAT) reserves slots on [`RELAYS_WHEN_PRIVATE`] relays from the DHT, if it was given none.
    pub probes: ReachabilityProbes,
    /// Which key holders may hand this node the shard of their model re-encrypted under a new
    /// key (none by default).
    pub handoff: HandoffPolicy,
}

/// Relays a node that AutoNAT finds unreachable looks for in the DHT, when its operator named
/// none: two, so that losing one leaves it reachable.
pub const RELAYS_WHEN_PRIVATE: usize = 2;

/// How often provider records are published again, so peers that joined later learn them.
const REANNOUNCE: Duration = Duration::from_secs(15);

/// Loads the shard, joins the swarm and serves until `shutdown` resolves.
pub async fn run_node(
    config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let state = NodeState::open(&config.state)?;
    let key = state.identity()?;
    let local_id = key.public().to_peer_id();

    let (path, format, misbehave) = (config.shard.clone(), config.format, config.misbehave);
    let (model, manifest, weights) =
        tokio::task::spawn_blocking(move || load_shard(&path, format, misbehave))
            .await
            .map_err(|e| NetError::Network(format!("loading task failed: {e}")))??;
    let model = Arc::new(model);
    let weights = Arc::new(weights);
    let runs = state.runs()?;
    let public_key = key.public().encode_protobuf();
    let tee_kind = match config.tee.clone() {
        None => None,
        Some(source) => {
            let key = public_key.clone();
            let evidence = tokio::task::spawn_blocking(move || {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                source.evidence(&key, veil_tee::Freshness::Time(now))
            })
            .await
            .map_err(|e| NetError::Network(format!("TEE task failed: {e}")))?
            .map_err(|e| NetError::BadMessage(format!("cannot obtain TEE evidence: {e}")))?;
            info!(
                "running in a TEE: {} ({} bytes of evidence)",
                evidence.kind,
                evidence.quote.len()
            );
            Some(evidence.kind)
        }
    };
    let announced = Announced {
        format,
        max_tokens: config.limits.max_tokens,
        tee: tee_kind,
        zk_commitment: config.zk.as_ref().map(|p| p.commitment().to_string()),
        misbehave,
    };
    let shard_info = announced.info(&manifest, &model, &weights);
    let announced = Arc::new(announced);
    if let Some(kind) = misbehave {
        warn!("this node cheats ({kind}): for testing verification only");
    }
    info!(
        "serving {} of model {} as {local_id}",
        model.shard(),
        &shard_info.model_digest[..12.min(shard_info.model_digest.len())]
    );

    let history = config.history.clone().filter(|_| shard_info.is_whole());
    let started_with = std::fs::metadata(&config.shard).map_or(0, |m| m.len());
    // The database is this process's alone (redb locks it), and so are the files handed to the
    // node that last ran on it: a transfer cut short, or shards of keys rotated away since.
    let handoff_dir = handoff_dir(&config.state);
    match handoff::remove_leftovers(&handoff_dir) {
        Ok((0, _)) => {}
        Ok((files, bytes)) => info!(
            "removed {files} shard files ({} MiB) left in {} by this node's last run",
            bytes >> 20,
            handoff_dir.display()
        ),
        Err(e) => warn!("cannot clear {}: {e}", handoff_dir.display()),
    }
    let mut handoff = HandoffService::new(config.handoff.clone(), handoff_dir, started_with);
    let mut swarm = build_node_swarm(
        key.clone(),
        config.request_timeout,
        config.max_memory_bytes,
        config.relay_server,
        Some(config.probes),
    )?;
    let runs_topic = gossipsub::IdentTopic::new(RUNS_TOPIC);
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&runs_topic)
        .map_err(|e| NetError::Network(format!("cannot subscribe to run records: {e}")))?;
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Network(format!("cannot listen on {addr}: {e}")))?;
    }
    // Join only once every listener has its address: identify tells peers our listen addresses
    // when a connection opens, and a peer told none cannot route anyone to this node.
    let mut listening = 0;
    while listening < config.listen.len() {
        let event = tokio::time::timeout(Duration::from_secs(30), swarm.select_next_some())
            .await
            .map_err(|_| NetError::Network("no listen address within 30 s".into()))?;
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                report_listening(&address, local_id, config.on_listen.as_ref());
                offer_relay_at(&mut swarm, config.relay_server.is_some(), address);
                listening += 1;
            }
            SwarmEvent::ListenerError { error, .. } => {
                return Err(NetError::Network(format!("listener failed: {error}")));
            }
            other => debug!("{other:?}"),
        }
    }
    let mut bootstrap = config.bootstrap.clone();
    bootstrap.extend(state.peers()?.into_iter().map(|(_, a)| a));
    // From here on the database is written on its own thread.
    let mut writer = StateWriter::start(state, runs)
        .map_err(|e| NetError::Network(format!("cannot start the database writer: {e}")))?;
    join(&mut swarm, &bootstrap)?;
    let mut relays = RelaySlots::new(&config.relays, config.find_relays)?;
    let mut peer_addresses = PeerAddresses::new(config.probes.private_addresses, &config.listen);
    relays.dial(&mut swarm);
    let relaying = config.relay_server.is_some();
    announce(&mut swarm, std::iter::once(&shard_info), relaying);

    let mut sessions: SessionTable<NodeSession> = SessionTable::new(SessionLimits {
        max_tokens: shard_info.max_session_tokens,
        ..config.limits
    });
    let (steps_done, mut step_done) = mpsc::unbounded_channel();
    let mut decode_batcher = infer::DecodeBatcher::start(&model, &steps_done);
    let (mut verify, mut judged) = VerifyService::new(
        key.clone(),
        &shard_info,
        misbehave,
        config.judge_tokens_per_minute,
    );
    let tee = config.tee.clone().map(|source| (source, public_key));
    let (prove, mut proved) = ProveService::new(tee, config.zk);
    let mut models = NodeModels::new(ServedShard {
        model,
        info: shard_info,
        file: config.shard.clone(),
        weights,
        handed: false,
    });
    let (loaded_tx, mut loaded) = mpsc::unbounded_channel();
    let mut gossip_quota = AuthorQuota::default();
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    let mut reannounce = tokio::time::interval(REANNOUNCE);
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            _ = &mut shutdown => {
                info!("shutting down with {} sessions open", sessions.len());
                return Ok(());
            }
            _ = sweep.tick() => {
                let expired = sessions.expire(Instant::now());
                if !expired.is_empty() {
                    info!("freed {} idle sessions", expired.len());
                }
                for session in expired {
                    keep_run(&mut swarm, &mut writer, history.as_ref(), session);
                }
                handoff.sweep(Instant::now());
            }
            _ = reannounce.tick() => {
                announce(&mut swarm, models.infos(), relaying);
                relays.dial(&mut swarm);
            }
            Some(done) = step_done.recv() => {
                let (channel, response) = infer::settle(&mut sessions, done);
                let _ = swarm.behaviour_mut().infer.send_response(channel, response);
            }
            Some(done) = judged.recv() => {
                let (channel, response) = verify.settle(done);
                let _ = swarm.behaviour_mut().verify.send_response(channel, response);
            }
            Some((channel, response)) = proved.recv() => {
                let _ = swarm.behaviour_mut().prove.send_response(channel, response);
            }
            Some(done) = loaded.recv() => {
                let (by, channel, shard) = handoff.settle(done);
                let response = match shard {
                    Ok(shard) => {
                        let info = shard.info.clone();
                        announce(&mut swarm, std::iter::once(&info), relaying);
                        if let Some(replaced) = models.stage(shard, by) {
                            unannounce(&mut swarm, &replaced.info, &models);
                        }
                        handoff::Response::Staged(info)
                    }
                    Err(refusal) => handoff::Response::Refused(refusal),
                };
                let _ = swarm.behaviour_mut().handoff.send_response(channel, response);
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::NewListenAddr { address, .. } => {
                    report_listening(&address, local_id, config.on_listen.as_ref());
                    offer_relay_at(&mut swarm, config.relay_server.is_some(), address);
                }
                SwarmEvent::Behaviour(VeilBehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) if speaks_kad(&info.protocols) => {
                    for addr in info.listen_addrs {
                        if peer_addresses.keep(&addr, Instant::now()) {
                            swarm.behaviour_mut().kad.add_address(&peer_id, addr.clone());
                            writer.send(StateWrite::Peer { peer: peer_id.to_string(), addr: addr.with_p2p(peer_id).unwrap_or_else(|a| a) });
                        }
                    }
                }
                SwarmEvent::Behaviour(VeilBehaviourEvent::Infer(request_response::Event::Message {
                    peer, message: Message::Request { request, channel, .. }, ..
                })) => match infer::handle(&mut sessions, &models, peer, request) {
                    Handled::Now(response) => {
                        let _ = swarm.behaviour_mut().infer.send_response(channel, response);
                    }
                    Handled::Step { session, cache, input } => {
                        let alone = match &decode_batcher {
                            Some(batcher) => batcher.offer((session, cache, input), channel),
                            None => Some(((session, cache, input), channel)),
                        };
                        if let Some((step, channel)) = alone {
                            infer::spawn_step(step, channel, &steps_done);
                        }
                    }
                    Handled::Closed(session) => {
                        let _ = swarm.behaviour_mut().infer.send_response(channel, infer::Response::Closed);
                        keep_run(&mut swarm, &mut writer, history.as_ref(), session);
                    }
                },
                SwarmEvent::Behaviour(VeilBehaviourEvent::Verify(request_response::Event::Message {
                    peer, message: Message::Request { request, channel, .. }, ..
                })) => {
                    if let Some((channel, response)) = verify.handle(&mut sessions, &models, peer, request, channel) {
                        let _ = swarm.behaviour_mut().verify.send_response(channel, response);
                    }
                }
                SwarmEvent::Behaviour(VeilBehaviourEvent::Prove(request_response::Event::Message {
                    message: Message::Request { request, channel, .. }, ..
                })) => {
                    if let Some((channel, response)) = prove.handle(&models, request, channel) {
                        let _ = swarm.behaviour_mut().prove.send_response(channel, response);
                    }
                }
                SwarmEvent::Behaviour(VeilBehaviourEvent::Handoff(request_response::Event::Message {
                    peer, message: Message::Request { request, channel, .. }, ..
                })) => match handoff.handle(&models, peer, request, channel) {
                    handoff::Handled::Now(channel, response) => {
                        let _ = swarm.behaviour_mut().handoff.send_response(channel, response);
                    }
                    handoff::Handled::Load(peer, file, channel) => {
                        spawn_handed_load((peer, file, channel), &models.current().info, &announced, &loaded_tx);
                    }
                    handoff::Handled::Promote(model, channel) => {
                        let response = match models.promote(&model, peer) {
                            Ok(current) => {
                                decode_batcher = infer::DecodeBatcher::start(&current.model, &steps_done);
                                info!("now serving model {} to new sessions (promoted by {peer})", model.get(..12).unwrap_or(&model));
                                handoff::Response::Promoted
                            }
                            Err(why) => handoff::Response::Refused(protocol::Refusal::new(protocol::ErrorKind::BadRequest, why)),
                        };
                        let _ = swarm.behaviour_mut().handoff.send_response(channel, response);
                    }
                    handoff::Handled::Discard(model, channel) => {
                        let response = match models.discard(&model, peer) {
                            Ok(dropped) => {
                                unannounce(&mut swarm, &dropped.info, &models);
                                info!("dropped the staged model {} (discarded by {peer})", model.get(..12).unwrap_or(&model));
                                handoff::Response::Discarded
                            }
                            Err(why) => handoff::Response::Refused(protocol::Refusal::new(protocol::ErrorKind::BadRequest, why)),
                        };
                        let _ = swarm.behaviour_mut().handoff.send_response(channel, response);
                    }
                },
                SwarmEvent::Behaviour(VeilBehaviourEvent::Gossipsub(gossipsub::Event::Message { message, message_id, propagation_source })) => {
                    let verdict = keep_peer_run(&mut writer, &mut gossip_quota, &message);
                    // Rejected records cost their sender score and are not relayed.
                    swarm.behaviour_mut().gossipsub.report_message_validation_result(&message_id, &propagation_source, verdict);
                }
                // Garbage, oversized or truncated requests end here; the node carries on.
                SwarmEvent::Behaviour(VeilBehaviourEvent::Infer(request_response::Event::InboundFailure { peer, error, .. }))
                | SwarmEvent::Behaviour(VeilBehaviourEvent::Verify(request_response::Event::InboundFailure { peer, error, .. }))
                | SwarmEvent::Behaviour(VeilBehaviourEvent::Prove(request_response::Event::InboundFailure { peer, error, .. }))
                | SwarmEvent::Behaviour(VeilBehaviourEvent::Handoff(request_response::Event::InboundFailure { peer, error, .. })) => {
                    warn!("request from {peer} failed: {error}");
                }
                SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                    relays.connected(&mut swarm, peer_id, endpoint.get_remote_address());
                }
                SwarmEvent::Behaviour(VeilBehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                    result: kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders { key, providers })),
                    ..
                })) if key == relay_key() => {
                    for relay in providers {
                        relays.found(&mut swarm, relay);
                    }
                }
                SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error: DialError::Transport(failed), .. } => {
                    for (addr, error) in failed {
                        // A relayed address fails with its relay's mood; only direct ones are left out.
                        if addr.iter().any(|p| p == Protocol::P2pCircuit) {
                            continue;
                        }
                        let addr = without_peer(addr);
                        debug!("{addr} of {peer} unreachable ({error}); left out for a while");
                        swarm.behaviour_mut().kad.remove_address(&peer, &addr);
                        peer_addresses.failed(addr, Instant::now());
                    }
                }
                SwarmEvent::ConnectionClosed { peer_id, cause, .. } => {
                    debug!("connection to {peer_id} closed: {cause:?}");
                    relays.disconnected(&mut swarm, peer_id);
                }
                SwarmEvent::Behaviour(VeilBehaviourEvent::Relay(event)) => log_relay(&event),
                SwarmEvent::Behaviour(VeilBehaviourEvent::Autonat(autonat::Event::StatusChanged { new, .. })) => match new {
                    autonat::NatStatus::Public(addr) => info!("reachability: public, dialed back at {addr}"),
                    autonat::NatStatus::Private => {
                        info!("reachability: private (behind a NAT or firewall): peers cannot dial this node");
                        if relays.want_at_least(RELAYS_WHEN_PRIVATE) {
                            info!("looking for {RELAYS_WHEN_PRIVATE} relays in the DHT");
                            relays.dial(&mut swarm);
                        }
                    }
                    autonat::NatStatus::Unknown => info!("reachability: unknown"),
                },
                SwarmEvent::Behaviour(VeilBehaviourEvent::RelayClient(
                    relay::client::Event::ReservationReqAccepted { relay_peer_id, renewal: false, .. },
                )) => info!("reserved a slot on relay {relay_peer_id}"),
                SwarmEvent::Behaviour(VeilBehaviourEvent::Dcutr(dcutr::Event { remote_peer_id, result })) => match result {
                    Ok(_) => info!("hole punched: a direct connection to {remote_peer_id}"),
                    Err(e) => info!("no direct connection to {remote_peer_id}, staying relayed: {e}"),
                },
                SwarmEvent::ListenerClosed { addresses, reason, .. } => {
                    if let Err(e) = reason {
                        warn!("stopped listening on {addresses:?}: {e}");
                    }
                    relays.listener_closed(&addresses);
                }
                other => debug!("{other:?}"),
            }
        }
    }
}

/// What a node announces beside the shard itself: the same for every shard it is handed.
struct Announced {
    format: WeightFormat,
    max_tokens: usize,
    tee: Option<veil_tee::TeeKind>,
    zk_commitment: Option<String>,
    misbehave: Option<Misbehaviour>,
}

impl Announced {
    /// What the node announces for `model`, cut as `manifest` says, committed to as `weights`.
    fn info(
        &self,
        manifest: &ShardManifest,
        model: &ShardModel,
        weights: &WeightsCommitment,
    ) -> ShardInfo {
        ShardInfo {
            model_digest: manifest.model_digest.clone(),
            first_block: manifest.first_block,
            end_block: manifest.end_block,
            block_count: manifest.block_count,
            embedding: manifest.embedding,
            head: manifest.head,
            hidden_size: model.config().hidden_size,
            max_session_tokens: self.max_tokens.min(model.config().context_length),
            format: self.format.to_string(),
            tee: self.tee,
            weights: Some(WeightsRoot {
                root: weights.root_hex(),
                leaves: weights.leaf_count() as u64,
            }),
            zk_commitment: self.zk_commitment.clone(),
            // A cheat (test-only) announces what an honest node of its claimed format would: its
            // own weights may have been swapped for ones that are not.
            exact: match self.misbehave {
                None => model.bit_reproducible(),
                Some(_) => !matches!(self.format, WeightFormat::F32 | WeightFormat::F16),
            },
        }
    }
}

/// Loads the shard file at `path` to serve in `format` (cheating as `misbehave` says), with
/// what it is a shard of and the commitment to its weights. Blocking.
fn load_shard(
    path: &std::path::Path,
    format: WeightFormat,
    misbehave: Option<Misbehaviour>,
) -> Result<(ShardModel, ShardManifest, WeightsCommitment)> {
    let mut gguf = GgufFile::open(path)?;
    let manifest = ShardManifest::of(&gguf)?;
    let shard = manifest.shard();
    let whole = shard.embedding && shard.head && shard.layers.len() == manifest.block_count;
    if let Some(kind) = misbehave.filter(|k| !k.in_weights() && !whole) {
        return Err(NetError::BadMessage(format!(
            "--misbehave {kind} needs a node serving the whole model"
        )));
    }
    let model = load_serving_shard(&mut gguf, &shard, format, misbehave)?;
    let weights = WeightsCommitment::of_shard(&mut gguf, &shard)
        .map_err(|e| NetError::BadMessage(format!("cannot commit to the weights: {e}")))?;
    Ok((model, manifest, weights))
}

/// Loads a handed-over shard file on a blocking thread and checks it can follow `current`;
/// the outcome comes back on `loaded`.
fn spawn_handed_load(
    (peer, file, channel): (PeerId, PathBuf, ResponseChannel<handoff::Response>),
    current: &ShardInfo,
    announced: &Arc<Announced>,
    loaded: &mpsc::UnboundedSender<handoff::Loaded>,
) {
    let (current, announced, loaded) = (current.clone(), Arc::clone(announced), loaded.clone());
    tokio::task::spawn_blocking(move || {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let (model, manifest, weights) =
                load_shard(&file, announced.format, announced.misbehave)
                    .map_err(|e| format!("it does not load: {e}"))?;
            let info = announced.info(&manifest, &model, &weights);
            handoff::check_successor(&current, &info)?;
            Ok(ServedShard {
                model: Arc::new(model),
                info,
                file: file.clone(),
                weights: Arc::new(weights),
                handed: true,
            })
        }))
        .unwrap_or_else(|_| Err("loading it failed inside the node".to_string()));
        if outcome.is_err() {
            let _ = std::fs::remove_file(&file);
        }
        let _ = loaded.send(handoff::Loaded {
            peer,
            channel,
            shard: outcome,
        });
    });
}

/// `addr` without a trailing `/p2p/<peer id>`, as the DHT keeps addresses.
fn without_peer(mut addr: Multiaddr) -> Multiaddr {
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.pop();
    }
    addr
}

/// Keeps the run record of a finished plain session and shares it with peers.
fn keep_run(
    swarm: &mut Swarm<VeilBehaviour>,
    writer: &mut StateWriter,
    history: Option<&RunTemplate>,
    session: NodeSession,
) {
    let (Some(template), NodeSession::Plain(_, usage, _)) = (history, session) else {
        return;
    };
    let at_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let Some(record) = template.record(&usage, swarm.local_peer_id(), at_unix) else {
        return;
    };
    let (throughput, shared) = (record.throughput(), serde_json::to_vec(&record));
    if !writer.send(StateWrite::Run(Box::new(record))) {
        return;
    }
    info!(
        "kept run record: {} prompt tokens, {} generated, {throughput:.1} tok/s",
        usage.prompt_tokens, usage.steps,
    );
    if !template.share {
        return;
    }
    let topic = gossipsub::IdentTopic::new(RUNS_TOPIC);
    match shared {
        Ok(bytes) => {
            if let Err(e) = swarm.behaviour_mut().gossipsub.publish(topic, bytes) {
                debug!("run record not shared: {e}");
            }
        }
        Err(e) => warn!("cannot encode a run record: {e}"),
    }
}

/// Keeps a run record a peer shared, once it passes the checks and while there is room; says
/// whether gossipsub should relay it (accepted), drop it quietly (ignored: no room), or count
/// it against whoever sent it (rejected: it fails the checks).
fn keep_peer_run(
    writer: &mut StateWriter,
    quota: &mut AuthorQuota,
    message: &gossipsub::Message,
) -> gossipsub::MessageAcceptance {
    use gossipsub::MessageAcceptance::{Accept, Ignore, Reject};
    let record = match accept_gossiped(&message.data, message.source) {
        Ok(r) => r,
        Err(e) => {
            warn!("refused a run record from {:?}: {e}", message.source);
            return Reject;
        }
    };
    if !quota.admit(&record.node) {
        debug!("run record from {} dropped: its share is full", record.node);
        return Ignore;
    }
    if writer.runs() >= MAX_KEPT_RUNS {
        debug!("run record from {} dropped: history full", record.node);
        return Ignore;
    }
    let node = record.node.clone();
    if !writer.send(StateWrite::Run(Box::new(record))) {
        return Ignore;
    }
    info!("kept run record from peer {node}");
    Accept
}

/// Prints a listen address (parents, the demo and tests, read this line to find the node) and
/// hands it to whoever asked.
fn report_listening(
    address: &Multiaddr,
    local_id: PeerId,
    on_listen: Option<&mpsc::UnboundedSender<Multiaddr>>,
) {
    // A relayed address already ends in this node's id.
    let address = address.clone().with_p2p(local_id).unwrap_or_else(|a| a);
    // A parent that stopped reading (closed the pipe) must not bring the node down.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening on {address}").and_then(|()| out.flush());
    if let Some(tx) = on_listen {
        let _ = tx.send(address);
    }
}

/// Dials the bootstrap peers and adds them to the routing table.
pub(crate) fn join(swarm: &mut Swarm<VeilBehaviour>, bootstrap: &[Multiaddr]) -> Result<()> {
    for addr in bootstrap {
        let Some(peer) = peer_of(addr) else {
            return Err(NetError::Network(format!(
                "bootstrap address {addr} must end in /p2p/<peer id> (as printed by the node)"
            )));
        };
        if peer == *swarm.local_peer_id() {
            continue;
        }
        swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
        if let Err(e) = swarm.dial(addr.clone()) {
            warn!("cannot dial {addr}: {e}");
        }
    }
    if !bootstrap.is_empty() {
        let _ = swarm.behaviour_mut().kad.bootstrap();
    }
    Ok(())
}

/// Announces in the DHT the models and ranges of the shards held (and the private model this
/// node proves, and its relay service).
fn announce<'a>(
    swarm: &mut Swarm<VeilBehaviour>,
    infos: impl Iterator<Item = &'a ShardInfo>,
    relaying: bool,
) {
    let kad = &mut swarm.behaviour_mut().kad;
    let mut keys = Vec::new();
    for info in infos {
        keys.push(model_key(&info.model_digest));
        keys.push(range_key(
            &info.model_digest,
            info.first_block,
            info.end_block,
        ));
        keys.extend(info.zk_commitment.as_deref().map(zk_key));
    }
    keys.extend(relaying.then(relay_key));
    for key in keys {
        if let Err(e) = kad.start_providing(key) {
            warn!("cannot announce: {e}");
        }
    }
}

/// Stops announcing the model of a shard no longer held (unless a held one shares it).
fn unannounce(swarm: &mut Swarm<VeilBehaviour>, dropped: &ShardInfo, models: &NodeModels) {
    if models.find(Some(&dropped.model_digest)).is_some() {
        return;
    }
    let kad = &mut swarm.behaviour_mut().kad;
    kad.stop_providing(&model_key(&dropped.model_digest));
    kad.stop_providing(&range_key(
        &dropped.model_digest,
        dropped.first_block,
        dropped.end_block,
    ));
}

/// Where shards handed to the node are kept: beside its database and named after it
/// (`node.redb.handoff`), so nodes whose databases share a directory never share it, and each
/// clears only its own leftovers at start.
fn handoff_dir(state: &std::path::Path) -> PathBuf {
    let mut name = state
        .file_name()
        .map_or_else(|| "node".into(), std::ffi::OsStr::to_os_string);
    name.push(".handoff");
    state.with_file_name(name)
}

/// The peer id at the end of an address, if any.
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

/// Whether an address is worth keeping in the routing table (not unspecified).
pub(crate) fn is_routable(addr: &Multiaddr) -> bool {
    !addr.iter().any(|p| {
        matches!(p, libp2p::multiaddr::Protocol::Ip4(ip) if ip.is_unspecified())
            || matches!(p, libp2p::multiaddr::Protocol::Ip6(ip) if ip.is_unspecified())
    })
}
