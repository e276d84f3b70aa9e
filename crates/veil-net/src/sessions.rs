//! The sessions a node holds: bounded in number and length, overall and per peer, each owned by
//! the peer that opened it, freed when closed or idle.
//!
//! Pure bookkeeping, generic over what a session stores (a KV cache in the node), so the limits
//! are tested without a model. A session asked for by any peer but its owner is answered as
//! unknown: a stranger learns nothing, not even that it exists.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

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
    /// Sessions one peer may hold at once, so no peer can take every slot.
    pub max_sessions_per_peer: usize,
    /// Positions one peer's sessions may hold together.
    pub max_tokens_per_peer: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            max_sessions: 16,
            max_tokens: 8192,
            idle_timeout: Duration::from_secs(120),
            max_sessions_per_peer: 4,
            max_tokens_per_peer: 16384,
        }
    }
}

/// Why a session could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionRefusal {
    /// All session slots are taken.
    Full(usize),
    /// This peer holds as many sessions as one peer may.
    PeerSessions(usize),
    /// No such session for this peer (never opened, closed, expired, or another peer's).
    Unknown(SessionId),
    /// The session is running a step; the next waits for it.
    Running(SessionId),
    /// The step would take the session past its token limit.
    TooLong {
        /// Positions held plus the step's.
        wanted: usize,
        /// The limit.
        limit: usize,
    },
    /// The step would take this peer's sessions past their joint token limit.
    PeerTokens {
        /// Positions the peer's sessions would hold.
        wanted: usize,
        /// The limit.
        limit: usize,
    },
}

impl std::fmt::Display for SessionRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Full(n) => write!(f, "all {n} session slots are in use"),
            Self::PeerSessions(n) => {
                write!(f, "you hold {n} sessions, the most one peer may: close one")
            }
            Self::Unknown(id) => write!(f, "unknown session {id} (closed or expired)"),
            Self::Running(id) => write!(f, "session {id} is running a step; wait for its answer"),
            Self::TooLong { wanted, limit } => {
                write!(
                    f,
                    "the session would hold {wanted} positions, over the limit of {limit}"
                )
            }
            Self::PeerTokens { wanted, limit } => write!(
                f,
                "your sessions would hold {wanted} positions, over the limit of {limit} per peer"
            ),
        }
    }
}

struct Entry<S> {
    owner: PeerId,
    /// `None` while a step runs on another thread.
    state: Option<S>,
    tokens: usize,
    last_used: Instant,
}

/// Open sessions and their limits.
pub struct SessionTable<S> {
    limits: SessionLimits,
    sessions: HashMap<SessionId, Entry<S>>,
}

impl<S> SessionTable<S> {
    /// An empty table.
    pub fn new(limits: SessionLimits) -> Self {
        Self {
            limits,
            sessions: HashMap::new(),
        }
    }

    /// Sessions open now, including those running a step.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn owned_by(&self, owner: PeerId) -> impl Iterator<Item = &Entry<S>> {
        self.sessions.values().filter(move |e| e.owner == owner)
    }

    /// Opens a session for `owner` holding `state`, under a fresh random id.
    pub fn open(
        &mut self,
        owner: PeerId,
        state: S,
        now: Instant,
    ) -> Result<SessionId, SessionRefusal> {
        if self.len() >= self.limits.max_sessions {
            return Err(SessionRefusal::Full(self.limits.max_sessions));
        }
        if self.owned_by(owner).count() >= self.limits.max_sessions_per_peer {
            return Err(SessionRefusal::PeerSessions(
                self.limits.max_sessions_per_peer,
            ));
        }
        let id = loop {
            let id = SessionId::random();
            if !self.sessions.contains_key(&id) {
                break id;
            }
        };
        self.sessions.insert(
            id,
            Entry {
                owner,
                state: Some(state),
                tokens: 0,
                last_used: now,
            },
        );
        Ok(id)
    }

    /// Takes `owner`'s session out to run a step of `tokens` positions;
    /// [`put_back`](Self::put_back) returns it. Taking it out lets the step run on another
    /// thread while the table serves other requests; it still counts against every limit.
    pub fn take(
        &mut self,
        owner: PeerId,
        id: SessionId,
        tokens: usize,
    ) -> Result<(S, usize), SessionRefusal> {
        let held_by_owner: usize = self.owned_by(owner).map(|e| e.tokens).sum();
        let entry = self
            .sessions
            .get_mut(&id)
            .filter(|e| e.owner == owner)
            .ok_or(SessionRefusal::Unknown(id))?;
        let wanted = entry.tokens + tokens;
        if wanted > self.limits.max_tokens {
            return Err(SessionRefusal::TooLong {
                wanted,
                limit: self.limits.max_tokens,
            });
        }
        if held_by_owner + tokens > self.limits.max_tokens_per_peer {
            return Err(SessionRefusal::PeerTokens {
                wanted: held_by_owner + tokens,
                limit: self.limits.max_tokens_per_peer,
            });
        }
        let state = entry.state.take().ok_or(SessionRefusal::Running(id))?;
        Ok((state, entry.tokens))
    }

    /// Drops a session taken out by a step that failed (its state may be half-updated) or
    /// finished for good.
    pub fn discard(&mut self, id: SessionId) {
        self.sessions.remove(&id);
    }

    /// Returns a session after a step that left it holding `tokens` positions.
    pub fn put_back(&mut self, id: SessionId, state: S, tokens: usize, now: Instant) {
        if let Some(entry) = self.sessions.get_mut(&id) {
            entry.state = Some(state);
            entry.tokens = tokens;
            entry.last_used = now;
        }
    }

    /// Frees `owner`'s session, handing back what it held (none if it did not exist, is
    /// another peer's, or is running a step).
    pub fn close(&mut self, owner: PeerId, id: SessionId) -> Option<S> {
        let entry = self.sessions.get(&id)?;
        if entry.owner != owner || entry.state.is_none() {
            return None;
        }
        self.sessions.remove(&id).and_then(|e| e.state)
    }

    /// Frees sessions idle past the timeout (not those running a step), handing back what
    /// they held.
    pub fn expire(&mut self, now: Instant) -> Vec<S> {
        let timeout = self.limits.idle_timeout;
        let idle: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, e)| {
                e.state.is_some() && now.saturating_duration_since(e.last_used) >= timeout
            })
            .map(|(id, _)| *id)
            .collect();
        idle.iter()
            .filter_map(|id| self.sessions.remove(id).and_then(|e| e.state))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> SessionLimits {
        SessionLimits {
            max_sessions: 3,
            max_tokens: 10,
            idle_timeout: Duration::from_secs(5),
            max_sessions_per_peer: 2,
            max_tokens_per_peer: 15,
        }
    }

    #[test]
    fn sessions_are_bounded_in_number_and_length() {
        let now = Instant::now();
        let (me, you, third) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut table = SessionTable::new(limits());
        let a = table.open(me, "a", now).unwrap();
        let b = table.open(me, "b", now).unwrap();
        assert_ne!(a, b);
        assert_eq!(
            table.open(me, "c", now),
            Err(SessionRefusal::PeerSessions(2))
        );
        let c = table.open(you, "c", now).unwrap();
        assert_eq!(table.open(third, "d", now), Err(SessionRefusal::Full(3)));

        let (state, held) = table.take(me, a, 6).unwrap();
        assert_eq!((state, held), ("a", 0));
        // Still counted while it runs, and not to be stepped twice at once.
        assert_eq!(table.open(third, "d", now), Err(SessionRefusal::Full(3)));
        assert_eq!(table.take(me, a, 1), Err(SessionRefusal::Running(a)));
        assert_eq!(table.close(me, a), None);
        table.put_back(a, state, 6, now);
        assert_eq!(
            table.take(me, a, 5).map(|_| ()),
            Err(SessionRefusal::TooLong {
                wanted: 11,
                limit: 10
            })
        );
        // My two sessions together may hold 15 positions.
        let (s, n) = table.take(me, b, 8).unwrap();
        table.put_back(b, s, n + 8, now);
        assert_eq!(
            table.take(me, a, 2).map(|_| ()),
            Err(SessionRefusal::PeerTokens {
                wanted: 16,
                limit: 15
            })
        );
        // A failed step drops its session.
        assert!(table.take(me, a, 1).is_ok());
        table.discard(a);
        assert_eq!(table.len(), 2);
        assert!(table.close(you, c).is_some());
        assert!(table.close(you, c).is_none());
        assert_eq!(
            table.take(you, c, 1).map(|_| ()),
            Err(SessionRefusal::Unknown(c))
        );
    }

    #[test]
    fn a_session_answers_only_its_owner() {
        let now = Instant::now();
        let (victim, thief) = (PeerId::random(), PeerId::random());
        let mut table = SessionTable::new(limits());
        let id = table.open(victim, 1, now).unwrap();
        assert_eq!(
            table.take(thief, id, 1).map(|_| ()),
            Err(SessionRefusal::Unknown(id))
        );
        assert_eq!(table.close(thief, id), None);
        assert!(table.take(victim, id, 1).is_ok());
        // Ids are not a sequence: a second session's id says nothing about the first's.
        let other = table.open(thief, 2, now).unwrap();
        let as_number = |s: SessionId| u128::from_le_bytes(s.0);
        assert!(as_number(other).abs_diff(as_number(id)) > 1 << 64);
    }

    #[test]
    fn idle_sessions_expire() {
        let start = Instant::now();
        let me = PeerId::random();
        let mut table = SessionTable::new(limits());
        let a = table.open(me, 1, start).unwrap();
        let b = table.open(me, 2, start).unwrap();
        let (s, n) = table.take(me, b, 1).unwrap();
        table.put_back(b, s, n + 1, start + Duration::from_secs(4));
        assert_eq!(table.expire(start + Duration::from_secs(6)), vec![1]);
        assert!(table.take(me, a, 1).is_err());
        assert!(table.take(me, b, 1).is_ok());
    }
}
