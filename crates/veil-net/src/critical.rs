//! Critical requests: a node runs its committed private model and returns the answer with a
//! zero-knowledge proof, which the asker checks before using the answer.

use libp2p::PeerId;

use crate::behaviour::zk_key;
use crate::client::SwarmClient;
use crate::error::{NetError, Result};
use crate::protocol::prove;

/// Nodes proving answers of the private model with `commitment`.
pub async fn provers(client: &SwarmClient, commitment: &str) -> Result<Vec<PeerId>> {
    client.providers(zk_key(commitment)).await
}

/// Asks `peer` for the private model's answer on `input`, with its proof.
pub async fn ask_proof(
    client: &SwarmClient,
    peer: PeerId,
    input: &[u8],
) -> Result<veil_zk::proof::InferenceProof> {
    let body = prove::Request::ProveInference {
        input: input.to_vec(),
    };
    match client.prove(peer, body).await? {
        prove::Response::InferenceProof(proof) => Ok(*proof),
        other => Err(NetError::BadMessage(format!("{peer} answered {other:?}"))),
    }
}
