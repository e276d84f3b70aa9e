//! Choosing a chain of nodes that covers a model's blocks: the cheapest path through the
//! announced ranges, by measured latency. Pure logic, so it is tested without a network.

use std::collections::HashSet;

use libp2p::PeerId;

use crate::client::Candidate;
use crate::error::{NetError, Result};

/// Extra cost of one more hop, beyond its latency: fewer hops mean fewer round trips per token.
const HOP_COST_MICROS: u128 = 2_000;

/// The cheapest chain covering blocks `start..block_count`, whose last node returns logits
/// exactly when `remote_head` is set; nodes in `avoid` are skipped.
pub fn plan_route(
    candidates: &[Candidate],
    start: usize,
    block_count: usize,
    remote_head: bool,
    avoid: &HashSet<PeerId>,
) -> Result<Vec<Candidate>> {
    // best[pos]: cheapest (cost, hop index, previous position) reaching block `pos`.
    let mut best: Vec<Option<(u128, usize, usize)>> = vec![None; block_count + 1];
    best[start] = Some((0, usize::MAX, start));
    for pos in start..block_count {
        let Some((cost, _, _)) = best[pos] else {
            continue;
        };
        for (i, c) in candidates.iter().enumerate() {
            let info = &c.info;
            let fits = info.first_block == pos
                && info.end_block > pos
                && info.end_block <= block_count
                && info.block_count == block_count
                && info.embedding == (pos == 0)
                && info.head == (remote_head && info.end_block == block_count)
                && !avoid.contains(&c.peer);
            if !fits {
                continue;
            }
            let next = cost + c.latency.as_micros() + HOP_COST_MICROS;
            let better = match best[info.end_block] {
                None => true,
                Some((old, j, _)) => next < old || (next == old && c.peer < candidates[j].peer),
            };
            if better {
                best[info.end_block] = Some((next, i, pos));
            }
        }
    }
    let mut route = Vec::new();
    let mut pos = block_count;
    while pos != start {
        let Some((_, i, prev)) = best[pos] else {
            return Err(NetError::NoRoute(format!(
                "no chain of nodes covers blocks {start}..{block_count}{}; found: {}",
                if remote_head {
                    " with the head"
                } else {
                    " without the head"
                },
                describe(candidates)
            )));
        };
        route.push(candidates[i].clone());
        pos = prev;
    }
    route.reverse();
    Ok(route)
}

fn describe(candidates: &[Candidate]) -> String {
    if candidates.is_empty() {
        return "no nodes".into();
    }
    candidates
        .iter()
        .map(|c| {
            format!(
                "{}..{}{}",
                c.info.first_block,
                c.info.end_block,
                if c.info.head { "+head" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ShardInfo;
    use std::time::Duration;

    fn node(first: usize, end: usize, millis: u64) -> Candidate {
        Candidate {
            peer: PeerId::random(),
            info: ShardInfo {
                model_digest: "m".into(),
                first_block: first,
                end_block: end,
                block_count: 30,
                embedding: first == 0,
                head: end == 30,
                hidden_size: 8,
                max_session_tokens: 100,
                format: "f32".into(),
                tee: None,
                weights: None,
                zk_commitment: None,
                exact: false,
            },
            latency: Duration::from_millis(millis),
        }
    }

    #[test]
    fn picks_the_fastest_replica_and_covers_every_block() {
        let nodes = vec![
            node(0, 10, 1),
            node(10, 20, 9),
            node(10, 20, 2),
            node(20, 30, 1),
        ];
        let route = plan_route(&nodes, 0, 30, true, &HashSet::new()).unwrap();
        let peers: Vec<_> = route.iter().map(|c| c.peer).collect();
        assert_eq!(peers, vec![nodes[0].peer, nodes[2].peer, nodes[3].peer]);

        // Avoiding the fast replica falls back to the slow one.
        let avoid = HashSet::from([nodes[2].peer]);
        let route = plan_route(&nodes, 0, 30, true, &avoid).unwrap();
        assert_eq!(route[1].peer, nodes[1].peer);
    }

    #[test]
    fn a_gap_is_no_route() {
        let nodes = vec![node(0, 10, 1), node(20, 30, 1)];
        let err = plan_route(&nodes, 0, 30, true, &HashSet::new()).unwrap_err();
        assert!(err.to_string().contains("0..10, 20..30+head"), "{err}");
        assert!(plan_route(&[], 0, 30, true, &HashSet::new()).is_err());
    }

    #[test]
    fn fewer_hops_win_at_equal_latency() {
        let nodes = vec![node(0, 30, 1), node(0, 15, 1), node(15, 30, 1)];
        let route = plan_route(&nodes, 0, 30, true, &HashSet::new()).unwrap();
        assert_eq!(route.len(), 1);
    }

    #[test]
    fn a_client_side_split_needs_headless_nodes_from_its_first_block() {
        let mut tail = node(4, 30, 1);
        tail.info.head = false;
        let nodes = vec![node(0, 30, 1), tail.clone()];
        let route = plan_route(&nodes, 4, 30, false, &HashSet::new()).unwrap();
        assert_eq!(route, vec![tail]);
        assert!(plan_route(&nodes[..1], 4, 30, false, &HashSet::new()).is_err());
    }
}
