//! The libp2p behaviour every Veil peer runs, composed from maintained parts: identify (learn a
//! peer's listen addresses), ping (liveness, latency), Kademlia (who serves which shard),
//! request-response for each of Veil's protocols ([`crate::protocol`]: inference,
//! verification, proofs, shard handoff; CBOR, each with its own message bounds and stream budget), gossipsub
//! (MetaInf's run records, signed by their authors) and connection limits (so no peer, and no
//! crowd of peers, can hold more connections than a node can serve, and a node short of memory
//! takes no more), and for nodes behind NATs circuit relay v2 (a reachable node relays, within
//! [`RelayLimits`]; a node behind a NAT reserves a slot and is dialed through it) and DCUtR (hole
//! punching upgrades a relayed connection to a direct one).

use std::num::NonZeroU32;
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::request_response::cbor;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    autonat, connection_limits, dcutr, gossipsub, identify, memory_connection_limits, noise, ping,
    relay, tcp, yamux, StreamProtocol, Swarm, SwarmBuilder,
};

use crate::error::{NetError, Result};
use crate::history::{MAX_GOSSIP_BYTES, RUNS_TOPIC};
use crate::protocol::{handoff, infer, prove, verify};

/// Veil's private Kademlia protocol, so the DHT holds only Veil peers.
const KAD_PROTOCOL: &str = "/veil/kad/1.0.0";

/// Whether a peer's identify protocols include the DHT's: nodes do, clients (the DHT's client
/// mode) do not, so a node keeps only other nodes' addresses.
pub(crate) fn speaks_kad(protocols: &[StreamProtocol]) -> bool {
    protocols.iter().any(|p| p.as_ref() == KAD_PROTOCOL)
}

/// Connections one peer may hold open to a node at once: room for a TCP and a QUIC connection,
/// or two dials crossing; each connection multiplies what one peer may have in flight (see
/// [`crate::protocol::ProtocolSpec::max_streams`]).
pub const MAX_CONNECTIONS_PER_PEER: u32 = 2;
/// Connections a node accepts from all peers together.
pub const MAX_INCOMING_CONNECTIONS: u32 = 256;
/// Connections a node lets sit in the handshake at once.
pub const MAX_PENDING_INCOMING: u32 = 64;
/// The parts of a Veil peer.
#[derive(NetworkBehaviour)]
pub struct VeilBehaviour {
    /// Refuses connections beyond [`MAX_CONNECTIONS_PER_PEER`] and the node-wide caps.
    pub limits: connection_limits::Behaviour,
    /// Refuses new connections while the process's memory is over its limit.
    pub memory: memory_connection_limits::Behaviour,
    /// Exchanges listen addresses and protocol lists.
    pub identify: identify::Behaviour,
    /// Keeps connections alive and measures round trips.
    pub ping: ping::Behaviour,
    /// Provider records: which peers serve which shard.
    pub kad: kad::Behaviour<MemoryStore>,
    /// Sessions on a shard: [`infer`].
    pub infer: cbor::Behaviour<infer::Request, infer::Response>,
    /// Verified sessions and judging: [`verify`].
    pub verify: cbor::Behaviour<verify::Request, verify::Response>,
    /// Weight openings, TEE evidence, proofs: [`prove`].
    pub prove: cbor::Behaviour<prove::Request, prove::Response>,
    /// Shards re-encrypted under a new key, from the key holder: [`handoff`].
    pub handoff: cbor::Behaviour<handoff::Request, handoff::Response>,
    /// Run records shared between nodes.
    pub gossipsub: gossipsub::Behaviour,
    /// Relays circuits for peers behind NATs, on nodes that offer it (`veil node --relay-server`).
    pub relay: Toggle<relay::Behaviour>,
    /// Reserves slots on relays and dials peers through them.
    pub relay_client: relay::client::Behaviour,
    /// Upgrades a relayed connection to a direct one by hole punching, where the NATs allow.
    pub dcutr: dcutr::Behaviour,
    /// Tells a node whether others can dial it (AutoNAT: connected nodes try to dial it back),
    /// and dials back for other nodes; off in clients.
    pub autonat: Toggle<autonat::Behaviour>,
}

/// How a node takes part in AutoNAT.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReachabilityProbes {
    /// Also probe, and dial back, addresses in private ranges (a swarm on a LAN, or the NAT
    /// lab's namespaces). Off by default: dialing back private addresses would let a stranger
    /// make a node probe its own LAN.
    pub private_addresses: bool,
}

impl ReachabilityProbes {
    fn config(self) -> autonat::Config {
        autonat::Config {
            boot_delay: Duration::from_secs(2),
            retry_interval: Duration::from_secs(30),
            only_global_ips: !self.private_addresses,
            ..autonat::Config::default()
        }
    }
}

/// What a node that relays for others allows. libp2p's defaults (128 KiB and 2 minutes a
/// circuit) suit a hole-punching handshake, not inference: one step of a 37-token prompt carries
/// about 85 KB of hidden states. A relayed hop stays relayed where punching fails (symmetric
/// NATs), so a circuit here may carry a whole generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayLimits {
    /// Slots reserved on this node at once, over all peers.
    pub max_reservations: usize,
    /// Slots one peer may reserve.
    pub max_reservations_per_peer: usize,
    /// Circuits relayed at once, over all peers.
    pub max_circuits: usize,
    /// Circuits one peer may have relayed at once.
    pub max_circuits_per_peer: usize,
    /// How long one circuit may last.
    pub max_circuit_duration: Duration,
    /// Bytes one circuit may carry (both ways together).
    pub max_circuit_bytes: u64,
    /// New circuits one peer may open at once, then one more per `circuit_refill`.
    pub circuit_burst_per_peer: u32,
    /// New circuits one IP address may open at once (every client behind one NAT shares it),
    /// then one more per `circuit_refill`.
    pub circuit_burst_per_ip: u32,
    /// How often one more circuit is allowed after a burst.
    pub circuit_refill: Duration,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_reservations: 128,
            max_reservations_per_peer: 4,
            max_circuits: 16,
            max_circuits_per_peer: 4,
            max_circuit_duration: Duration::from_secs(30 * 60),
            max_circuit_bytes: 256 << 20,
            // libp2p's defaults (30 per peer and 60 per IP address, then one a minute or two)
            // suit hole-punching handshakes; here each generation of a client opens one circuit
            // per relayed hop, and a NAT's users share one address.
            circuit_burst_per_peer: 60,
            circuit_burst_per_ip: 240,
            circuit_refill: Duration::from_secs(1),
        }
    }
}

impl RelayLimits {
    /// libp2p's relay configuration with these limits (and its default reservation rates).
    fn config(self) -> relay::Config {
        let burst = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        relay::Config {
            max_reservations: self.max_reservations,
            max_reservations_per_peer: self.max_reservations_per_peer,
            max_circuits: self.max_circuits,
            max_circuits_per_peer: self.max_circuits_per_peer,
            max_circuit_duration: self.max_circuit_duration,
            max_circuit_bytes: self.max_circuit_bytes,
            circuit_src_rate_limiters: Vec::new(),
            ..relay::Config::default()
        }
        .circuit_src_per_peer(burst(self.circuit_burst_per_peer), self.circuit_refill)
        .circuit_src_per_ip(burst(self.circuit_burst_per_ip), self.circuit_refill)
    }
}

/// Builds a swarm over TCP and QUIC (Noise, Yamux) for `key`; `request_timeout` bounds how long
/// a request may wait for its answer (a peer that stalls).
/// Share of the machine's memory past which a peer takes no new connections (by default).
pub const MAX_MEMORY_SHARE: f64 = 0.9;

/// Where a peer stops taking new connections: at `Some(bytes)` of its own memory, or (`None`)
/// at [`MAX_MEMORY_SHARE`] of the machine's.
pub fn build_swarm(
    key: Keypair,
    request_timeout: Duration,
    max_memory_bytes: Option<usize>,
) -> Result<Swarm<VeilBehaviour>> {
    build_node_swarm(key, request_timeout, max_memory_bytes, None, None)
}

/// [`build_swarm`] for a node: one that also relays for others within `relay` (`None`: it does
/// not) and learns its reachability with `probes` (`None`: it does not).
pub fn build_node_swarm(
    key: Keypair,
    request_timeout: Duration,
    max_memory_bytes: Option<usize>,
    relay: Option<RelayLimits>,
    probes: Option<ReachabilityProbes>,
) -> Result<Swarm<VeilBehaviour>> {
    let swarm = SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| NetError::Network(e.to_string()))?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| NetError::Network(e.to_string()))?
        .with_behaviour(|key, relay_client| {
            let gossip_config = gossipsub::ConfigBuilder::default()
                .max_transmit_size(MAX_GOSSIP_BYTES)
                .validation_mode(gossipsub::ValidationMode::Strict)
                // A message is relayed only once the node has checked it.
                .validate_messages()
                .build()
                .map_err(|e| e.to_string())?;
            let mut gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossip_config,
            )?;
            let (params, thresholds) = gossip_scoring();
            gossipsub.with_peer_score(params, thresholds)?;
            let peer_id = key.public().to_peer_id();
            let kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
            let mut kad =
                kad::Behaviour::with_config(peer_id, MemoryStore::new(peer_id), kad_config);
            kad.set_mode(Some(kad::Mode::Server));
            let limits = connection_limits::ConnectionLimits::default()
                .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
                .with_max_established_incoming(Some(MAX_INCOMING_CONNECTIONS))
                .with_max_pending_incoming(Some(MAX_PENDING_INCOMING));
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(VeilBehaviour {
                limits: connection_limits::Behaviour::new(limits),
                memory: match max_memory_bytes {
                    Some(bytes) => memory_connection_limits::Behaviour::with_max_bytes(bytes),
                    None => {
                        memory_connection_limits::Behaviour::with_max_percentage(MAX_MEMORY_SHARE)
                    }
                },
                identify: identify::Behaviour::new(
                    identify::Config::new("/veil/1.0.0".into(), key.public())
                        .with_push_listen_addr_updates(true),
                ),
                ping: ping::Behaviour::default(),
                kad,
                infer: infer::PROTOCOL.behaviour(request_timeout),
                verify: verify::PROTOCOL.behaviour(request_timeout),
                prove: prove::PROTOCOL.behaviour(request_timeout),
                handoff: handoff::PROTOCOL.behaviour(request_timeout),
                gossipsub,
                relay: relay
                    .map(|limits| relay::Behaviour::new(peer_id, limits.config()))
                    .into(),
                relay_client,
                dcutr: dcutr::Behaviour::new(peer_id),
                autonat: probes
                    .map(|p| autonat::Behaviour::new(peer_id, p.config()))
                    .into(),
            })
        })
        .map_err(|e| NetError::Network(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
        .build();
    Ok(swarm)
}

/// Gossipsub's peer scoring for run records. A peer whose records fail the node's checks
/// loses score with the square of its failures (forgotten slowly: 1% a second) and, below the
/// graylist threshold, is not heard at all; the most an honest peer earns (time in the mesh,
/// first deliveries) is small, so a rogue cannot bank credit to spend on garbage. Run records
/// are rare, so a quiet peer is not punished, and peers on loopback are exempt from the
/// same-address penalty, so a swarm on one machine works.
fn gossip_scoring() -> (gossipsub::PeerScoreParams, gossipsub::PeerScoreThresholds) {
    let runs = gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 3600.0,
        first_message_deliveries_weight: 0.1,
        first_message_deliveries_decay: 0.9,
        first_message_deliveries_cap: 100.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -10.0,
        invalid_message_deliveries_decay: 0.99,
        ..Default::default()
    };
    let mut params = gossipsub::PeerScoreParams::default();
    params
        .topics
        .insert(gossipsub::IdentTopic::new(RUNS_TOPIC).hash(), runs);
    params.ip_colocation_factor_whitelist = [
        std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST),
        std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
    ]
    .into();
    let thresholds = gossipsub::PeerScoreThresholds {
        gossip_threshold: -10.0,
        publish_threshold: -50.0,
        graylist_threshold: -80.0,
        accept_px_threshold: 10.0,
        opportunistic_graft_threshold: 5.0,
    };
    (params, thresholds)
}

/// The provider key for every node serving some part of a model.
pub fn model_key(model_digest: &str) -> kad::RecordKey {
    kad::RecordKey::new(&format!("veil/model/{model_digest}"))
}

/// The provider key for nodes proving answers of the private model with `commitment`.
pub fn zk_key(commitment: &str) -> kad::RecordKey {
    kad::RecordKey::new(&format!("veil/zk/{commitment}"))
}

/// The provider key for nodes that relay for peers behind NATs (`veil node --relay-server`).
pub fn relay_key() -> kad::RecordKey {
    kad::RecordKey::new(&"veil/relay/1")
}

/// The provider key for nodes serving one block range of a model.
pub fn range_key(model_digest: &str, first_block: usize, end_block: usize) -> kad::RecordKey {
    kad::RecordKey::new(&format!(
        "veil/model/{model_digest}/{first_block}-{end_block}"
    ))
}
