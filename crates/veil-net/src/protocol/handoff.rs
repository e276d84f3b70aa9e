//! The handoff protocol: the key holder of an encrypted model hands a node the shard of the
//! model re-encrypted under a new key, so the key can rotate on the swarm. The node checks and
//! loads it beside the shard it serves (staged: served only to sessions that name it), then
//! serves it to new sessions once told to (promoted), or drops it (discarded) when the rotation
//! fails elsewhere. Sessions already open finish on the shard they were opened on.
//!
//! Limits: only the peers the node's operator named may hand over shards
//! ([`HandoffPolicy::from`]); one transfer at a time over all of them, of at most
//! [`HandoffPolicy::max_bytes`], in chunks of [`CHUNK_BYTES`] sent in order; a transfer that
//! stalls for [`STALLED_AFTER`] is dropped with its file; the shard must be of the blocks the
//! node serves now, and load before it is kept.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use libp2p::request_response::ResponseChannel;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{refuse, Answer, ErrorKind, ProtocolSpec, Refusal};
use crate::node_models::{NodeModels, ServedShard};
use crate::wire::ShardInfo;

/// Bytes one chunk carries at most.
pub const CHUNK_BYTES: usize = 4 << 20;

/// The protocol: a chunk and its framing per request, one request in flight per connection
/// (a transfer is sent in order).
pub const PROTOCOL: ProtocolSpec = ProtocolSpec {
    name: "/veil/handoff/1",
    max_request_bytes: CHUNK_BYTES as u64 + (64 << 10),
    max_response_bytes: 1 << 20,
    max_streams: 2,
};

/// A transfer with no chunk for this long is dropped, so a key holder that went away does not
/// hold the node's one transfer slot.
pub const STALLED_AFTER: Duration = Duration::from_secs(60);

/// A request from a key holder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// A shard file of `bytes` bytes whose blake3 (hex) is `blake3` follows.
    Begin {
        /// The file's length.
        bytes: u64,
        /// Its blake3 digest, hex.
        blake3: String,
    },
    /// The next bytes of the file, starting at `offset`.
    Chunk {
        /// Where they go: the bytes received so far.
        offset: u64,
        /// At most [`CHUNK_BYTES`].
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The file is complete: check it, load it, stage it. Answered once loaded.
    Finish,
    /// Serve the staged shard of `model` to new sessions from now on.
    Promote {
        /// The staged model's digest.
        model: String,
    },
    /// Drop the staged shard of `model`: the rotation it belonged to failed.
    Discard {
        /// The staged model's digest.
        model: String,
    },
}

/// A node's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Go on (after `Begin` and each `Chunk`).
    Ready,
    /// The shard is loaded and staged; this is what the node announces for it.
    Staged(ShardInfo),
    /// New sessions now get the promoted shard.
    Promoted,
    /// The staged shard is gone.
    Discarded,
    /// The request was refused.
    Refused(Refusal),
}

impl Answer for Response {
    fn refused(refusal: Refusal) -> Self {
        Self::Refused(refusal)
    }

    fn refusal(self) -> Result<Self, Refusal> {
        match self {
            Self::Refused(r) => Err(r),
            other => Ok(other),
        }
    }
}

/// Who may hand a node shards, and how large.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HandoffPolicy {
    /// The key holders (gateways) this node takes shards from; empty: none.
    pub from: HashSet<PeerId>,
    /// Largest shard file taken (0: twice the file the node was started with, at least
    /// 64 MiB).
    pub max_bytes: u64,
}

/// A file being received.
struct Receiving {
    peer: PeerId,
    path: PathBuf,
    file: std::fs::File,
    bytes: u64,
    received: u64,
    hasher: blake3::Hasher,
    blake3: String,
    touched: Instant,
}

impl Drop for Receiving {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A received file loaded (or not) on a blocking thread, on its way back to the event loop.
pub(crate) struct Loaded {
    pub(crate) peer: PeerId,
    pub(crate) channel: ResponseChannel<Response>,
    pub(crate) shard: Result<ServedShard, String>,
}

/// What the event loop does with a request.
pub(crate) enum Handled {
    /// Answer at once.
    Now(ResponseChannel<Response>, Response),
    /// The file at this path is complete: load it on a blocking thread, then [`settle`].
    Load(PeerId, PathBuf, ResponseChannel<Response>),
    /// Promote the staged shard of this model (and answer).
    Promote(String, ResponseChannel<Response>),
    /// Drop the staged shard of this model (and answer).
    Discard(String, ResponseChannel<Response>),
}

/// The node's side of the protocol: who may hand over, and the transfer in progress.
pub(crate) struct HandoffService {
    policy: HandoffPolicy,
    dir: PathBuf,
    receiving: Option<Receiving>,
    /// The peer whose finished file is loading.
    loading: Option<PeerId>,
}

impl HandoffService {
    /// Takes shards under `policy` into `dir`; `started_with` is the size of the node's own
    /// shard file, which bounds a handed one when the policy names no bound.
    pub(crate) fn new(mut policy: HandoffPolicy, dir: PathBuf, started_with: u64) -> Self {
        if policy.max_bytes == 0 {
            policy.max_bytes = started_with.saturating_mul(2).max(64 << 20);
        }
        Self {
            policy,
            dir,
            receiving: None,
            loading: None,
        }
    }

    /// Validates a request from `peer` and answers it, or says what the event loop must do.
    pub(crate) fn handle(
        &mut self,
        models: &NodeModels,
        peer: PeerId,
        request: Request,
        channel: ResponseChannel<Response>,
    ) -> Handled {
        if !self.policy.from.contains(&peer) {
            warn!(
                "refused a shard handoff from {peer}: not a key holder this node takes shards from"
            );
            let why = format!(
                "this node takes shards only from the key holders its operator named \
                 (--accept-shards-from); {peer} is not one"
            );
            return Handled::Now(channel, refuse(ErrorKind::BadRequest, why));
        }
        match self.step(models, peer, request) {
            Ok(Step::Answer(response)) => Handled::Now(channel, response),
            Ok(Step::Load(path)) => Handled::Load(peer, path, channel),
            Ok(Step::Promote(model)) => Handled::Promote(model, channel),
            Ok(Step::Discard(model)) => Handled::Discard(model, channel),
            Err(refusal) => Handled::Now(channel, Response::Refused(refusal)),
        }
    }

    fn step(
        &mut self,
        models: &NodeModels,
        peer: PeerId,
        request: Request,
    ) -> Result<Step, Refusal> {
        let bad = |why: String| Refusal::new(ErrorKind::BadRequest, why);
        match request {
            Request::Begin { bytes, blake3 } => {
                if bytes == 0 || bytes > self.policy.max_bytes {
                    return Err(bad(format!(
                        "a shard file here holds 1 to {} bytes, not {bytes}",
                        self.policy.max_bytes
                    )));
                }
                if blake3.len() != 64 || !blake3.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad("a blake3 digest is 64 hex digits".into()));
                }
                if let Some(other) = self.busy_with(models, peer) {
                    return Err(Refusal::new(
                        ErrorKind::Busy,
                        format!("taking a shard from {other}; try again once it is done"),
                    ));
                }
                self.receiving = None; // this peer starts over
                std::fs::create_dir_all(&self.dir).map_err(|e| internal(&self.dir, e))?;
                let path = self.dir.join(format!(
                    "incoming-{}.part",
                    hex::encode(rand::random::<[u8; 8]>())
                ));
                let file = std::fs::File::create(&path).map_err(|e| internal(&path, e))?;
                self.receiving = Some(Receiving {
                    peer,
                    path,
                    file,
                    bytes,
                    received: 0,
                    hasher: blake3::Hasher::new(),
                    blake3: blake3.to_ascii_lowercase(),
                    touched: Instant::now(),
                });
                Ok(Step::Answer(Response::Ready))
            }
            Request::Chunk { offset, data } => {
                let receiving = self.receiving_from(peer)?;
                if offset != receiving.received {
                    return Err(bad(format!(
                        "chunks come in order: expected offset {}, got {offset}",
                        receiving.received
                    )));
                }
                let end = offset.saturating_add(data.len() as u64);
                if data.is_empty() || data.len() > CHUNK_BYTES || end > receiving.bytes {
                    return Err(bad(format!(
                        "a chunk holds 1 to {CHUNK_BYTES} bytes within the {} announced",
                        receiving.bytes
                    )));
                }
                // A 4 MiB write to the page cache; fast enough for the event loop.
                if let Err(e) = receiving.file.write_all(&data) {
                    let refusal = internal(&receiving.path, e);
                    self.receiving = None;
                    return Err(refusal);
                }
                receiving.hasher.update(&data);
                receiving.received = end;
                receiving.touched = Instant::now();
                Ok(Step::Answer(Response::Ready))
            }
            Request::Finish => {
                let receiving = self.receiving_from(peer)?;
                if receiving.received != receiving.bytes {
                    return Err(bad(format!(
                        "the file is not complete: {} of {} bytes",
                        receiving.received, receiving.bytes
                    )));
                }
                let Some(receiving) = self.receiving.take() else {
                    return Err(bad("no transfer in progress".into()));
                };
                let got = receiving.hasher.finalize().to_hex().to_string();
                if got != receiving.blake3 {
                    return Err(bad(format!(
                        "the file's blake3 is {got}, not the {} announced: it was corrupted \
                         on the way; send it again",
                        receiving.blake3
                    )));
                }
                receiving
                    .file
                    .sync_all()
                    .map_err(|e| internal(&receiving.path, e))?;
                // Unique even when the same file is handed twice: a shard dropped later
                // removes only its own copy.
                let tag = hex::encode(rand::random::<[u8; 4]>());
                let path = self.dir.join(format!("{got}-{tag}.gguf"));
                std::fs::rename(&receiving.path, &path).map_err(|e| internal(&path, e))?;
                self.loading = Some(peer);
                Ok(Step::Load(path))
            }
            Request::Promote { model } => Ok(Step::Promote(model)),
            Request::Discard { model } => Ok(Step::Discard(model)),
        }
    }

    /// The transfer `peer` has in progress.
    fn receiving_from(&mut self, peer: PeerId) -> Result<&mut Receiving, Refusal> {
        match &mut self.receiving {
            Some(r) if r.peer == peer => Ok(r),
            _ => Err(Refusal::new(
                ErrorKind::UnknownSession,
                "no transfer in progress from you: send Begin first",
            )),
        }
    }

    /// Who holds the node's one slot against `peer`'s new transfer: another key holder's
    /// transfer, load or staged shard, or a load of any holder's, `peer`'s own included (its
    /// own transfer or staged shard it may replace; a load in progress it may not).
    fn busy_with(&self, models: &NodeModels, peer: PeerId) -> Option<PeerId> {
        let receiving = self.receiving.as_ref().map(|r| r.peer);
        let other = [receiving, self.loading, models.staged_by()]
            .into_iter()
            .flatten()
            .find(|other| *other != peer);
        other.or(self.loading)
    }

    /// Drops a transfer that stalled.
    pub(crate) fn sweep(&mut self, now: Instant) {
        if let Some(r) = &self.receiving {
            if now.duration_since(r.touched) > STALLED_AFTER {
                warn!(
                    "dropped the shard transfer from {}: no chunk for {STALLED_AFTER:?}",
                    r.peer
                );
                self.receiving = None;
            }
        }
    }

    /// A load finished: frees the slot, and says who handed it, what to answer and what to
    /// stage.
    pub(crate) fn settle(
        &mut self,
        loaded: Loaded,
    ) -> (
        PeerId,
        ResponseChannel<Response>,
        Result<ServedShard, Refusal>,
    ) {
        self.loading = None;
        let shard = loaded.shard.map_err(|why| {
            warn!("refused the shard {} handed over: {why}", loaded.peer);
            Refusal::new(ErrorKind::BadRequest, why)
        });
        if let Ok(s) = &shard {
            info!(
                "staged model {} from {}",
                // A digest read from the file: any text, so not sliced blindly.
                s.info
                    .model_digest
                    .get(..12)
                    .unwrap_or(&s.info.model_digest),
                loaded.peer
            );
        }
        (loaded.peer, loaded.channel, shard)
    }
}

/// What a valid request leads to.
enum Step {
    Answer(Response),
    Load(PathBuf),
    Promote(String),
    Discard(String),
}

fn internal(path: &std::path::Path, e: std::io::Error) -> Refusal {
    Refusal::new(
        ErrorKind::Internal,
        format!("cannot write {}: {e}", path.display()),
    )
}

/// Removes the files a node's previous run left in its handoff directory `dir` (transfers cut
/// short, `incoming-*.part`, and handed shards, `*.gguf`: a node that stopped without dropping
/// them, killed or crashed, no longer serves them), leaving anything else there alone.
/// Returns how many files and bytes went; a missing directory has none.
pub(crate) fn remove_leftovers(dir: &std::path::Path) -> std::io::Result<(usize, u64)> {
    let entries = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
        other => other?,
    };
    let (mut files, mut bytes) = (0, 0);
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ours =
            (name.starts_with("incoming-") && name.ends_with(".part")) || name.ends_with(".gguf");
        let meta = entry.metadata()?;
        if ours && meta.is_file() {
            std::fs::remove_file(entry.path())?;
            files += 1;
            bytes += meta.len();
        }
    }
    Ok((files, bytes))
}

/// Checks a loaded shard against the one the node serves: the same blocks of a model of the
/// same shape, under another key.
pub(crate) fn check_successor(current: &ShardInfo, new: &ShardInfo) -> Result<(), String> {
    let range = |i: &ShardInfo| {
        (
            i.first_block,
            i.end_block,
            i.block_count,
            i.embedding,
            i.head,
        )
    };
    if range(new) != range(current) {
        return Err(format!(
            "it holds blocks {}..{} of {} (embedding {}, head {}), and this node serves blocks \
             {}..{} of {} (embedding {}, head {})",
            new.first_block,
            new.end_block,
            new.block_count,
            new.embedding,
            new.head,
            current.first_block,
            current.end_block,
            current.block_count,
            current.embedding,
            current.head
        ));
    }
    if new.hidden_size != current.hidden_size {
        return Err(format!(
            "its hidden size is {}, this node's {}",
            new.hidden_size, current.hidden_size
        ));
    }
    if new.model_digest == current.model_digest {
        return Err("it is the model this node serves already".into());
    }
    Ok(())
}
