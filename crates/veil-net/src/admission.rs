//! Who may serve and judge. A node's `Info` is only what it says about itself, so a squatter
//! or a crowd of Sybils can announce any model. Before a route or a committee takes a node, the
//! client can ask it to prove what it claims:
//!
//! - **weights**: its announced Merkle root must be the one the client's own copy of the model
//!   gives for the blocks it claims, and it must open random chunks under that root (a node
//!   that does not hold the weights cannot);
//! - **allow-list**: an operator's list of peer ids;
//! - **TEE**: evidence that passes a policy (see [`TeeGate`]).
//!
//! Verdicts are kept for a while, so a request does not pay a round trip per node each time.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tracing::{info, warn};
use veil_model::{GgufFile, Shard};
use veil_zk::ModelLeaves;

use crate::client::{Candidate, SwarmClient};
use crate::tee_gate::TeeGate;

/// How long a refusal is kept before the node is asked again.
pub(crate) const REFUSAL_KEPT: Duration = Duration::from_secs(30);
/// How long an acceptance is kept: a node is challenged again after it.
pub(crate) const ACCEPTANCE_KEPT: Duration = Duration::from_secs(300);
/// Most verdicts kept; expired ones are forgotten first, then all.
const MAX_VERDICTS: usize = 4096;
/// Random chunks a node opens to prove its weights, unless configured otherwise.
pub const DEFAULT_OPENINGS: usize = 8;

/// A verdict on a node: what it announced when judged (its tag), why it was refused if it
/// was, and until when the verdict stands.
type Kept = (String, Result<(), String>, Instant);

/// Verdicts on nodes, each standing for what the node announced when it was judged (`tag`) and
/// until a deadline.
#[derive(Default)]
pub(crate) struct Verdicts {
    kept: Mutex<HashMap<PeerId, Kept>>,
}

impl Verdicts {
    /// The verdict on `peer` if one stands for the same announcement.
    fn get(&self, peer: &PeerId, tag: &str) -> Option<Result<(), String>> {
        let kept = self.lock();
        let (was, verdict, until) = kept.get(peer)?;
        (was == tag && Instant::now() < *until).then(|| verdict.clone())
    }

    /// Keeps `verdict` on `peer`'s announcement `tag`: acceptances for `accepted_for`, refusals
    /// for [`REFUSAL_KEPT`].
    fn put(&self, peer: PeerId, tag: String, verdict: &Result<(), String>, accepted_for: Duration) {
        let kept_for = if verdict.is_ok() {
            accepted_for
        } else {
            REFUSAL_KEPT
        };
        let mut kept = self.lock();
        if kept.len() >= MAX_VERDICTS {
            let now = Instant::now();
            kept.retain(|_, (_, _, until)| *until > now);
            if kept.len() >= MAX_VERDICTS {
                kept.clear();
            }
        }
        kept.insert(peer, (tag, verdict.clone(), Instant::now() + kept_for));
    }

    /// The standing verdict on `peer`'s announcement `tag`, or a fresh one from `ask` (logged
    /// as passing or failing `check`, and kept).
    pub(crate) async fn judge(
        &self,
        peer: PeerId,
        tag: String,
        check: &str,
        accepted_for: Duration,
        ask: impl std::future::Future<Output = Result<(), String>>,
    ) -> Result<(), String> {
        if let Some(verdict) = self.get(&peer, &tag) {
            return verdict;
        }
        let verdict = ask.await;
        match &verdict {
            Ok(()) => info!("node {peer} passed the {check}"),
            Err(why) => warn!("node {peer} failed the {check}: {why}"),
        }
        self.put(peer, tag, &verdict, accepted_for);
        verdict
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Kept>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The weights check: the client's own copy of the served model file, from which it knows the
/// root every shard of it commits to.
pub struct WeightsGate {
    model: PathBuf,
    openings: usize,
    leaves: tokio::sync::OnceCell<Result<Arc<ModelLeaves>, String>>,
    verdicts: Verdicts,
}

impl WeightsGate {
    /// Checks nodes against `model` (the very file they serve shards of: the encrypted one for
    /// an encrypted model), with `openings` random chunks each (at least 1).
    pub fn new(model: PathBuf, openings: usize) -> Self {
        Self {
            model,
            openings: openings.clamp(1, veil_zk::MAX_OPENINGS),
            leaves: tokio::sync::OnceCell::new(),
            verdicts: Verdicts::default(),
        }
    }

    async fn check(&self, client: &SwarmClient, candidate: &Candidate) -> Result<(), String> {
        let tag = format!("{:?}", candidate.info.weights);
        let ask = self.ask(client, candidate);
        self.verdicts
            .judge(candidate.peer, tag, "weights check", ACCEPTANCE_KEPT, ask)
            .await
    }

    async fn ask(&self, client: &SwarmClient, candidate: &Candidate) -> Result<(), String> {
        let leaves = self
            .leaves
            .get_or_init(|| async {
                let model = self.model.clone();
                tokio::task::spawn_blocking(move || {
                    let file = GgufFile::open(&model).map_err(|e| e.to_string())?;
                    ModelLeaves::of_file(file)
                        .map(Arc::new)
                        .map_err(|e| format!("cannot hash {}: {e}", model.display()))
                })
                .await
                .unwrap_or_else(|e| Err(format!("hashing the model stopped: {e}")))
            })
            .await
            .clone()?;
        let info = &candidate.info;
        let shard = Shard {
            layers: info.first_block..info.end_block,
            embedding: info.embedding,
            head: info.head,
        };
        let expected = leaves
            .root_of(&shard)
            .map_err(|e| format!("it claims blocks this model does not have: {e}"))?;
        crate::weights_check::challenge_weights(client, candidate, &expected, self.openings)
            .await
            .map(|_| ())
    }
}

/// The checks a node must pass to be routed to or seated on a committee; with none configured,
/// every node passes.
#[derive(Default)]
pub struct Admission {
    allow: Option<HashSet<PeerId>>,
    weights: Option<WeightsGate>,
    tee: Option<TeeGate>,
}

impl Admission {
    /// Only these peers (an operator's allow-list).
    pub fn with_allow_list(mut self, peers: HashSet<PeerId>) -> Self {
        self.allow = Some(peers);
        self
    }

    /// Only nodes that prove they hold the weights they serve.
    pub fn with_weights(mut self, gate: WeightsGate) -> Self {
        self.weights = Some(gate);
        self
    }

    /// Only nodes whose TEE evidence passes `gate`'s policy.
    pub fn with_tee(mut self, gate: TeeGate) -> Self {
        self.tee = Some(gate);
        self
    }

    /// Whether any check is configured.
    pub fn checks_anything(&self) -> bool {
        self.allow.is_some() || self.weights.is_some() || self.tee.is_some()
    }

    /// The candidates that pass every check, and the others with why.
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
        if let Some(allow) = &self.allow {
            if !allow.contains(&candidate.peer) {
                return Err("it is not on the allow-list".into());
            }
        }
        if let Some(weights) = &self.weights {
            weights.check(client, candidate).await?;
        }
        if let Some(tee) = &self.tee {
            tee.check(client, candidate).await?;
        }
        Ok(())
    }
}
