//! MetaInf's performance history on the swarm: a node serving a whole model records each
//! generation it served (in its own database, beside its identity) and shares the record with
//! its peers over gossipsub; a peer's record is kept only once it parses, passes the record
//! checks and names the peer that signed the message, so no one can speak for another node.

use std::time::Duration;

use libp2p::PeerId;
use veil_meta::{
    Features, HardwareFeatures, ModelFeatures, RunRecord, WorkloadFeatures, MAX_RECORD_BYTES,
};

/// The gossipsub topic run records travel on.
pub const RUNS_TOPIC: &str = "veil/meta/runs/1";

/// Most records a node keeps; past it, peers' records are dropped (its own are still kept),
/// so a chatty or hostile peer cannot fill the disk.
pub const MAX_KEPT_RUNS: u64 = 100_000;

/// Peers' records a node keeps from one author while it runs: no author can fill the history
/// (or crowd out everyone else's records) alone.
pub const MAX_RUNS_PER_AUTHOR: u64 = 1_000;

/// How many records each author has had kept, so one author's share stays bounded.
#[derive(Debug, Default)]
pub struct AuthorQuota {
    kept: std::collections::HashMap<String, u64>,
}

impl AuthorQuota {
    /// Whether one more record from `author` may be kept; counts it if so. Authors are
    /// remembered up to the history's own bound, after which unknown authors are refused.
    pub fn admit(&mut self, author: &str) -> bool {
        let known = self.kept.len() as u64;
        match self.kept.get_mut(author) {
            Some(n) if *n >= MAX_RUNS_PER_AUTHOR => false,
            Some(n) => {
                *n += 1;
                true
            }
            None if known >= MAX_KEPT_RUNS / MAX_RUNS_PER_AUTHOR * 10 => false,
            None => {
                self.kept.insert(author.to_string(), 1);
                true
            }
        }
    }
}

/// The largest gossip message accepted: one record and gossipsub's framing.
pub const MAX_GOSSIP_BYTES: usize = MAX_RECORD_BYTES + 1024;

/// What a node's records say about the node, fixed when it starts.
#[derive(Debug, Clone)]
pub struct RunTemplate {
    /// The model served.
    pub model: ModelFeatures,
    /// This machine.
    pub hardware: HardwareFeatures,
    /// The method the node runs (its weight format: `plain`, `q8_0` or `f32`).
    pub method: String,
    /// Perplexity of the served weights on held-out text, measured at start.
    pub perplexity: f64,
    /// Whether records are also shared with peers (a node may keep its workload to itself).
    pub share: bool,
}

/// What one plain session used, counted step by step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionUsage {
    /// Tokens in the first step (the prompt).
    pub prompt_tokens: usize,
    /// Steps run: each hands back the logits one generated token is sampled from.
    pub steps: usize,
    /// Time spent computing, not waiting for the client.
    pub compute: Duration,
}

impl SessionUsage {
    /// Counts a step of `tokens` positions that took `took`.
    pub fn add_step(&mut self, tokens: usize, took: Duration) {
        if self.steps == 0 {
            self.prompt_tokens = tokens;
        }
        self.steps += 1;
        self.compute += took;
    }
}

impl RunTemplate {
    /// The record of a finished session, or none for a session that never ran a step.
    pub fn record(&self, usage: &SessionUsage, node: &PeerId, at_unix: u64) -> Option<RunRecord> {
        if usage.steps == 0 || usage.prompt_tokens == 0 {
            return None;
        }
        let seconds = usage.compute.as_secs_f64().max(1e-6);
        let record = RunRecord {
            features: Features {
                model: self.model.clone(),
                hardware: self.hardware.clone(),
                workload: WorkloadFeatures {
                    prompt_tokens: usage.prompt_tokens.min(u32::MAX as usize) as u32,
                    output_tokens: usage.steps.min(u32::MAX as usize) as u32,
                    batch: 1,
                    shared_prefix: 0.0,
                    rewrite: false,
                },
            },
            method: self.method.clone(),
            seconds,
            tokens: usage.steps as u64,
            latency_ms: seconds * 1000.0,
            perplexity: self.perplexity,
            node: node.to_string(),
            at_unix,
        };
        record.check().ok().map(|()| record)
    }
}

/// Checks a record a peer gossiped: it must parse, pass [`RunRecord::check`] and name the peer
/// that signed the message as the node that measured it.
pub fn accept_gossiped(data: &[u8], source: Option<PeerId>) -> Result<RunRecord, String> {
    let source = source.ok_or("an unsigned message")?;
    let record = RunRecord::from_json(data).map_err(|e| e.to_string())?;
    if record.node != source.to_string() {
        return Err(format!(
            "the record names node {}, but {source} sent it",
            record.node
        ));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_author_keeps_a_bounded_share() {
        let mut quota = AuthorQuota::default();
        let kept = (0..MAX_RUNS_PER_AUTHOR + 50)
            .filter(|_| quota.admit("flooder"))
            .count() as u64;
        assert_eq!(kept, MAX_RUNS_PER_AUTHOR);
        assert!(quota.admit("someone else"));
        // A crowd of fresh authors is bounded too.
        let fresh = (0..10_000)
            .filter(|i| quota.admit(&format!("sybil-{i}")))
            .count() as u64;
        assert!(fresh < 10_000 && fresh * MAX_RUNS_PER_AUTHOR <= 10 * MAX_KEPT_RUNS);
    }

    fn template() -> RunTemplate {
        RunTemplate {
            model: ModelFeatures {
                name: "m".into(),
                parameters_m: 135.0,
                layers: 30,
                hidden: 576,
                stored_bits: 5.0,
            },
            hardware: HardwareFeatures {
                cores: 2,
                memory_gib: 24.0,
                avx2: true,
                avx512_vnni: false,
                price_per_hour: 1.0,
            },
            method: "plain".into(),
            perplexity: 52.0,
            share: true,
        }
    }

    #[test]
    fn a_session_becomes_a_record_of_its_steps() {
        let mut usage = SessionUsage::default();
        assert!(template().record(&usage, &PeerId::random(), 1).is_none());
        usage.add_step(37, Duration::from_millis(50));
        for _ in 0..9 {
            usage.add_step(1, Duration::from_millis(5));
        }
        let node = PeerId::random();
        let record = template().record(&usage, &node, 7).unwrap();
        assert_eq!(record.features.workload.prompt_tokens, 37);
        assert_eq!(record.features.workload.output_tokens, 10);
        assert_eq!(record.tokens, 10);
        assert!((record.seconds - 0.095).abs() < 1e-9);
        assert_eq!(record.node, node.to_string());
        assert_eq!(record.at_unix, 7);
    }

    #[test]
    fn gossiped_records_must_name_their_signer() {
        let mut usage = SessionUsage::default();
        usage.add_step(5, Duration::from_millis(10));
        let author = PeerId::random();
        let record = template().record(&usage, &author, 1).unwrap();
        let bytes = serde_json::to_vec(&record).unwrap();
        assert_eq!(accept_gossiped(&bytes, Some(author)).unwrap(), record);
        let other = PeerId::random();
        let err = accept_gossiped(&bytes, Some(other)).unwrap_err();
        assert!(err.contains("sent it"), "{err}");
        assert!(accept_gossiped(&bytes, None).is_err());
        assert!(accept_gossiped(b"{not json", Some(author)).is_err());
        let mut bad = record.clone();
        bad.seconds = -1.0;
        let bad = serde_json::to_vec(&bad).unwrap();
        assert!(accept_gossiped(&bad, Some(author)).is_err());
        let huge = vec![b' '; MAX_RECORD_BYTES + 1];
        assert!(accept_gossiped(&huge, Some(author))
            .unwrap_err()
            .contains("limit"));
    }
}
