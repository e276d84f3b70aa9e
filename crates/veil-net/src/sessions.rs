//! The sessions a node holds: bounded in number and length, freed when closed or idle.
//!
//! Pure bookkeeping, generic over what a session stores (a KV cache in the node), so the limits
//! are tested without a model.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::wire::SessionId;

/// A node's limits on sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Sessions open at once.
    pub max_sessions: usize,
    /// Positions one session may hold.
    pub max_tokens: usize,
    /// A session unused this long is freed.
    pub idle_timeout: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            max_sessions: 16,
            max_tokens: 8192,
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// Why a session could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionRefusal {
    /// All session slots are taken.
    Full(usize),
    /// No such session (never opened, closed, or expired).
    Unknown(SessionId),
    /// The step would take the session past its token limit.
    TooLong {
        /// Positions held plus the step's.
        wanted: usize,
        /// The limit.
        limit: usize,
    },
}

impl std::fmt::Display for SessionRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Full(n) => write!(f, "all {n} session slots are in use"),
            Self::Unknown(id) => write!(f, "unknown session {id} (closed or expired)"),
            Self::TooLong { wanted, limit } => {
                write!(
                    f,
                    "the session would hold {wanted} positions, over the limit of {limit}"
                )
            }
        }
    }
}

struct Entry<S> {
    state: S,
    tokens: usize,
    last_used: Instant,
}

/// Open sessions and their limits.
pub struct SessionTable<S> {
    limits: SessionLimits,
    sessions: HashMap<SessionId, Entry<S>>,
    /// Sessions taken out for a step, still counted against the limit.
    busy: usize,
    next_id: SessionId,
}

impl<S> SessionTable<S> {
    /// An empty table; session ids start from a random point so they are not guessable in order.
    pub fn new(limits: SessionLimits) -> Self {
        Self {
            limits,
            sessions: HashMap::new(),
            busy: 0,
            next_id: rand::random::<u32>() as SessionId,
        }
    }

    /// Sessions open now, including those running a step.
    pub fn len(&self) -> usize {
        self.sessions.len() + self.busy
    }

    /// Whether no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Opens a session holding `state`.
    pub fn open(&mut self, state: S, now: Instant) -> Result<SessionId, SessionRefusal> {
        if self.len() >= self.limits.max_sessions {
            return Err(SessionRefusal::Full(self.limits.max_sessions));
        }
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        self.sessions.insert(
            id,
            Entry {
                state,
                tokens: 0,
                last_used: now,
            },
        );
        Ok(id)
    }

    /// Takes a session out to run a step of `tokens` positions; [`put_back`](Self::put_back)
    /// returns it. Taking it out lets the step run on another thread while the table serves
    /// other requests.
    pub fn take(&mut self, id: SessionId, tokens: usize) -> Result<(S, usize), SessionRefusal> {
        let entry = self.sessions.get(&id).ok_or(SessionRefusal::Unknown(id))?;
        let wanted = entry.tokens + tokens;
        if wanted > self.limits.max_tokens {
            return Err(SessionRefusal::TooLong {
                wanted,
                limit: self.limits.max_tokens,
            });
        }
        let entry = self
            .sessions
            .remove(&id)
            .ok_or(SessionRefusal::Unknown(id))?;
        self.busy += 1;
        Ok((entry.state, entry.tokens))
    }

    /// Drops a session taken out by a step that failed: its state may be half-updated.
    pub fn discard(&mut self) {
        self.busy = self.busy.saturating_sub(1);
    }

    /// Returns a session after a step that left it holding `tokens` positions.
    pub fn put_back(&mut self, id: SessionId, state: S, tokens: usize, now: Instant) {
        self.busy = self.busy.saturating_sub(1);
        self.sessions.insert(
            id,
            Entry {
                state,
                tokens,
                last_used: now,
            },
        );
    }

    /// Frees a session, handing back what it held (none if it did not exist).
    pub fn close(&mut self, id: SessionId) -> Option<S> {
        self.sessions.remove(&id).map(|e| e.state)
    }

    /// Frees sessions idle past the timeout, handing back what they held.
    pub fn expire(&mut self, now: Instant) -> Vec<S> {
        let timeout = self.limits.idle_timeout;
        let idle: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, e)| now.saturating_duration_since(e.last_used) >= timeout)
            .map(|(id, _)| *id)
            .collect();
        idle.iter().filter_map(|id| self.close(*id)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> SessionLimits {
        SessionLimits {
            max_sessions: 2,
            max_tokens: 10,
            idle_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn sessions_are_bounded_in_number_and_length() {
        let now = Instant::now();
        let mut table = SessionTable::new(limits());
        let a = table.open("a", now).unwrap();
        let b = table.open("b", now).unwrap();
        assert_ne!(a, b);
        assert_eq!(table.open("c", now), Err(SessionRefusal::Full(2)));

        let (state, held) = table.take(a, 6).unwrap();
        assert_eq!((state, held), ("a", 0));
        // Still counted while it runs.
        assert_eq!(table.open("c", now), Err(SessionRefusal::Full(2)));
        table.put_back(a, state, 6, now);
        assert_eq!(
            table.take(a, 5).map(|_| ()),
            Err(SessionRefusal::TooLong {
                wanted: 11,
                limit: 10
            })
        );
        // A refused step leaves the session in place; a failed one drops it.
        assert!(table.take(a, 4).is_ok());
        table.discard();
        assert_eq!(table.len(), 1);
        assert!(table.close(b).is_some());
        assert!(table.close(b).is_none());
        assert_eq!(
            table.take(b, 1).map(|_| ()),
            Err(SessionRefusal::Unknown(b))
        );
    }

    #[test]
    fn idle_sessions_expire() {
        let start = Instant::now();
        let mut table = SessionTable::new(limits());
        let a = table.open(1, start).unwrap();
        let b = table.open(2, start).unwrap();
        let (s, n) = table.take(b, 1).unwrap();
        table.put_back(b, s, n + 1, start + Duration::from_secs(4));
        assert_eq!(table.expire(start + Duration::from_secs(6)), vec![1]);
        assert!(table.take(a, 1).is_err());
        assert!(table.take(b, 1).is_ok());
    }
}
