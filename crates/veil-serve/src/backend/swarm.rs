//! A chain of the swarm's nodes, opened per request: plaintext, or encrypted with the key kept
//! here, and optionally split with this process (its first blocks and the head run here, so
//! nodes see only hidden states).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use tokio::runtime::Handle;
use veil_model::{LocalModel, ShardModel, TokenStep};
use veil_net::{ClientSplit, RemoteChain, SwarmClient};

use super::{Answer, Backend, Cancellable, Failure, Request, Route, RouteHop};
use crate::key_rotation::KeyedModel;

/// What every swarm backend needs: a client joined to the swarm, the model it asks for, and
/// the records a verified request keeps.
pub struct SwarmConnection {
    /// A connected client.
    pub client: SwarmClient,
    /// The runtime the client runs on (backends block on it from outside).
    pub runtime: Handle,
    /// The plaintext model's tokenizer and configuration.
    pub text: Arc<LocalModel>,
    /// The digest of the model file the nodes serve shards of (the encrypted file, for an
    /// encrypted model).
    pub digest: String,
    /// Reputations of the nodes, moved only by checked, signed verdicts: nodes caught lying
    /// are left out of committees and plain routes. `None`: no record is kept.
    pub state: Option<veil_net::NodeState>,
    /// What a node must prove before it serves or judges (the weights check, an allow-list,
    /// a TEE policy).
    pub admission: Option<Arc<veil_net::Admission>>,
    /// Where evidence against nodes caught lying is written.
    pub evidence_dir: PathBuf,
    /// Recomputes, in this process, answers a committee rejects before anyone is punished
    /// (`--recheck`).
    pub recheck: Option<veil_verify::LocalRecheck>,
}

impl SwarmConnection {
    /// The model the nodes serve under `privacy`'s key (or the connection's, for plaintext or
    /// a key that never rotated), and the checks they must pass to serve it.
    pub fn target<'a>(
        &'a self,
        privacy: Option<&'a crate::key_rotation::Privacy>,
    ) -> (&'a str, Option<Arc<veil_net::Admission>>) {
        match privacy.and_then(|p| p.nodes.as_ref()) {
            Some(nodes) => (&nodes.digest, nodes.admission.clone()),
            None => (&self.digest, self.admission.clone()),
        }
    }

    /// Nodes a committee caught lying, to leave out.
    fn avoided(&self) -> Result<HashSet<libp2p::PeerId>, veil_net::NetError> {
        match &self.state {
            Some(state) => state.avoided(),
            None => Ok(HashSet::new()),
        }
    }
}

/// A plain (unverified) chain of nodes.
pub struct SwarmChain {
    connection: Arc<SwarmConnection>,
    /// The key of the encrypted model the nodes serve (`None`: plaintext).
    key: Option<Arc<KeyedModel>>,
    /// Blocks run in this process: the front (embedding and first blocks) and the head.
    split: Option<(Arc<ShardModel>, Arc<ShardModel>)>,
    /// Kept equal to the node sessions open (the gateway's `/metrics`).
    sessions: Option<Gauge>,
}

impl SwarmChain {
    /// Chains over `connection`'s nodes, encrypted under `key` if given.
    pub fn new(connection: Arc<SwarmConnection>, key: Option<Arc<KeyedModel>>) -> Self {
        Self {
            connection,
            key,
            split: None,
            sessions: None,
        }
    }

    /// Runs `front` (the embedding and the first blocks) and `head` here: nodes see only
    /// hidden states, never ids or logits.
    pub fn split_with(mut self, front: Arc<ShardModel>, head: Arc<ShardModel>) -> Self {
        self.split = Some((front, head));
        self
    }

    /// Keeps `gauge` equal to the node sessions this backend holds open.
    pub fn counting_sessions(mut self, gauge: Gauge) -> Self {
        self.sessions = Some(gauge);
        self
    }
}

impl Backend for SwarmChain {
    fn generate(
        &self,
        request: &Request<'_>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answer, Failure> {
        let swarm = &self.connection;
        let config = &swarm.text.config;
        // Nodes a committee caught lying are left out of plain routes too.
        let avoid = swarm.avoided().map_err(Failure::NoRoute)?;
        let split = self.split.as_ref().map(|(front, head)| ClientSplit {
            front: Arc::clone(front),
            head: Arc::clone(head),
        });
        // The key a request starts with is the one it ends with, on that key's nodes.
        let privacy = self.key.as_ref().map(|keyed| keyed.current());
        let (digest, admission) = swarm.target(privacy.as_deref());
        let mut chain = RemoteChain::open_gated(
            swarm.client.clone(),
            swarm.runtime.clone(),
            digest,
            config.block_count,
            split,
            &avoid,
            admission,
        )
        .map_err(Failure::NoRoute)?;
        let mut counted = CountedChain {
            chain: &mut chain,
            counted: 0,
            gauge: self.sessions.as_ref(),
        };
        let inner: Box<dyn TokenStep + '_> = match &privacy {
            Some(p) => Box::new(veil_ee::EncryptedStep::new(&p.key, &mut counted)),
            None => Box::new(&mut counted),
        };
        let result = veil_model::generate(
            &mut Cancellable {
                inner,
                cancelled: request.cancelled,
            },
            &swarm.text.tokenizer,
            request.prompt,
            config.context_length,
            request.params,
            on_text,
        );
        let route = Route::of_chain(counted.chain);
        counted.close();
        let completion = result?;
        if let (Some(keyed), Some(privacy)) = (&self.key, &privacy) {
            let tokens = request.prompt.len() + completion.tokens.len();
            keyed.spent(privacy, tokens as u64);
        }
        Ok(Answer {
            completion,
            route,
            verification: None,
            accel: "plain".into(),
            evidence: Vec::new(),
        })
    }

    fn describe(&self) -> String {
        "a chain of the swarm's nodes".into()
    }
}

impl Route {
    /// A chain's hops and failovers so far.
    pub fn of_chain(chain: &RemoteChain) -> Route {
        let hops = chain
            .route()
            .into_iter()
            .map(|(node, stats)| RouteHop {
                relayed: chain.is_relayed(&node.peer),
                peer: node.peer,
                blocks: (node.info.first_block, node.info.end_block),
                stats,
            })
            .collect();
        Route::Chain {
            hops,
            failovers: chain.failovers().to_vec(),
        }
    }
}

/// A chain that keeps a gauge of open node sessions in step with its hops (sessions open as
/// the chain first runs, and move on failover).
struct CountedChain<'a> {
    chain: &'a mut RemoteChain,
    counted: i64,
    gauge: Option<&'a Gauge>,
}

impl CountedChain<'_> {
    /// Frees the sessions on every node.
    fn close(self) {
        self.chain.close();
        if let Some(gauge) = self.gauge {
            gauge.dec_by(self.counted);
        }
    }
}

impl TokenStep for CountedChain<'_> {
    fn step(&mut self, tokens: &[u32]) -> veil_model::Result<Vec<f32>> {
        let result = self.chain.step(tokens);
        let hops = self.chain.route().len() as i64;
        if let Some(gauge) = self.gauge {
            gauge.inc_by(hops - self.counted);
        }
        self.counted = hops;
        result
    }
}
