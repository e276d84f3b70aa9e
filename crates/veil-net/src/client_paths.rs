//! Which connection carries a client's requests to a node behind a NAT. libp2p's
//! request-response spreads requests over every open connection to a peer, so once hole
//! punching opens a direct connection, a relayed one left open would still carry every other
//! step through the relay. The client closes a peer's relayed connections once a direct one is
//! open, between requests (never under one in flight), and holds new requests to that peer
//! until they have closed.

use std::collections::{HashMap, HashSet};

use libp2p::swarm::ConnectionId;
use libp2p::PeerId;

/// The client's open connections by kind, and those it is closing.
#[derive(Default)]
pub(crate) struct DirectPaths {
    relayed: HashMap<PeerId, HashSet<ConnectionId>>,
    direct: HashMap<PeerId, HashSet<ConnectionId>>,
    closing: HashMap<PeerId, HashSet<ConnectionId>>,
}

impl DirectPaths {
    pub(crate) fn opened(&mut self, peer: PeerId, id: ConnectionId, relayed: bool) {
        let open = if relayed {
            &mut self.relayed
        } else {
            &mut self.direct
        };
        open.entry(peer).or_default().insert(id);
    }

    /// Forgets a closed connection; says whether requests held for `peer` may now go.
    pub(crate) fn closed(&mut self, peer: PeerId, id: ConnectionId) -> bool {
        for open in [&mut self.relayed, &mut self.direct] {
            if let Some(ids) = open.get_mut(&peer) {
                ids.remove(&id);
                if ids.is_empty() {
                    open.remove(&peer);
                }
            }
        }
        let Some(closing) = self.closing.get_mut(&peer) else {
            return false;
        };
        closing.remove(&id);
        if closing.is_empty() {
            self.closing.remove(&peer);
            return true;
        }
        false
    }

    /// The relayed connections to `peer` to close now: those of a peer with a direct connection,
    /// when no request to it is in flight (`idle`). They count as closing from here on.
    pub(crate) fn start_closing(&mut self, peer: PeerId, idle: bool) -> Vec<ConnectionId> {
        if !idle || !self.direct.contains_key(&peer) {
            return Vec::new();
        }
        let ids: Vec<ConnectionId> = self.relayed.remove(&peer).into_iter().flatten().collect();
        if !ids.is_empty() {
            self.closing
                .entry(peer)
                .or_default()
                .extend(ids.iter().copied());
        }
        ids
    }

    /// Whether the client reaches `peer` only through relays (no direct connection open).
    pub(crate) fn only_relayed(&self, peer: &PeerId) -> bool {
        self.relayed.contains_key(peer) && !self.direct.contains_key(peer)
    }

    /// Whether a request to `peer` must wait for its relayed connections to close.
    pub(crate) fn must_wait(&self, peer: &PeerId) -> bool {
        self.closing.contains_key(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayed_connections_close_only_when_a_direct_one_is_open_and_nothing_is_in_flight() {
        let mut paths = DirectPaths::default();
        let peer = PeerId::random();
        let (relayed, direct) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
        );
        paths.opened(peer, relayed, true);
        assert!(
            paths.start_closing(peer, true).is_empty(),
            "no direct path yet"
        );
        paths.opened(peer, direct, false);
        assert!(
            paths.start_closing(peer, false).is_empty(),
            "a request is in flight"
        );
        assert_eq!(paths.start_closing(peer, true), vec![relayed]);
        assert!(paths.must_wait(&peer));
        assert!(paths.start_closing(peer, true).is_empty(), "asked once");
        assert!(
            !paths.closed(peer, direct),
            "the relayed one is still closing"
        );
        assert!(paths.closed(peer, relayed));
        assert!(!paths.must_wait(&peer));
    }

    #[test]
    fn a_peer_reached_only_through_relays_keeps_them() {
        let mut paths = DirectPaths::default();
        let peer = PeerId::random();
        paths.opened(peer, ConnectionId::new_unchecked(1), true);
        paths.opened(peer, ConnectionId::new_unchecked(2), true);
        assert!(paths.start_closing(peer, true).is_empty());
        assert!(!paths.must_wait(&peer));
        assert!(!paths.closed(peer, ConnectionId::new_unchecked(1)));
    }
}
