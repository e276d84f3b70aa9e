//! What a node keeps across restarts, in an embedded database (`redb`): its identity key, so
//! its peer id (and any reputation attached to it) survives, and the peers it has met, so it can
//! rejoin without being told a bootstrap address again.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use libp2p::identity::Keypair;
use libp2p::Multiaddr;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use veil_verify::{job_digest, Evidence, Judged, Proven};

use crate::error::{NetError, Result};

const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("settings");
const PEERS: TableDefinition<&str, &str> = TableDefinition::new("peers");
const REPUTATION: TableDefinition<&str, i64> = TableDefinition::new("reputation");
const EVIDENCE_APPLIED: TableDefinition<&str, &str> = TableDefinition::new("evidence_applied");
const IDENTITY: &str = "identity";

/// Reputation lost for being proven to lie: enough to be avoided from then on.
pub const CAUGHT_PENALTY: i64 = 100;
/// Reputation at or below which a node is avoided.
pub const AVOID_BELOW: i64 = -CAUGHT_PENALTY + 1;
/// Reputation lost by a validator that passed an answer a majority proved wrong.
pub const DISSENT_PENALTY: i64 = 10;

/// Most peer addresses remembered; older ones are dropped first.
const MAX_PEERS: usize = 256;

/// A node's persistent state.
pub struct NodeState {
    db: Arc<Database>,
    path: PathBuf,
}

impl NodeState {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| db_error(path, e))?;
        }
        let db = Database::create(path).map_err(|e| db_error(path, e))?;
        // It holds the node's identity key: owner-only.
        #[cfg(unix)]
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| db_error(path, e))?;
        Ok(Self {
            db: Arc::new(db),
            path: path.to_path_buf(),
        })
    }

    /// MetaInf's run records, kept in the same database.
    pub fn runs(&self) -> Result<veil_meta::RecordStore> {
        veil_meta::RecordStore::within(Arc::clone(&self.db), &self.path).map_err(|e| {
            NetError::Database {
                path: self.path.display().to_string(),
                reason: e.to_string(),
            }
        })
    }

    /// The node's identity key, made on first use and kept from then on.
    pub fn identity(&self) -> Result<Keypair> {
        let stored = {
            let txn = self.db.begin_read().map_err(|e| self.error(e))?;
            match txn.open_table(SETTINGS) {
                Ok(table) => table
                    .get(IDENTITY)
                    .map_err(|e| self.error(e))?
                    .map(|v| v.value().to_vec()),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(self.error(e)),
            }
        };
        if let Some(bytes) = stored {
            return Keypair::from_protobuf_encoding(&bytes).map_err(|e| NetError::Database {
                path: self.path.display().to_string(),
                reason: format!("the stored identity key is unreadable ({e}); move the file away to make a new identity"),
            });
        }
        let key = Keypair::generate_ed25519();
        let bytes = key
            .to_protobuf_encoding()
            .map_err(|e| NetError::Network(e.to_string()))?;
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        txn.open_table(SETTINGS)
            .map_err(|e| self.error(e))?
            .insert(IDENTITY, bytes.as_slice())
            .map_err(|e| self.error(e))?;
        txn.commit().map_err(|e| self.error(e))?;
        Ok(key)
    }

    /// Remembers a peer's address. When the list is full, the peer heard from longest ago
    /// makes way (not the smallest peer id: ids can be ground, ages cannot).
    pub fn remember_peer(&self, peer: &str, addr: &Multiaddr) -> Result<()> {
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        {
            let mut table = txn.open_table(PEERS).map_err(|e| self.error(e))?;
            // Each entry is "<sequence> <address>": the sequence says which is oldest.
            let mut oldest: Option<(u64, String)> = None;
            let mut newest = 0u64;
            for row in table.iter().map_err(|e| self.error(e))? {
                let (k, v) = row.map_err(|e| self.error(e))?;
                let (seq, _) = split_peer_entry(v.value());
                newest = newest.max(seq);
                if k.value() != peer && oldest.as_ref().is_none_or(|(s, _)| seq < *s) {
                    oldest = Some((seq, k.value().to_string()));
                }
            }
            let full = table.len().map_err(|e| self.error(e))? as usize >= MAX_PEERS;
            if full && table.get(peer).map_err(|e| self.error(e))?.is_none() {
                if let Some((_, old)) = oldest {
                    table.remove(old.as_str()).map_err(|e| self.error(e))?;
                }
            }
            let entry = format!("{} {addr}", newest + 1);
            table
                .insert(peer, entry.as_str())
                .map_err(|e| self.error(e))?;
        }
        txn.commit().map_err(|e| self.error(e))
    }

    /// The peers remembered, as (peer id, address); unreadable entries are skipped.
    pub fn peers(&self) -> Result<Vec<(String, Multiaddr)>> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = match txn.open_table(PEERS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.error(e)),
        };
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.error(e))? {
            let (k, v) = row.map_err(|e| self.error(e))?;
            if let Ok(addr) = split_peer_entry(v.value()).1.parse() {
                out.push((k.value().to_string(), addr));
            }
        }
        Ok(out)
    }

    /// Applies a piece of evidence once: checks its signatures, then marks the generator as
    /// caught and docks validators that passed the failed answer. Evidence that does not
    /// check moves nothing.
    pub fn apply_evidence<J: Judged>(&self, evidence: &Evidence<J>) -> Result<Proven> {
        let proven = evidence.check()?;
        let digest = job_digest(&evidence.job.body)?;
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        {
            let mut applied = txn
                .open_table(EVIDENCE_APPLIED)
                .map_err(|e| self.error(e))?;
            if applied
                .get(digest.as_str())
                .map_err(|e| self.error(e))?
                .is_some()
            {
                return Ok(proven);
            }
            applied
                .insert(digest.as_str(), proven.generator.as_str())
                .map_err(|e| self.error(e))?;
            let mut table = txn.open_table(REPUTATION).map_err(|e| self.error(e))?;
            let mut add = |peer: &str, delta: i64| -> Result<()> {
                let now = table
                    .get(peer)
                    .map_err(|e| self.error(e))?
                    .map_or(0, |v| v.value());
                table
                    .insert(peer, now.saturating_add(delta))
                    .map_err(|e| self.error(e))?;
                Ok(())
            };
            add(&proven.generator, -CAUGHT_PENALTY)?;
            for peer in &proven.passed {
                add(peer, -DISSENT_PENALTY)?;
            }
        }
        txn.commit().map_err(|e| self.error(e))?;
        Ok(proven)
    }

    /// Marks a judge this client caught failing an answer that its own recomputation passes:
    /// as good as proven lying to this client (no third party can check it), so avoided.
    pub fn record_overruled(&self, judge: &str) -> Result<()> {
        self.add_reputation(judge, -CAUGHT_PENALTY)
    }

    /// Credits the generator of an answer a quorum of validators signed as passing.
    pub fn record_accepted(&self, generator: &str) -> Result<()> {
        self.add_reputation(generator, 1)
    }

    fn add_reputation(&self, peer: &str, delta: i64) -> Result<()> {
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        {
            let mut table = txn.open_table(REPUTATION).map_err(|e| self.error(e))?;
            let now = table
                .get(peer)
                .map_err(|e| self.error(e))?
                .map_or(0, |v| v.value());
            table
                .insert(peer, now.saturating_add(delta))
                .map_err(|e| self.error(e))?;
        }
        txn.commit().map_err(|e| self.error(e))
    }

    /// Every peer's reputation (peers never judged are at 0 and not listed).
    pub fn reputations(&self) -> Result<Vec<(String, i64)>> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = match txn.open_table(REPUTATION) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.error(e)),
        };
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.error(e))? {
            let (k, v) = row.map_err(|e| self.error(e))?;
            out.push((k.value().to_string(), v.value()));
        }
        Ok(out)
    }

    /// Peers caught lying (reputation below [`AVOID_BELOW`]): left out of committees and of
    /// every route.
    pub fn avoided(&self) -> Result<std::collections::HashSet<libp2p::PeerId>> {
        Ok(self
            .reputations()?
            .into_iter()
            .filter(|(_, r)| *r < AVOID_BELOW)
            .filter_map(|(p, _)| p.parse().ok())
            .collect())
    }

    fn error(&self, e: impl std::fmt::Display) -> NetError {
        db_error(&self.path, e)
    }
}

/// A known-peer entry's sequence number and address (entries written before sequences were
/// kept count as the oldest).
fn split_peer_entry(entry: &str) -> (u64, &str) {
    match entry.split_once(' ') {
        Some((seq, addr)) => (seq.parse().unwrap_or(0), addr),
        None => (0, entry),
    }
}

fn db_error(path: &Path, e: impl std::fmt::Display) -> NetError {
    NetError::Database {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_peers_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        let (id, addr): (String, Multiaddr) =
            ("peer-a".into(), "/ip4/127.0.0.1/tcp/4001".parse().unwrap());
        let first = {
            let state = NodeState::open(&path).unwrap();
            state.remember_peer(&id, &addr).unwrap();
            state.identity().unwrap().public().to_peer_id()
        };
        let state = NodeState::open(&path).unwrap();
        assert_eq!(state.identity().unwrap().public().to_peer_id(), first);
        assert_eq!(state.peers().unwrap(), vec![(id, addr)]);
        let other = NodeState::open(&dir.path().join("other.redb")).unwrap();
        assert_ne!(other.identity().unwrap().public().to_peer_id(), first);
    }

    #[test]
    fn a_full_peer_list_forgets_the_peer_heard_from_longest_ago() {
        let dir = tempfile::tempdir().unwrap();
        let state = NodeState::open(&dir.path().join("node.redb")).unwrap();
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().unwrap();
        // Ids that sort last were evicted last before: a ground id stayed forever.
        let id = |i: usize| format!("peer-{:04}", MAX_PEERS - i);
        for i in 0..MAX_PEERS {
            state.remember_peer(&id(i), &addr).unwrap();
        }
        // The first one is heard from again, so the second is now the oldest.
        state.remember_peer(&id(0), &addr).unwrap();
        state.remember_peer("newcomer", &addr).unwrap();
        let known: Vec<String> = state.peers().unwrap().into_iter().map(|(p, _)| p).collect();
        assert_eq!(known.len(), MAX_PEERS);
        assert!(known.contains(&"newcomer".to_string()));
        assert!(known.contains(&id(0)));
        assert!(!known.contains(&id(1)), "the oldest stayed");
    }

    #[test]
    fn a_corrupt_database_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        std::fs::write(&path, b"not a database at all").unwrap();
        let err = NodeState::open(&path).err().expect("refused");
        assert!(err.to_string().contains("node.redb"), "{err}");
    }
}
