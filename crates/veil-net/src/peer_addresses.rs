//! Which of its peers' addresses a node keeps (in the DHT, which hands them to others, and in
//! its database, which it dials at every start). A peer names its own addresses, so it may name
//! ones nobody can dial: its home network's (a node behind a NAT), loopback, or ones made up.
//! A node keeps addresses of the kind it can reach, and one it failed to dial is not kept again
//! for a while, so it is not dialed again and again.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;

/// How long an address that could not be dialed is left out.
pub(crate) const UNREACHABLE_FOR: Duration = Duration::from_secs(10 * 60);

/// Addresses remembered as unreachable at most; past this, the oldest is forgotten.
const MAX_UNREACHABLE: usize = 4096;

/// Which address ranges a node can reach, and the addresses that failed.
pub(crate) struct PeerAddresses {
    /// Private ranges (10/8, 192.168/16, ...) count as reachable: a LAN, or the NAT lab.
    private_network: bool,
    /// Loopback counts as reachable: the node listens on it, so its swarm is on this machine.
    loopback: bool,
    unreachable: HashMap<Multiaddr, Instant>,
}

impl PeerAddresses {
    pub(crate) fn new(private_network: bool, own_listen: &[Multiaddr]) -> Self {
        let loopback = own_listen
            .iter()
            .any(|a| ip_of(a).is_some_and(|ip| ip.is_loopback()));
        Self {
            private_network,
            loopback,
            unreachable: HashMap::new(),
        }
    }

    /// Whether to keep `addr`, a peer's word for where it listens.
    pub(crate) fn keep(&mut self, addr: &Multiaddr, now: Instant) -> bool {
        if let Some(&since) = self.unreachable.get(addr) {
            if now.duration_since(since) < UNREACHABLE_FOR {
                return false;
            }
            self.unreachable.remove(addr);
        }
        match ip_of(addr) {
            None => true,
            Some(ip) if ip.is_unspecified() || ip.is_multicast() => false,
            Some(ip) if ip.is_loopback() => self.loopback,
            Some(ip) if is_private(ip) => self.private_network,
            Some(_) => true,
        }
    }

    /// Remembers that `addr` could not be dialed.
    pub(crate) fn failed(&mut self, addr: Multiaddr, now: Instant) {
        if self.unreachable.len() >= MAX_UNREACHABLE {
            self.unreachable
                .retain(|_, since| now.duration_since(*since) < UNREACHABLE_FOR);
        }
        if self.unreachable.len() >= MAX_UNREACHABLE {
            if let Some(oldest) = self
                .unreachable
                .iter()
                .min_by_key(|(_, since)| **since)
                .map(|(a, _)| a.clone())
            {
                self.unreachable.remove(&oldest);
            }
        }
        self.unreachable.insert(addr, now);
    }
}

/// The IP address an address starts with (none for DNS names and relayed addresses' tails).
fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(ip.into()),
        Protocol::Ip6(ip) => Some(ip.into()),
        _ => None,
    }
}

/// Ranges that do not route on the internet: private, shared (carrier NAT), link-local, and
/// IPv6 unique-local and link-local.
fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => {
            let [a, b, ..] = ip.octets();
            ip.is_private() || ip.is_link_local() || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(ip) => {
            let first = ip.segments()[0];
            (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_public_node_keeps_public_addresses_only() {
        let mut kept = PeerAddresses::new(false, &[addr("/ip4/0.0.0.0/tcp/4001")]);
        let now = Instant::now();
        assert!(kept.keep(&addr("/ip4/203.0.113.7/tcp/4001"), now));
        assert!(kept.keep(&addr("/dns4/node.example/tcp/4001"), now));
        for private in [
            "/ip4/192.168.1.2/tcp/4001",
            "/ip4/10.0.0.5/udp/4001/quic-v1",
            "/ip4/172.16.3.1/tcp/1",
            "/ip4/100.64.0.1/tcp/1",
            "/ip4/169.254.1.1/tcp/1",
            "/ip4/127.0.0.1/tcp/4001",
            "/ip4/0.0.0.0/tcp/4001",
            "/ip6/fd00::1/tcp/1",
            "/ip6/fe80::1/tcp/1",
        ] {
            assert!(!kept.keep(&addr(private), now), "{private}");
        }
    }

    #[test]
    fn a_lan_or_loopback_swarm_keeps_its_own_kind() {
        let now = Instant::now();
        let mut lan = PeerAddresses::new(true, &[]);
        assert!(lan.keep(&addr("/ip4/192.168.1.2/tcp/4001"), now));
        assert!(!lan.keep(&addr("/ip4/127.0.0.1/tcp/4001"), now));
        let mut local = PeerAddresses::new(false, &[addr("/ip4/127.0.0.1/tcp/0")]);
        assert!(local.keep(&addr("/ip4/127.0.0.1/tcp/4001"), now));
        assert!(!local.keep(&addr("/ip4/10.1.2.3/tcp/4001"), now));
    }

    #[test]
    fn an_address_that_failed_is_left_out_for_a_while() {
        let mut kept = PeerAddresses::new(false, &[]);
        let (a, now) = (addr("/ip4/203.0.113.7/tcp/4001"), Instant::now());
        kept.failed(a.clone(), now);
        assert!(!kept.keep(&a, now + Duration::from_secs(60)));
        assert!(kept.keep(&a, now + UNREACHABLE_FOR));
    }

    #[test]
    fn the_failed_list_stays_bounded() {
        let mut kept = PeerAddresses::new(false, &[]);
        let now = Instant::now();
        for i in 0..MAX_UNREACHABLE + 10 {
            let a = addr(&format!("/ip4/203.0.{}.{}/tcp/4001", i / 256, i % 256));
            kept.failed(a, now + Duration::from_millis(i as u64));
        }
        assert_eq!(kept.unreachable.len(), MAX_UNREACHABLE);
    }
}
