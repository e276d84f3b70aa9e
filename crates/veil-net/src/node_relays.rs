//! A node's part in circuit relay v2: the relays a node behind a NAT is reached through, and
//! what a relaying node does for others.

use libp2p::multiaddr::Protocol;
use libp2p::{relay, Multiaddr, PeerId, Swarm};
use tracing::{debug, info, warn};

use crate::behaviour::{relay_key, VeilBehaviour};
use crate::error::{NetError, Result};
use crate::node::{is_routable, peer_of};

/// The relays a node behind a NAT is reached through: those named (`--relay`) and up to
/// `wanted` more found in the DHT. It listens through a relay (asks it for a slot) once
/// connected to it, since libp2p's relay client does not wait for a dial already under way;
/// when the relay goes away, the node dials it again and asks anew. The relayed address then
/// reaches peers in identify's listen addresses, as a reachable node's do.
pub(crate) struct RelaySlots {
    /// Each relay's peer id, its address (of a relay found in the DHT: known once connected),
    /// and whether the node listens through it now.
    relays: Vec<(PeerId, Option<Multiaddr>, bool)>,
    /// Relays to find in the DHT, besides those named.
    wanted: usize,
    found: usize,
}

impl RelaySlots {
    pub(crate) fn new(relays: &[Multiaddr], wanted: usize) -> Result<Self> {
        let relays = relays
            .iter()
            .map(|relay| match peer_of(relay) {
                Some(peer) => Ok((peer, Some(relay.clone()), false)),
                None => Err(NetError::Network(format!(
                    "relay address {relay} must end in /p2p/<peer id> (as the relay prints it)"
                ))),
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            relays,
            wanted,
            found: 0,
        })
    }

    /// Dials every relay not listened through, unless already connected (then listens), and
    /// asks the DHT for relays while fewer than wanted are found.
    pub(crate) fn dial(&mut self, swarm: &mut Swarm<VeilBehaviour>) {
        for (peer, addr, listening) in &mut self.relays {
            if *listening {
                continue;
            }
            match (swarm.is_connected(peer), addr.as_ref()) {
                (true, Some(addr)) => *listening = listen_through(swarm, addr),
                (true, None) => {}
                (false, Some(addr)) => {
                    swarm.behaviour_mut().kad.add_address(peer, addr.clone());
                    if let Err(e) = swarm.dial(addr.clone()) {
                        debug!("relay {addr}: {e}");
                    }
                }
                (false, None) => {
                    if let Err(e) = swarm.dial(*peer) {
                        debug!("relay {peer}: {e}");
                    }
                }
            }
        }
        if self.found < self.wanted {
            swarm.behaviour_mut().kad.get_providers(relay_key());
        }
    }

    /// Wants `n` relays from the DHT, where no relay was named or asked for; says whether that
    /// changed anything.
    pub(crate) fn want_at_least(&mut self, n: usize) -> bool {
        if self.wanted > 0 || !self.relays.is_empty() {
            return false;
        }
        self.wanted = n;
        true
    }

    /// A relay the DHT names: kept (and dialed) while more are wanted.
    pub(crate) fn found(&mut self, swarm: &mut Swarm<VeilBehaviour>, relay: PeerId) {
        let known = self.relays.iter().any(|(peer, ..)| *peer == relay);
        if known || relay == *swarm.local_peer_id() || self.found >= self.wanted {
            return;
        }
        info!("found relay {relay} in the DHT");
        self.found += 1;
        // Already connected (a bootstrap peer, say): its address is in the routing table.
        let addr = routing_address(swarm, relay);
        self.relays.push((relay, addr, false));
        self.dial(swarm);
    }

    pub(crate) fn connected(
        &mut self,
        swarm: &mut Swarm<VeilBehaviour>,
        peer: PeerId,
        at: &Multiaddr,
    ) {
        let direct = !at.iter().any(|p| p == Protocol::P2pCircuit);
        for (relay, addr, listening) in &mut self.relays {
            if *relay != peer || *listening {
                continue;
            }
            if addr.is_none() && direct {
                *addr = Some(at.clone().with_p2p(peer).unwrap_or_else(|a| a));
            }
            if let Some(addr) = addr {
                *listening = listen_through(swarm, addr);
            }
        }
    }

    pub(crate) fn disconnected(&mut self, swarm: &mut Swarm<VeilBehaviour>, peer: PeerId) {
        if self.relays.iter().any(|(relay, ..)| *relay == peer) && !swarm.is_connected(&peer) {
            for (relay, _, listening) in &mut self.relays {
                *listening &= *relay != peer;
            }
            self.dial(swarm);
        }
    }

    /// Forgets the slots of a relay listener that closed; [`Self::dial`] asks again later (not
    /// at once, so a relay that keeps refusing is not asked in a loop).
    pub(crate) fn listener_closed(&mut self, addresses: &[Multiaddr]) {
        let mut closed = false;
        for (relay, _, listening) in &mut self.relays {
            let through = addresses
                .iter()
                .any(|a| a.iter().any(|p| p == Protocol::P2p(*relay)));
            if through {
                *listening = false;
                closed = true;
            }
        }
        if closed {
            debug!("a relay stopped relaying for this node; asking again at the next announcement");
        }
    }
}

/// A direct address of `peer` from the routing table, ending in its id.
fn routing_address(swarm: &mut Swarm<VeilBehaviour>, peer: PeerId) -> Option<Multiaddr> {
    let bucket = swarm.behaviour_mut().kad.kbucket(peer)?;
    let entry = bucket.iter().find(|e| *e.node.key.preimage() == peer)?;
    let addr = entry
        .node
        .value
        .iter()
        .find(|a| !a.iter().any(|p| p == Protocol::P2pCircuit))?;
    Some(addr.clone().with_p2p(peer).unwrap_or_else(|a| a))
}

/// Asks `relay` for a slot; says whether the request went out.
fn listen_through(swarm: &mut Swarm<VeilBehaviour>, relay: &Multiaddr) -> bool {
    let circuit = relay.clone().with(Protocol::P2pCircuit);
    match swarm.listen_on(circuit.clone()) {
        Ok(_) => true,
        Err(e) => {
            warn!("cannot listen through {circuit}: {e}");
            false
        }
    }
}

/// On a relaying node, takes a direct listen address as one peers can reach: libp2p's relay
/// serves only from confirmed external addresses, and an operator who passes `--relay-server`
/// says the node is reachable where it listens.
pub(crate) fn offer_relay_at(swarm: &mut Swarm<VeilBehaviour>, relays: bool, address: Multiaddr) {
    let relayed = address.iter().any(|p| p == Protocol::P2pCircuit);
    if relays && is_routable(&address) && !relayed {
        swarm.add_external_address(address);
    }
}

/// What a relaying node did for others: reservations and circuits refused say why.
pub(crate) fn log_relay(event: &relay::Event) {
    match event {
        relay::Event::ReservationReqAccepted { src_peer_id, .. } => {
            info!("relay: reserved a slot for {src_peer_id}")
        }
        relay::Event::ReservationReqDenied {
            src_peer_id,
            status,
        } => {
            warn!("relay: refused a reservation by {src_peer_id}: {status:?}")
        }
        relay::Event::CircuitReqAccepted {
            src_peer_id,
            dst_peer_id,
        } => info!("relay: circuit from {src_peer_id} to {dst_peer_id}"),
        relay::Event::CircuitReqDenied {
            src_peer_id,
            dst_peer_id,
            status,
        } => warn!("relay: refused a circuit from {src_peer_id} to {dst_peer_id}: {status:?}"),
        relay::Event::CircuitClosed {
            src_peer_id,
            dst_peer_id,
            error: Some(e),
        } => info!("relay: circuit from {src_peer_id} to {dst_peer_id} closed: {e}"),
        other => debug!("relay: {other:?}"),
    }
}
