//! Routing only to nodes that prove they run in a TEE: each candidate is sent a fresh nonce,
//! answers with evidence naming its key and that nonce, and the evidence is judged against the
//! gateway's policy. Verdicts are kept for a while so a request does not pay a round trip per
//! node each time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libp2p::PeerId;
use veil_tee::{Expectation, Policy};

use crate::admission::{Verdicts, ACCEPTANCE_KEPT};
use crate::client::{Candidate, SwarmClient};
use crate::protocol::prove;

/// The TEE policy and the verdicts reached under it.
pub struct TeeGate {
    policy: Policy,
    verdicts: Verdicts,
}

impl TeeGate {
    /// A gate judging evidence by `policy`.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            verdicts: Verdicts::default(),
        }
    }

    pub(crate) async fn check(
        &self,
        client: &SwarmClient,
        candidate: &Candidate,
    ) -> Result<(), String> {
        let tag = format!("{:?}", candidate.info.tee);
        let accepted_for = self
            .policy
            .max_age_seconds
            .map_or(ACCEPTANCE_KEPT, Duration::from_secs)
            .min(ACCEPTANCE_KEPT);
        let ask = self.ask(client, candidate);
        self.verdicts
            .judge(candidate.peer, tag, "TEE attestation", accepted_for, ask)
            .await
    }

    async fn ask(&self, client: &SwarmClient, candidate: &Candidate) -> Result<(), String> {
        let Some(kind) = candidate.info.tee else {
            return Err("it announces no TEE".into());
        };
        let nonce: [u8; 32] = rand::random();
        let evidence = match client
            .prove(candidate.peer, prove::Request::Attest { nonce })
            .await
        {
            Ok(prove::Response::Attested(evidence)) => evidence,
            Ok(other) => return Err(format!("it answered the challenge with {other:?}")),
            Err(e) => return Err(format!("it did not answer the challenge: {e}")),
        };
        if evidence.kind != kind {
            return Err(format!(
                "it announced {kind} but sent {} evidence",
                evidence.kind
            ));
        }
        let key = public_key_of(&candidate.peer)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let expect = Expectation {
            peer_key: Some(&key),
            nonce: Some(nonce),
        };
        let verdict =
            veil_tee::verify(&evidence, &self.policy, &expect, now).map_err(|e| e.to_string())?;
        if verdict.accepted() {
            Ok(())
        } else {
            Err(verdict.reasons().join("; "))
        }
    }
}

/// The public key (protobuf encoding) an Ed25519 peer id carries inline: what a node binds
/// into its evidence.
pub fn public_key_of(peer: &PeerId) -> Result<Vec<u8>, String> {
    let multihash = peer.as_ref();
    if multihash.code() != 0 {
        return Err("its peer id does not carry its public key".into());
    }
    let key = libp2p::identity::PublicKey::try_decode_protobuf(multihash.digest())
        .map_err(|e| format!("its peer id holds no readable key: {e}"))?;
    Ok(key.encode_protobuf())
}
