//! Asking a node to prove which weights it holds: its announced Merkle root must be the one
//! the verifier expects, and random chunks it opens must hash to that root.

use crate::client::{Candidate, SwarmClient};
use crate::protocol::prove;

/// Challenges `node` to open `count` random leaves; checks its announced root equals
/// `expected` and that the openings verify under it. Returns how many leaves were opened.
pub async fn challenge_weights(
    client: &SwarmClient,
    node: &Candidate,
    expected: &[u8; 32],
    count: usize,
) -> Result<usize, String> {
    let announced = node
        .info
        .weights
        .as_ref()
        .ok_or("it announces no weights commitment")?;
    let root: [u8; 32] = hex::decode(&announced.root)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("its announced root is not 32 bytes of hex")?;
    if root != *expected {
        return Err(format!(
            "it announces weights root {}, but these blocks of the model commit to {}: it holds other weights",
            announced.root,
            hex::encode(expected)
        ));
    }
    let leaves = usize::try_from(announced.leaves).map_err(|_| "too many leaves")?;
    let asked = veil_zk::challenge(leaves, count);
    let answer = match client
        .prove(
            node.peer,
            prove::Request::OpenWeights {
                leaves: asked.clone(),
                model: Some(node.info.model_digest.clone()),
            },
        )
        .await
    {
        Ok(prove::Response::WeightOpenings(openings)) => openings,
        Ok(other) => return Err(format!("it answered the challenge with {other:?}")),
        Err(e) => return Err(format!("it did not answer the challenge: {e}")),
    };
    veil_zk::check_openings(&root, leaves, &asked, &answer).map_err(|e| e.to_string())?;
    Ok(asked.len())
}
