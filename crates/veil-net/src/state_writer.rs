//! The node's database writes, on a thread of their own. Every redb commit waits for the disk,
//! and the event loop that answers every peer must not: a peer that makes a node write (an
//! identify message, a gossiped run record) would otherwise stall everyone else's requests.
//! Writes queue in a bounded channel; when it is full the write is dropped (peer addresses and
//! peers' run records are caches, not promises), and whatever is queued is written before the
//! node stops.

use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::thread::JoinHandle;

use libp2p::Multiaddr;
use tracing::{debug, warn};
use veil_meta::{RecordStore, RunRecord};

use crate::node_state::NodeState;

/// Writes waiting at most: past this, new ones are dropped.
pub const MAX_QUEUED_WRITES: usize = 1024;

/// One write to the node's database.
#[derive(Debug)]
pub enum StateWrite {
    /// Remember where a peer listens.
    Peer {
        /// Its peer id.
        peer: String,
        /// An address it listens on.
        addr: Multiaddr,
    },
    /// Keep a run record (the node's own or a peer's, already checked).
    Run(Box<RunRecord>),
}

/// The writer thread and the way to it.
pub struct StateWriter {
    queue: Option<SyncSender<StateWrite>>,
    thread: Option<JoinHandle<()>>,
    /// Run records in the store, counting those queued: what the history cap is held against.
    runs: u64,
}

impl StateWriter {
    /// Starts the writer over the node's database and run store.
    pub fn start(state: NodeState, runs: RecordStore) -> std::io::Result<Self> {
        let kept = runs.len().unwrap_or_else(|e| {
            warn!("cannot count run records: {e}");
            0
        });
        let (queue, writes) = sync_channel::<StateWrite>(MAX_QUEUED_WRITES);
        let thread = std::thread::Builder::new()
            .name("veil-state-writer".into())
            .spawn(move || {
                for write in writes {
                    let done = match &write {
                        StateWrite::Peer { peer, addr } => {
                            state.remember_peer(peer, addr).map_err(|e| e.to_string())
                        }
                        StateWrite::Run(record) => runs
                            .append(std::slice::from_ref(record))
                            .map_err(|e| e.to_string()),
                    };
                    if let Err(e) = done {
                        warn!("cannot write {write:?}: {e}");
                    }
                }
            })?;
        Ok(Self {
            queue: Some(queue),
            thread: Some(thread),
            runs: kept,
        })
    }

    /// Queues `write`; false if it was dropped because the queue is full.
    pub fn send(&mut self, write: StateWrite) -> bool {
        let is_run = matches!(write, StateWrite::Run(_));
        let Some(queue) = &self.queue else {
            return false;
        };
        match queue.try_send(write) {
            Ok(()) => {
                self.runs += u64::from(is_run);
                true
            }
            Err(TrySendError::Full(w)) => {
                debug!("database writes are behind: dropped {w:?}");
                false
            }
            Err(TrySendError::Disconnected(w)) => {
                warn!("the database writer stopped: dropped {w:?}");
                false
            }
        }
    }

    /// Run records kept or queued.
    pub fn runs(&self) -> u64 {
        self.runs
    }
}

impl Drop for StateWriter {
    /// Writes what is queued, then returns.
    fn drop(&mut self) {
        self.queue.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(node: &str, at_unix: u64) -> RunRecord {
        serde_json::from_value(serde_json::json!({
            "features": {
                "model": {"name": "smollm2", "parameters_m": 135.0, "layers": 30, "hidden": 576, "stored_bits": 5.0},
                "hardware": {"cores": 2, "memory_gib": 24.0, "avx2": true, "avx512_vnni": true, "price_per_hour": 1.0},
                "workload": {"prompt_tokens": 37, "output_tokens": 64, "batch": 1, "shared_prefix": 0.0, "rewrite": false}
            },
            "method": "plain", "seconds": 1.0, "tokens": 64, "latency_ms": 1000.0,
            "perplexity": 10.0, "node": node, "at_unix": at_unix
        }))
        .unwrap()
    }

    #[test]
    fn queued_writes_are_all_written_before_the_writer_stops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        {
            let state = NodeState::open(&path).unwrap();
            let runs = state.runs().unwrap();
            let mut writer = StateWriter::start(state, runs).unwrap();
            for n in 0..50u64 {
                let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{}", 4000 + n).parse().unwrap();
                assert!(writer.send(StateWrite::Peer {
                    peer: format!("peer-{n}"),
                    addr,
                }));
                assert!(writer.send(StateWrite::Run(Box::new(record("someone", n)))));
            }
            assert_eq!(writer.runs(), 50);
        }
        let state = NodeState::open(&path).unwrap();
        assert_eq!(state.peers().unwrap().len(), 50);
        let runs = state.runs().unwrap();
        assert_eq!(runs.len().unwrap(), 50);
        // A writer started later counts what is there.
        let writer = StateWriter::start(state, runs).unwrap();
        assert_eq!(writer.runs(), 50);
    }
}
