//! Key rotation on the swarm: the model re-encrypted under the new key is cut into the shards
//! the nodes serve now (those of the key in use, and any restarted onto the gateway's first
//! model), each handed to its node ([`veil_net::protocol::handoff`]), all nodes at once, and
//! each loads and stages it beside the old one. Only once every node has staged its shard does
//! the gateway swap keys; then the nodes are told to promote the new shard. A node that fails
//! to take its shard fails the rotation: the others drop theirs and the old key keeps serving.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use libp2p::PeerId;
use tokio::runtime::Handle;
use veil_ee::EeKey;
use veil_model::Shard;
use veil_net::protocol::handoff;
use veil_net::{Admission, SwarmClient};

use crate::error::{Result, ServeError};
use crate::key_rotation::{KeyInstaller, NodesServing, Privacy};

/// The checks a node must pass to serve the encrypted file at a path (its weights gate reads
/// that file).
pub type AdmissionFor =
    Box<dyn Fn(&Path) -> Result<Option<Arc<Admission>>, ServeError> + Send + Sync>;

/// Hands each new key's shards to the swarm's nodes.
pub struct HandToNodes {
    client: SwarmClient,
    runtime: Handle,
    /// The digest the nodes serve before the first rotation.
    first_digest: String,
    admission: AdmissionFor,
}

impl HandToNodes {
    /// Hands shards through `client` (whose peer id the nodes must accept shards from) to the
    /// nodes serving `first_digest`, and after each rotation to those serving the model it
    /// made; `admission` builds the node checks for each new file.
    pub fn new(
        client: SwarmClient,
        runtime: Handle,
        first_digest: String,
        admission: AdmissionFor,
    ) -> Self {
        Self {
            client,
            runtime,
            first_digest,
            admission,
        }
    }

    fn request(&self, peer: PeerId, request: handoff::Request) -> Result<(), veil_net::NetError> {
        self.runtime
            .block_on(self.client.handoff(peer, request))
            .map(|_| ())
    }

    /// Tells every node in `staged` to drop its staged shard of `digest`.
    fn discard_staged(&self, staged: &[PeerId], digest: &str) {
        for peer in staged {
            let model = digest.to_string();
            if let Err(e) = self.request(*peer, handoff::Request::Discard { model }) {
                tracing::warn!("{peer} did not drop the staged shard: {e}");
            }
        }
    }
}

impl KeyInstaller for HandToNodes {
    fn stage(
        &self,
        dir: tempfile::TempDir,
        file: &Path,
        key: EeKey,
        old: &Privacy,
    ) -> Result<Privacy> {
        let old_digest = old
            .nodes
            .as_ref()
            .map_or(self.first_digest.as_str(), |n| n.digest.as_str());
        // The nodes serving the key in use, and those serving the model the gateway was started
        // with: a node restarted since a rotation serves its first file again, and rejoins here.
        let mut digests = vec![old_digest];
        if old_digest != self.first_digest {
            digests.push(&self.first_digest);
        }
        let mut nodes: Vec<veil_net::Candidate> = Vec::new();
        for digest in digests {
            let found = self
                .runtime
                .block_on(self.client.discover(digest))
                .map_err(|source| ServeError::Handoff {
                    what: "cannot find the nodes serving the model".into(),
                    source: Box::new(source),
                })?;
            for node in found {
                if !nodes.iter().any(|n| n.peer == node.peer) {
                    nodes.push(node);
                }
            }
        }
        if nodes.is_empty() {
            return Err(ServeError::Invalid(format!(
                "no node serves model {old_digest}: nothing to hand the new key's shards to"
            )));
        }
        let ranges: BTreeSet<(usize, usize, bool, bool)> = nodes
            .iter()
            .map(|n| {
                (
                    n.info.first_block,
                    n.info.end_block,
                    n.info.embedding,
                    n.info.head,
                )
            })
            .collect();
        let shards: Vec<Shard> = ranges
            .iter()
            .map(|&(first, end, embedding, head)| Shard {
                layers: first..end,
                embedding,
                head,
            })
            .collect();
        let cut = dir.path().join("shards");
        let manifests = veil_model::write_shard_files(file, &shards, &cut, &mut |_, _| {})?;
        let digest = veil_model::store::file_digest(file)?.1;
        // Every node at once: each transfer waits on its own node's loading.
        let digest_ref = &digest;
        let handoffs = nodes.iter().map(|node| {
            let file = manifests
                .iter()
                .find(|m| {
                    (m.first_block, m.end_block) == (node.info.first_block, node.info.end_block)
                })
                .map(|m| cut.join(&m.file));
            async move {
                let digest = digest_ref;
                let Some(file) = file else {
                    let none = "no shard was cut for its blocks".to_string();
                    return (node, Err(veil_net::NetError::BadMessage(none)));
                };
                let handed = match self.client.hand_off_shard(node.peer, &file).await {
                    Ok(info) if info.model_digest == *digest => Ok(()),
                    Ok(info) => Err(veil_net::NetError::BadMessage(format!(
                        "it staged model {}, not {digest}",
                        info.model_digest
                    ))),
                    Err(e) => Err(e),
                };
                (node, handed)
            }
        });
        let outcomes = self.runtime.block_on(futures::future::join_all(handoffs));
        let staged: Vec<PeerId> = outcomes
            .iter()
            .filter(|(_, handed)| handed.is_ok())
            .map(|(node, _)| node.peer)
            .collect();
        if let Some((node, Err(failure))) = outcomes.into_iter().find(|(_, h)| h.is_err()) {
            self.discard_staged(&staged, &digest);
            return Err(ServeError::Handoff {
                what: format!(
                    "node {} did not take its shard (blocks {}..{}) of the new key's model",
                    node.peer, node.info.first_block, node.info.end_block
                ),
                source: Box::new(failure),
            });
        }
        // The cut shards were only for handing over; the whole file stays for weight checks.
        let _ = std::fs::remove_dir_all(&cut);
        let admission = match (self.admission)(file) {
            Ok(admission) => admission,
            Err(e) => {
                self.discard_staged(&staged, &digest);
                return Err(e);
            }
        };
        tracing::info!(
            "{} nodes staged their shards of model {}",
            staged.len(),
            digest.get(..12).unwrap_or(&digest)
        );
        Ok(on_nodes(key, digest, admission, staged, dir))
    }

    fn discard(&self, new: &Privacy) {
        if let Some(serving) = &new.nodes {
            self.discard_staged(&serving.nodes, &serving.digest);
        }
    }

    /// The nodes already serve this key's model (handed to them before the gateway
    /// restarted): only its digest and checks are needed, and nothing is handed over.
    fn adopt(
        &self,
        dir: tempfile::TempDir,
        file: &Path,
        key: EeKey,
        _: &Privacy,
    ) -> Result<Privacy> {
        let digest = veil_model::store::file_digest(file)?.1;
        let admission = (self.admission)(file)?;
        tracing::info!(
            "resuming the key this gateway rotated to before it stopped ({}): the nodes serve model {}",
            key.fingerprint().get(..16).unwrap_or_default(),
            digest.get(..12).unwrap_or(&digest)
        );
        Ok(on_nodes(key, digest, admission, Vec::new(), dir))
    }

    fn promote(&self, _old: &Privacy, new: &Privacy) {
        let Some(serving) = &new.nodes else {
            return;
        };
        for peer in &serving.nodes {
            let model = serving.digest.clone();
            // A node that misses this still serves the new model to sessions that name it.
            if let Err(e) = self.request(*peer, handoff::Request::Promote { model }) {
                tracing::warn!("{peer} did not promote the new key's shard: {e}");
            }
        }
    }
}

/// A key whose model `nodes` serve (file `digest`, kept in `dir` for weight checks).
fn on_nodes(
    key: EeKey,
    digest: String,
    admission: Option<Arc<Admission>>,
    nodes: Vec<PeerId>,
    dir: tempfile::TempDir,
) -> Privacy {
    Privacy {
        key,
        shards: Vec::new(),
        nodes: Some(NodesServing {
            digest,
            admission,
            nodes,
            file: Arc::new(dir),
        }),
    }
}
