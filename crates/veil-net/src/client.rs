//! The client side of the swarm: a libp2p peer that finds the nodes serving a model and sends
//! them requests. A background task owns the swarm; [`SwarmClient`] talks to it over channels,
//! so callers just `await` answers.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::kad::{self, GetProvidersOk, QueryResult, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, Message, OutboundRequestId};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::SwarmEvent;
use libp2p::{identify, Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::behaviour::{build_swarm, model_key, range_key, VeilBehaviour, VeilBehaviourEvent};
use crate::client_paths::DirectPaths;
use crate::error::{NetError, Result};
use crate::node::join;
use crate::protocol::{handoff, infer, prove, verify, Answer};
use crate::wire::ShardInfo;

/// A node found serving part of a model, with how fast it answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The node.
    pub peer: PeerId,
    /// What it serves.
    pub info: ShardInfo,
    /// Round trip of its `Info` request.
    pub latency: Duration,
}

/// Where an answer goes.
type Reply<R> = oneshot::Sender<Result<R>>;

enum Command {
    Infer(PeerId, infer::Request, Reply<infer::Response>),
    Verify(PeerId, verify::Request, Reply<verify::Response>),
    Prove(PeerId, prove::Request, Reply<prove::Response>),
    Handoff(PeerId, handoff::Request, Reply<handoff::Response>),
    Providers {
        key: RecordKey,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    Connected {
        reply: oneshot::Sender<usize>,
    },
}

/// A handle on the client's swarm task; cheap to clone.
#[derive(Clone)]
pub struct SwarmClient {
    commands: mpsc::UnboundedSender<Command>,
    local_id: PeerId,
    /// The client's connections by kind; its swarm task keeps them, `is_relayed` reads them.
    paths: Arc<Mutex<DirectPaths>>,
}

impl SwarmClient {
    /// Starts a client peer (fresh identity) that joins through `bootstrap`, and waits up to
    /// `join_timeout` for a first connection.
    pub async fn connect(
        bootstrap: &[Multiaddr],
        request_timeout: Duration,
        join_timeout: Duration,
    ) -> Result<Self> {
        Self::connect_listening(bootstrap, &[], request_timeout, join_timeout).await
    }

    /// [`SwarmClient::connect`] for a client that also listens on `listen`. Behind a NAT, hole
    /// punching (DCUtR) needs that: the client's connections then leave from its listening
    /// port, so the address the relay observes is one a node can punch through to.
    pub async fn connect_listening(
        bootstrap: &[Multiaddr],
        listen: &[Multiaddr],
        request_timeout: Duration,
        join_timeout: Duration,
    ) -> Result<Self> {
        let key = libp2p::identity::Keypair::generate_ed25519();
        Self::connect_as(key, bootstrap, listen, request_timeout, join_timeout).await
    }

    /// [`SwarmClient::connect_listening`] under the identity `key`: for a key holder whose
    /// nodes take re-encrypted shards only from its peer id (`veil node --accept-shards-from`).
    pub async fn connect_as(
        key: libp2p::identity::Keypair,
        bootstrap: &[Multiaddr],
        listen: &[Multiaddr],
        request_timeout: Duration,
        join_timeout: Duration,
    ) -> Result<Self> {
        if bootstrap.is_empty() {
            return Err(NetError::Network(
                "give at least one bootstrap address (--bootstrap /ip4/.../p2p/<peer id>)".into(),
            ));
        }
        let local_id = key.public().to_peer_id();
        let mut swarm = build_swarm(key, request_timeout, None)?;
        swarm.behaviour_mut().kad.set_mode(Some(kad::Mode::Client));
        listen_first(&mut swarm, listen).await?;
        join(&mut swarm, bootstrap)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let paths = Arc::new(Mutex::new(DirectPaths::default()));
        tokio::spawn(drive(swarm, rx, Arc::clone(&paths)));
        let client = Self {
            commands: tx,
            local_id,
            paths,
        };
        let deadline = Instant::now() + join_timeout;
        while client.connected().await? == 0 {
            if Instant::now() > deadline {
                return Err(NetError::Network(format!(
                    "no bootstrap peer answered within {join_timeout:?}: is the node running?"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(client)
    }

    /// This client's peer id.
    pub fn local_id(&self) -> PeerId {
        self.local_id
    }

    /// Whether every open connection to `peer` goes through a relay (none direct: a node
    /// behind a NAT that hole punching has not reached).
    pub fn is_relayed(&self, peer: &PeerId) -> bool {
        lock(&self.paths).only_relayed(peer)
    }

    /// Sends an inference request and waits for the answer. A refusal is a
    /// [`NetError::Refused`]; a peer that is gone, stalls past the request timeout, or sends
    /// garbage is a [`NetError::PeerFailed`].
    pub async fn infer(&self, peer: PeerId, request: infer::Request) -> Result<infer::Response> {
        self.ask(|reply| Command::Infer(peer, request, reply)).await
    }

    /// Sends a verification request and waits for the answer, as [`SwarmClient::infer`] does.
    pub async fn verify(&self, peer: PeerId, request: verify::Request) -> Result<verify::Response> {
        self.ask(|reply| Command::Verify(peer, request, reply))
            .await
    }

    /// Sends a challenge and waits for the answer, as [`SwarmClient::infer`] does.
    pub async fn prove(&self, peer: PeerId, request: prove::Request) -> Result<prove::Response> {
        self.ask(|reply| Command::Prove(peer, request, reply)).await
    }

    /// Sends a shard handoff request and waits for the answer, as [`SwarmClient::infer`] does.
    pub async fn handoff(
        &self,
        peer: PeerId,
        request: handoff::Request,
    ) -> Result<handoff::Response> {
        self.ask(|reply| Command::Handoff(peer, request, reply))
            .await
    }

    /// Hands `peer` the shard file at `file` in chunks and waits until it has loaded and staged
    /// it; returns what it announces for it.
    pub async fn hand_off_shard(&self, peer: PeerId, file: &std::path::Path) -> Result<ShardInfo> {
        let unreadable = |e: std::io::Error| {
            NetError::Network(format!("cannot read the shard {}: {e}", file.display()))
        };
        // Two passes over the file, a chunk in memory at a time: the digest goes first.
        let mut hasher = blake3::Hasher::new();
        hasher
            .update_reader(std::fs::File::open(file).map_err(unreadable)?)
            .map_err(unreadable)?;
        let bytes = std::fs::metadata(file).map_err(unreadable)?.len();
        let begin = handoff::Request::Begin {
            bytes,
            blake3: hasher.finalize().to_hex().to_string(),
        };
        self.handoff(peer, begin).await?;
        let mut reader = std::fs::File::open(file).map_err(unreadable)?;
        let mut offset = 0u64;
        while offset < bytes {
            let mut data = vec![0u8; handoff::CHUNK_BYTES.min((bytes - offset) as usize)];
            std::io::Read::read_exact(&mut reader, &mut data).map_err(unreadable)?;
            let len = data.len() as u64;
            self.handoff(peer, handoff::Request::Chunk { offset, data })
                .await?;
            offset += len;
        }
        match self.handoff(peer, handoff::Request::Finish).await? {
            handoff::Response::Staged(info) => Ok(info),
            other => Err(NetError::BadMessage(format!(
                "{peer} answered a finished handoff with {other:?}"
            ))),
        }
    }

    async fn ask<R>(&self, command: impl FnOnce(Reply<R>) -> Command) -> Result<R> {
        let (reply, answer) = oneshot::channel();
        self.send(command(reply))?;
        answer.await.map_err(|_| task_gone())?
    }

    /// Peers announcing `key` in the DHT.
    pub async fn providers(&self, key: RecordKey) -> Result<Vec<PeerId>> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Providers { key, reply })?;
        answer.await.map_err(|_| task_gone())
    }

    async fn connected(&self) -> Result<usize> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Connected { reply })?;
        answer.await.map_err(|_| task_gone())
    }

    fn send(&self, command: Command) -> Result<()> {
        self.commands.send(command).map_err(|_| task_gone())
    }

    /// Every node serving part of the model `model_digest`, asked what it serves; nodes that do
    /// not answer, or serve another model, are left out.
    pub async fn discover(&self, model_digest: &str) -> Result<Vec<Candidate>> {
        let peers = self.providers(model_key(model_digest)).await?;
        self.describe(peers, model_digest).await
    }

    /// Nodes serving exactly `first..end` of the model, for failover.
    pub async fn discover_range(
        &self,
        model_digest: &str,
        first: usize,
        end: usize,
    ) -> Result<Vec<Candidate>> {
        let peers = self.providers(range_key(model_digest, first, end)).await?;
        let found = self.describe(peers, model_digest).await?;
        Ok(found
            .into_iter()
            .filter(|c| c.info.first_block == first && c.info.end_block == end)
            .collect())
    }

    async fn describe(&self, peers: Vec<PeerId>, model_digest: &str) -> Result<Vec<Candidate>> {
        let asks = peers.into_iter().map(|peer| async move {
            let started = Instant::now();
            let model = Some(model_digest.to_string());
            match self.infer(peer, infer::Request::Info { model }).await {
                Ok(infer::Response::Info(info)) if info.model_digest == model_digest => {
                    Some(Candidate {
                        peer,
                        info,
                        latency: started.elapsed(),
                    })
                }
                other => {
                    debug!("{peer} left out: {other:?}");
                    None
                }
            }
        });
        Ok(futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect())
    }
}

fn task_gone() -> NetError {
    NetError::Network("the client's network task stopped".into())
}

/// Answers awaited on one protocol. Request ids are counted per protocol, so each has its own.
struct Awaited<R>(HashMap<OutboundRequestId, (PeerId, Reply<R>)>);

impl<R: Answer> Awaited<R> {
    fn new() -> Self {
        Self(HashMap::new())
    }

    fn waits_on(&self, peer: &PeerId) -> bool {
        self.0.values().any(|(p, _)| p == peer)
    }

    /// Hands an answer, a refusal or a failure to whoever waits for it; returns the peer of a
    /// request that was settled.
    fn settle<Q>(&mut self, event: request_response::Event<Q, R>) -> Option<PeerId> {
        let (request_id, answer) = match event {
            request_response::Event::Message {
                peer,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                let answer = response.refusal().map_err(|r| NetError::Refused {
                    peer: peer.to_string(),
                    message: r.message,
                });
                (request_id, answer)
            }
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                let failed = NetError::PeerFailed {
                    peer: peer.to_string(),
                    reason: error.to_string(),
                };
                (request_id, Err(failed))
            }
            _ => return None,
        };
        let (peer, reply) = self.0.remove(&request_id)?;
        let _ = reply.send(answer);
        Some(peer)
    }
}

/// What the client waits for: answers on each protocol and DHT queries.
struct Pending {
    inferring: Awaited<infer::Response>,
    verifying: Awaited<verify::Response>,
    proving: Awaited<prove::Response>,
    handing: Awaited<handoff::Response>,
    queries: HashMap<kad::QueryId, (HashSet<PeerId>, oneshot::Sender<Vec<PeerId>>)>,
}

impl Pending {
    /// Sends what `command` asks for.
    fn start(&mut self, swarm: &mut Swarm<VeilBehaviour>, command: Command) {
        match command {
            Command::Infer(peer, request, reply) => {
                let id = swarm.behaviour_mut().infer.send_request(&peer, request);
                self.inferring.0.insert(id, (peer, reply));
            }
            Command::Verify(peer, request, reply) => {
                let id = swarm.behaviour_mut().verify.send_request(&peer, request);
                self.verifying.0.insert(id, (peer, reply));
            }
            Command::Prove(peer, request, reply) => {
                let id = swarm.behaviour_mut().prove.send_request(&peer, request);
                self.proving.0.insert(id, (peer, reply));
            }
            Command::Handoff(peer, request, reply) => {
                let id = swarm.behaviour_mut().handoff.send_request(&peer, request);
                self.handing.0.insert(id, (peer, reply));
            }
            Command::Providers { key, reply } => {
                let id = swarm.behaviour_mut().kad.get_providers(key);
                self.queries.insert(id, (HashSet::new(), reply));
            }
            Command::Connected { reply } => {
                let _ = reply.send(swarm.connected_peers().count());
            }
        }
    }

    /// Whether a request to `peer` awaits its answer.
    fn in_flight(&self, peer: &PeerId) -> bool {
        self.inferring.waits_on(peer)
            || self.verifying.waits_on(peer)
            || self.proving.waits_on(peer)
            || self.handing.waits_on(peer)
    }
}

impl Command {
    /// The peer a request goes to.
    fn peer(&self) -> Option<PeerId> {
        match self {
            Command::Infer(peer, ..)
            | Command::Verify(peer, ..)
            | Command::Prove(peer, ..)
            | Command::Handoff(peer, ..) => Some(*peer),
            Command::Providers { .. } | Command::Connected { .. } => None,
        }
    }
}

/// Closes `peer`'s relayed connections if [`DirectPaths`] says it is time.
fn close_relayed(
    swarm: &mut Swarm<VeilBehaviour>,
    paths: &mut DirectPaths,
    pending: &Pending,
    peer: PeerId,
) {
    for id in paths.start_closing(peer, !pending.in_flight(&peer)) {
        debug!("closing the relayed connection to {peer}: a direct one is open");
        if !swarm.close_connection(id) {
            paths.closed(peer, id);
        }
    }
}

/// The swarm task: runs commands, routes answers back.
async fn drive(
    mut swarm: Swarm<VeilBehaviour>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    paths: Arc<Mutex<DirectPaths>>,
) {
    let mut pending = Pending {
        inferring: Awaited::new(),
        verifying: Awaited::new(),
        proving: Awaited::new(),
        handing: Awaited::new(),
        queries: HashMap::new(),
    };
    // Requests held until their peer's relayed connections have closed.
    let mut held: Vec<Command> = Vec::new();
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                None => return,
                Some(command) => match command.peer() {
                    Some(peer) if lock(&paths).must_wait(&peer) => held.push(command),
                    _ => pending.start(&mut swarm, command),
                },
            },
            event = swarm.select_next_some() => match event {
                SwarmEvent::Behaviour(VeilBehaviourEvent::Infer(event)) => {
                    if let Some(peer) = pending.inferring.settle(event) {
                        close_relayed(&mut swarm, &mut lock(&paths), &pending, peer);
                    }
                }
                SwarmEvent::Behaviour(VeilBehaviourEvent::Verify(event)) => {
                    if let Some(peer) = pending.verifying.settle(event) {
                        close_relayed(&mut swarm, &mut lock(&paths), &pending, peer);
                    }
                }
                SwarmEvent::Behaviour(VeilBehaviourEvent::Prove(event)) => {
                    if let Some(peer) = pending.proving.settle(event) {
                        close_relayed(&mut swarm, &mut lock(&paths), &pending, peer);
                    }
                }
                SwarmEvent::Behaviour(VeilBehaviourEvent::Handoff(event)) => {
                    if let Some(peer) = pending.handing.settle(event) {
                        close_relayed(&mut swarm, &mut lock(&paths), &pending, peer);
                    }
                }
                SwarmEvent::Behaviour(VeilBehaviourEvent::Kad(kad::Event::OutboundQueryProgressed { id, result, step, .. })) => {
                    if let QueryResult::GetProviders(result) = result {
                        if let Ok(GetProvidersOk::FoundProviders { providers, .. }) = result {
                            for peer in &providers {
                                // Dial now, while the query still knows the provider's address.
                                if !swarm.is_connected(peer) {
                                    let _ = swarm.dial(DialOpts::peer_id(*peer).build());
                                }
                            }
                            if let Some((found, _)) = pending.queries.get_mut(&id) {
                                found.extend(providers);
                            }
                        }
                        if step.last {
                            if let Some((found, reply)) = pending.queries.remove(&id) {
                                let _ = reply.send(found.into_iter().collect());
                            }
                        }
                    }
                }
                SwarmEvent::Behaviour(VeilBehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                    for addr in info.listen_addrs {
                        swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
                SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, .. } => {
                    let address = endpoint.get_remote_address();
                    let mut paths = lock(&paths);
                    paths.opened(peer_id, connection_id, is_relayed(address));
                    close_relayed(&mut swarm, &mut paths, &pending, peer_id);
                }
                SwarmEvent::ConnectionClosed { peer_id, connection_id, .. } => {
                    let released = lock(&paths).closed(peer_id, connection_id);
                    if released {
                        let (go, stay) = held.drain(..).partition(|c: &Command| c.peer() == Some(peer_id));
                        held = stay;
                        for command in go {
                            pending.start(&mut swarm, command);
                        }
                    }
                }
                other => debug!("{other:?}"),
            }
        }
    }
}

/// Whether a connection's address goes through a relay.
fn is_relayed(address: &Multiaddr) -> bool {
    address.iter().any(|p| p == Protocol::P2pCircuit)
}

/// Listens on `addresses` and waits until each listener is bound, so that the dials that follow
/// leave from its port (libp2p reuses a listening port for outgoing connections).
async fn listen_first(swarm: &mut Swarm<VeilBehaviour>, addresses: &[Multiaddr]) -> Result<()> {
    let mut waiting = HashSet::new();
    for addr in addresses {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Network(format!("cannot listen on {addr}: {e}")))?;
        waiting.insert(id);
    }
    while !waiting.is_empty() {
        let event = tokio::time::timeout(Duration::from_secs(10), swarm.select_next_some())
            .await
            .map_err(|_| NetError::Network("no listen address within 10 s".into()))?;
        match event {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                debug!("client listening on {address}");
                waiting.remove(&listener_id);
            }
            SwarmEvent::ListenerError { error, .. } => {
                return Err(NetError::Network(format!("listener failed: {error}")));
            }
            other => debug!("{other:?}"),
        }
    }
    Ok(())
}

/// The paths, even if a thread panicked holding them (they stay consistent: every change is
/// one call).
fn lock(paths: &Mutex<DirectPaths>) -> std::sync::MutexGuard<'_, DirectPaths> {
    paths.lock().unwrap_or_else(|e| e.into_inner())
}
