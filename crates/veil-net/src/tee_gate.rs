//! Routing only to nodes that prove they run in a TEE: each candidate is sent a fresh nonce,
//! answers with evidence naming its key and that nonce, and the evidence is judged against the
//! gateway's policy. Verdicts are kept for a while so a request does not pay a round trip per
//! node each time.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use libp2p::PeerId;
use tracing::{info, warn};
use veil_tee::{Expectation, Policy};

use crate::client::{Candidate, SwarmClient};
use crate::wire::{RequestBody, Response};

/// How long a refusal is kept before the node is asked again.
const REFUSAL_KEPT: Duration = Duration::from_secs(30);
/// How long an acceptance is kept when the policy sets no maximum age.
const ACCEPTANCE_KEPT: Duration = Duration::from_secs(300);
/// Most verdicts kept; the oldest are forgotten first.
const MAX_VERDICTS: usize = 4096;

/// A verdict on a node (why it was refused, if it was) and until when it stands.
type Kept = (Result<(), String>, Instant);

/// The TEE policy and the verdicts reached under it.
pub struct TeeGate {
    policy: Policy,
    verdicts: Mutex<HashMap<PeerId, Kept>>,
}

impl TeeGate {
    /// A gate judging evidence by `policy`.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            verdicts: Mutex::new(HashMap::new()),
        }
    }

    /// The candidates whose evidence verifies, and the others with why.
    pub async fn admit(
        &self,
        client: &SwarmClient,
        candidates: &[Candidate],
    ) -> (HashSet<PeerId>, Vec<(PeerId, String)>) {
        let checks = candidates
            .iter()
            .map(|c| async move { (c.peer, self.check(client, c).await) });
        let mut allowed = HashSet::new();
        let mut refused = Vec::new();
        for (peer, verdict) in futures::future::join_all(checks).await {
            match verdict {
                Ok(()) => {
                    allowed.insert(peer);
                }
                Err(why) => refused.push((peer, why)),
            }
        }
        (allowed, refused)
    }

    async fn check(&self, client: &SwarmClient, candidate: &Candidate) -> Result<(), String> {
        if let Some((verdict, until)) = self.lock().get(&candidate.peer) {
            if Instant::now() < *until {
                return verdict.clone();
            }
        }
        let verdict = self.ask(client, candidate).await;
        match &verdict {
            Ok(()) => info!("node {} is attested", candidate.peer),
            Err(why) => warn!("node {} is not attested: {why}", candidate.peer),
        }
        let kept = match &verdict {
            Ok(()) => self
                .policy
                .max_age_seconds
                .map_or(ACCEPTANCE_KEPT, Duration::from_secs)
                .min(ACCEPTANCE_KEPT),
            Err(_) => REFUSAL_KEPT,
        };
        let mut verdicts = self.lock();
        if verdicts.len() >= MAX_VERDICTS {
            let now = Instant::now();
            verdicts.retain(|_, (_, until)| *until > now);
            if verdicts.len() >= MAX_VERDICTS {
                verdicts.clear();
            }
        }
        verdicts.insert(candidate.peer, (verdict.clone(), Instant::now() + kept));
        verdict
    }

    async fn ask(&self, client: &SwarmClient, candidate: &Candidate) -> Result<(), String> {
        let Some(kind) = candidate.info.tee else {
            return Err("it announces no TEE".into());
        };
        let nonce: [u8; 32] = rand::random();
        let evidence = match client
            .request(candidate.peer, RequestBody::Attest { nonce })
            .await
        {
            Ok(Response::Attested(evidence)) => evidence,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Kept>> {
        self.verdicts.lock().unwrap_or_else(|e| e.into_inner())
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
