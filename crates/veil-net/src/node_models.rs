//! The shards a node holds: the one new sessions get, and at most one other, either staged (a
//! shard handed over by a key holder, [`crate::protocol::handoff`], served only to sessions
//! that name it until it is promoted) or retiring (the shard served before the last promotion,
//! kept for requests still running under the old key: their failovers and weight openings).
//!
//! Two at most, so a node never holds more than twice its model's memory (plus the models of
//! sessions still open on a dropped shard, freed as they close).

use std::path::PathBuf;
use std::sync::Arc;

use libp2p::PeerId;
use veil_model::ShardModel;
use veil_zk::WeightsCommitment;

use crate::wire::ShardInfo;

/// A shard a node can serve: the model, what it announces, and the file its weight openings
/// are read from.
pub(crate) struct ServedShard {
    pub(crate) model: Arc<ShardModel>,
    pub(crate) info: ShardInfo,
    pub(crate) file: PathBuf,
    pub(crate) weights: Arc<WeightsCommitment>,
    /// Whether the file was handed over (it lives in the node's handoff directory and is
    /// removed once the shard is dropped); the operator's own file never is.
    pub(crate) handed: bool,
}

impl Drop for ServedShard {
    fn drop(&mut self) {
        if self.handed {
            let _ = std::fs::remove_file(&self.file);
        }
    }
}

/// Why the other shard is held.
enum Slot {
    /// Handed over by this peer, waiting to be promoted or discarded by it.
    Staged(PeerId),
    /// Served before the last promotion.
    Retiring,
}

/// A model name from a peer, as an answer may quote it: a digest (64 hex digits) as it is,
/// anything longer by its length only, so a refusal never echoes megabytes back.
fn quoted(model: &str) -> String {
    if model.len() <= 64 {
        format!("{model:?}")
    } else {
        format!("<a name of {} bytes>", model.len())
    }
}

/// The shards a node holds.
pub(crate) struct NodeModels {
    current: ServedShard,
    other: Option<(Slot, ServedShard)>,
}

impl NodeModels {
    /// A node serving `current` only.
    pub(crate) fn new(current: ServedShard) -> Self {
        Self {
            current,
            other: None,
        }
    }

    /// The shard new sessions get when they name none.
    pub(crate) fn current(&self) -> &ServedShard {
        &self.current
    }

    /// The shard of model `digest` (`None`: the current one), if held.
    pub(crate) fn find(&self, digest: Option<&str>) -> Option<&ServedShard> {
        let Some(digest) = digest else {
            return Some(&self.current);
        };
        std::iter::once(&self.current)
            .chain(self.other.as_ref().map(|(_, s)| s))
            .find(|s| s.info.model_digest == digest)
    }

    /// Why a request naming `model`, which this node does not hold, is refused.
    pub(crate) fn not_held(&self, model: &str) -> String {
        format!(
            "this node serves model {}, not {}",
            self.current.info.model_digest,
            quoted(model)
        )
    }

    /// What every held shard announces.
    pub(crate) fn infos(&self) -> impl Iterator<Item = &ShardInfo> {
        std::iter::once(&self.current.info).chain(self.other.as_ref().map(|(_, s)| &s.info))
    }

    /// The peer whose staged shard is held, if any.
    pub(crate) fn staged_by(&self) -> Option<PeerId> {
        match &self.other {
            Some((Slot::Staged(peer), _)) => Some(*peer),
            _ => None,
        }
    }

    /// Holds `shard`, staged by `peer`, in place of the other shard; returns the one it
    /// replaces, to stop announcing.
    pub(crate) fn stage(&mut self, shard: ServedShard, peer: PeerId) -> Option<ServedShard> {
        self.other
            .replace((Slot::Staged(peer), shard))
            .map(|(_, s)| s)
    }

    /// Makes the shard `peer` staged for model `digest` the current one; the current one
    /// retires.
    pub(crate) fn promote(&mut self, digest: &str, peer: PeerId) -> Result<&ServedShard, String> {
        match self.other.take() {
            Some((Slot::Staged(by), staged))
                if by == peer && staged.info.model_digest == digest =>
            {
                let retired = std::mem::replace(&mut self.current, staged);
                self.other = Some((Slot::Retiring, retired));
                Ok(&self.current)
            }
            other => {
                self.other = other;
                if self.current.info.model_digest == digest {
                    return Ok(&self.current); // promoted already: a retried request
                }
                Err(format!(
                    "no shard of model {} staged by {peer}",
                    quoted(digest)
                ))
            }
        }
    }

    /// Drops the shard `peer` staged for model `digest`, returned to stop announcing it.
    pub(crate) fn discard(&mut self, digest: &str, peer: PeerId) -> Result<ServedShard, String> {
        match self.other.take() {
            Some((Slot::Staged(by), staged))
                if by == peer && staged.info.model_digest == digest =>
            {
                Ok(staged)
            }
            other => {
                self.other = other;
                Err(format!(
                    "no shard of model {} staged by {peer}",
                    quoted(digest)
                ))
            }
        }
    }
}
