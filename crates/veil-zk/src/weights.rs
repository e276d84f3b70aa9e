//! A Merkle root over every tensor of a GGUF model, and random openings checked against it.
//!
//! Tensors are taken in name order and cut into chunks of [`CHUNK_BYTES`]; each leaf hashes the
//! tensor's name, the chunk's index and its bytes (so a chunk cannot be passed off as another
//! tensor's), and the tree is `rs_merkle`'s over SHA-256. A verifier that knows the root and
//! the number of leaves asks for random leaves; the node answers with their bytes and one
//! multi-proof, which only the committed bytes satisfy.

use rand::seq::index::sample;
use rs_merkle::algorithms::Sha256;
use rs_merkle::{Hasher, MerkleProof, MerkleTree};
use serde::{Deserialize, Serialize};
use veil_model::{GgufFile, Shard};

use crate::error::{Result, ZkError};

/// Bytes per leaf: small enough that a handful of openings is a small message.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// Most leaves one challenge may ask for (8 MiB of openings at most).
pub const MAX_OPENINGS: usize = 128;

/// Where a leaf's bytes live.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Leaf {
    tensor: String,
    chunk: u32,
    start: u64,
    len: usize,
}

/// The commitment to one model file's weights.
pub struct WeightsCommitment {
    tree: MerkleTree<Sha256>,
    leaves: Vec<Leaf>,
    root: [u8; 32],
}

/// One opened leaf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opening {
    /// The leaf's index in the tree.
    pub index: u32,
    /// The tensor it belongs to.
    pub tensor: String,
    /// Which chunk of the tensor.
    pub chunk: u32,
    /// The chunk's bytes.
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

/// A challenge's answer: the opened leaves and one proof for all of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Openings {
    /// The leaves, in the order asked.
    pub openings: Vec<Opening>,
    /// `rs_merkle`'s multi-proof.
    #[serde(with = "serde_bytes")]
    pub proof: Vec<u8>,
}

/// The hash of one leaf.
fn leaf_hash(tensor: &str, chunk: u32, bytes: &[u8]) -> [u8; 32] {
    let mut data = Vec::with_capacity(bytes.len() + tensor.len() + 16);
    data.extend_from_slice(b"veil weights leaf v1\0");
    data.extend_from_slice(&(tensor.len() as u32).to_le_bytes());
    data.extend_from_slice(tensor.as_bytes());
    data.extend_from_slice(&chunk.to_le_bytes());
    data.extend_from_slice(bytes);
    Sha256::hash(&data)
}

impl WeightsCommitment {
    /// Commits to the tensors `shard` needs from `file` (a whole model or a shard file: both
    /// give the same root for the same blocks), reading them once.
    pub fn of_shard(file: &mut GgufFile, shard: &Shard) -> Result<Self> {
        let mut leaves = Vec::new();
        let mut hashes = Vec::new();
        for name in veil_model::shard_tensor_names(file, shard) {
            let bytes = file.tensor_bytes(&name)?;
            for (chunk, piece) in bytes.chunks(CHUNK_BYTES).enumerate() {
                let chunk = chunk as u32;
                hashes.push(leaf_hash(&name, chunk, piece));
                leaves.push(Leaf {
                    tensor: name.clone(),
                    chunk,
                    start: chunk as u64 * CHUNK_BYTES as u64,
                    len: piece.len(),
                });
            }
        }
        let tree = MerkleTree::<Sha256>::from_leaves(&hashes);
        let root = tree.root().ok_or_else(|| no_tensor_data(file))?;
        Ok(Self { tree, leaves, root })
    }

    /// The root, what a node publishes.
    pub fn root(&self) -> [u8; 32] {
        self.root
    }

    /// The root in hex.
    pub fn root_hex(&self) -> String {
        hex::encode(self.root)
    }

    /// Leaves in the tree: a verifier needs it to check a proof.
    pub fn leaf_count(&self) -> usize {
        self.leaves.len()
    }

    /// Answers a challenge from the file the commitment was made from.
    pub fn open(&self, file: &mut GgufFile, indices: &[u32]) -> Result<Openings> {
        check_indices(indices, self.leaves.len())?;
        let mut openings = Vec::with_capacity(indices.len());
        for &index in indices {
            let leaf = &self.leaves[index as usize];
            let bytes = file.tensor_range(&leaf.tensor, leaf.start, leaf.len)?;
            openings.push(Opening {
                index,
                tensor: leaf.tensor.clone(),
                chunk: leaf.chunk,
                bytes,
            });
        }
        // rs_merkle builds and checks multi-proofs for leaves in index order.
        let mut positions: Vec<usize> = indices.iter().map(|&i| i as usize).collect();
        positions.sort_unstable();
        Ok(Openings {
            openings,
            proof: self.tree.proof(&positions).to_bytes(),
        })
    }
}

fn no_tensor_data(file: &GgufFile) -> ZkError {
    ZkError::Model(veil_model::ModelError::CorruptGguf {
        path: file.path().to_path_buf(),
        reason: "the file holds no tensor data to commit to".into(),
    })
}

/// Every leaf hash of a whole model file, read once, so the root any shard of it commits to
/// costs a Merkle tree over hashes already made rather than another read of the file: what a
/// client needs to check nodes serving many different block ranges.
pub struct ModelLeaves {
    file: GgufFile,
    by_tensor: std::collections::HashMap<String, Vec<[u8; 32]>>,
}

impl ModelLeaves {
    /// Hashes every tensor of `file` (a whole model) in chunks, as [`WeightsCommitment`] does.
    pub fn of_file(mut file: GgufFile) -> Result<Self> {
        let names: Vec<String> = file.content().tensor_infos.keys().cloned().collect();
        let mut by_tensor = std::collections::HashMap::with_capacity(names.len());
        for name in names {
            let bytes = file.tensor_bytes(&name)?;
            let hashes = (bytes.chunks(CHUNK_BYTES).enumerate())
                .map(|(chunk, piece)| leaf_hash(&name, chunk as u32, piece))
                .collect();
            by_tensor.insert(name, hashes);
        }
        Ok(Self { file, by_tensor })
    }

    /// The root [`WeightsCommitment::of_shard`] gives for `shard` of this model.
    pub fn root_of(&self, shard: &Shard) -> Result<[u8; 32]> {
        if shard.layers.start > shard.layers.end
            || shard.layers.end > veil_model::LlamaConfig::from_gguf(&self.file)?.block_count
        {
            return Err(ZkError::BadChallenge(format!(
                "blocks {}-{} are not a range of this model",
                shard.layers.start, shard.layers.end
            )));
        }
        let hashes: Vec<[u8; 32]> = veil_model::shard_tensor_names(&self.file, shard)
            .iter()
            .flat_map(|name| self.by_tensor.get(name).into_iter().flatten().copied())
            .collect();
        MerkleTree::<Sha256>::from_leaves(&hashes)
            .root()
            .ok_or_else(|| no_tensor_data(&self.file))
    }
}

fn check_indices(indices: &[u32], leaf_count: usize) -> Result<()> {
    if indices.is_empty() || indices.len() > MAX_OPENINGS {
        return Err(ZkError::BadChallenge(format!(
            "ask for 1 to {MAX_OPENINGS} leaves, not {}",
            indices.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for &i in indices {
        if i as usize >= leaf_count {
            return Err(ZkError::BadChallenge(format!(
                "leaf {i} does not exist ({leaf_count} leaves)"
            )));
        }
        if !seen.insert(i) {
            return Err(ZkError::BadChallenge(format!("leaf {i} asked twice")));
        }
    }
    Ok(())
}

/// `count` distinct random leaves out of `leaf_count`.
pub fn challenge(leaf_count: usize, count: usize) -> Vec<u32> {
    let count = count.min(leaf_count).min(MAX_OPENINGS);
    sample(&mut rand::rng(), leaf_count, count)
        .into_iter()
        .map(|i| i as u32)
        .collect()
}

/// Checks openings answer the challenge `asked` under `root` over `leaf_count` leaves.
pub fn check_openings(
    root: &[u8; 32],
    leaf_count: usize,
    asked: &[u32],
    answer: &Openings,
) -> Result<()> {
    check_indices(asked, leaf_count)?;
    let got: Vec<u32> = answer.openings.iter().map(|o| o.index).collect();
    if got != asked {
        return Err(ZkError::BadOpenings(format!(
            "asked for leaves {asked:?}, got {got:?}"
        )));
    }
    if let Some(o) = answer.openings.iter().find(|o| o.bytes.len() > CHUNK_BYTES) {
        return Err(ZkError::BadOpenings(format!(
            "leaf {} has {} bytes, over a chunk",
            o.index,
            o.bytes.len()
        )));
    }
    let proof = MerkleProof::<Sha256>::from_bytes(&answer.proof)
        .map_err(|e| ZkError::BadOpenings(format!("unreadable proof: {e}")))?;
    let mut leaves: Vec<(usize, [u8; 32])> = answer
        .openings
        .iter()
        .map(|o| (o.index as usize, leaf_hash(&o.tensor, o.chunk, &o.bytes)))
        .collect();
    leaves.sort_unstable_by_key(|(i, _)| *i);
    let (positions, hashes): (Vec<usize>, Vec<[u8; 32]>) = leaves.into_iter().unzip();
    if proof.verify(*root, &positions, &hashes, leaf_count) {
        Ok(())
    } else {
        Err(ZkError::BadOpenings(
            "the opened chunks do not hash to the committed root: the node does not hold the committed weights".into(),
        ))
    }
}
