//! When to replace a key: the frequency attack recovers more the more tokens a node sees under
//! one key (docs/THREAT_MODEL.md has the figures), so a gateway re-keys on a budget of tokens
//! and of time, whichever runs out first.

use std::time::Duration;

/// A key's budget; the defaults follow the measured frequency-attack figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationPolicy {
    /// Tokens (prompt and answer) a node may see under one key.
    pub max_tokens: u64,
    /// How long one key may stay in use, however little it served.
    pub max_age: Duration,
}

impl Default for RotationPolicy {
    /// 10k tokens (about half of the occurrences recoverable by the frequency attack, against a
    /// third at 1k and two thirds at 100k) or one hour.
    fn default() -> Self {
        Self {
            max_tokens: 10_000,
            max_age: Duration::from_secs(3600),
        }
    }
}

/// What one key has served so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyUsage {
    /// Tokens nodes have seen under the key.
    pub tokens: u64,
    /// Time since the key was put into use.
    pub age: Duration,
}

impl RotationPolicy {
    /// Whether the key must be replaced before serving `next_tokens` more.
    pub fn due(&self, usage: KeyUsage, next_tokens: u64) -> bool {
        usage.tokens.saturating_add(next_tokens) > self.max_tokens || usage.age >= self.max_age
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_on_tokens_or_age_whichever_comes_first() {
        let policy = RotationPolicy {
            max_tokens: 100,
            max_age: Duration::from_secs(60),
        };
        let fresh = KeyUsage::default();
        assert!(!policy.due(fresh, 100));
        assert!(policy.due(fresh, 101));
        let used = KeyUsage {
            tokens: 90,
            age: Duration::from_secs(10),
        };
        assert!(!policy.due(used, 10));
        assert!(policy.due(used, 11));
        let old = KeyUsage {
            tokens: 0,
            age: Duration::from_secs(60),
        };
        assert!(policy.due(old, 0));
        assert!(policy.due(
            KeyUsage {
                tokens: u64::MAX,
                age: Duration::ZERO
            },
            u64::MAX
        ));
    }
}
