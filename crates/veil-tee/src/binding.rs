//! Binding evidence to a node and a moment: the 64 bytes of report data every TEE signs.
//!
//! The first 32 bytes are a hash of the node's libp2p public key (its protobuf encoding, which
//! an Ed25519 peer id carries), so the evidence names the peer that presents it; the last 32
//! are the verifier's fresh nonce, or a hash of the time the node made the evidence when no
//! verifier asked, so old evidence cannot be passed off as new.

/// What makes evidence fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// A verifier's random challenge.
    Nonce([u8; 32]),
    /// The time (Unix seconds) the node made the evidence unasked.
    Time(u64),
}

impl Freshness {
    fn bytes(&self) -> [u8; 32] {
        match self {
            Self::Nonce(n) => *n,
            Self::Time(t) => blake3::Hasher::new_derive_key("veil tee evidence time v1")
                .update(&t.to_be_bytes())
                .finalize()
                .into(),
        }
    }
}

/// The report data a node with `peer_public_key` puts in evidence made with `freshness`.
pub fn report_data(peer_public_key: &[u8], freshness: &Freshness) -> [u8; 64] {
    let mut out = [0u8; 64];
    out[..32].copy_from_slice(key_half(peer_public_key).as_slice());
    out[32..].copy_from_slice(&freshness.bytes());
    out
}

fn key_half(peer_public_key: &[u8]) -> [u8; 32] {
    blake3::Hasher::new_derive_key("veil tee peer key v1")
        .update(peer_public_key)
        .finalize()
        .into()
}

/// Whether `data` names the peer with `peer_public_key`.
pub(crate) fn names_peer(data: &[u8; 64], peer_public_key: &[u8]) -> bool {
    data[..32] == key_half(peer_public_key)
}

/// Whether `data` carries `freshness`.
pub(crate) fn carries(data: &[u8; 64], freshness: &Freshness) -> bool {
    data[32..] == freshness.bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_data_names_one_key_and_one_moment() {
        let data = report_data(b"key a", &Freshness::Nonce([7; 32]));
        assert!(names_peer(&data, b"key a"));
        assert!(!names_peer(&data, b"key b"));
        assert!(carries(&data, &Freshness::Nonce([7; 32])));
        assert!(!carries(&data, &Freshness::Nonce([8; 32])));
        let timed = report_data(b"key a", &Freshness::Time(1000));
        assert!(carries(&timed, &Freshness::Time(1000)));
        assert!(!carries(&timed, &Freshness::Time(1001)));
        assert_eq!(timed[..32], data[..32]);
    }
}
