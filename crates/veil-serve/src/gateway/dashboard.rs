//! The dashboard: a page served at `/` (shipped in the binary, no outside assets: the machines
//! may be offline) and the JSON it polls at `/api/dashboard`.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;

/// The page itself.
pub const PAGE: &str = include_str!("dashboard.html");

/// How many finished requests the dashboard remembers.
const RECENT: usize = 100;

/// One finished request, as the dashboard shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    /// When it finished (seconds since the Unix epoch).
    pub finished: u64,
    /// `chat` or `completions`.
    pub endpoint: &'static str,
    /// Which nodes served it.
    pub route: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Decode speed.
    pub tokens_per_second: f64,
    /// `stop`, `length`, `cancelled` or `error`.
    pub outcome: String,
    /// The verification verdict, or `none` when the request was not verified.
    pub verification: String,
}

/// A node of the swarm as the dashboard lists it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeRow {
    pub name: String,
    /// The blocks it serves.
    pub ranges: String,
    pub replicas: usize,
    /// The client's reputation score for it, where known.
    pub reputation: Option<i64>,
}

/// The last [`RECENT`] requests, newest last.
#[derive(Debug, Default)]
pub struct RecentRequests(Mutex<VecDeque<RequestRecord>>);

impl RecentRequests {
    /// Remembers a finished request, forgetting the oldest beyond [`RECENT`].
    pub fn push(&self, record: RequestRecord) {
        let mut recent = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(record);
    }

    /// A copy of what is remembered.
    pub fn snapshot(&self) -> Vec<RequestRecord> {
        let recent = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        recent.iter().cloned().collect()
    }
}
