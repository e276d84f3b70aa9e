//! How many of the pool's threads the products of one calling thread may use.
//!
//! candle's barrier pool is sized once per process, but verification must show that an answer
//! does not depend on how the work was split: its trials run the same model with its rows
//! dealt to one thread or to all of them, in one process.

use std::cell::Cell;
use std::sync::{Mutex, PoisonError};

thread_local! {
    /// The most threads this thread's products are split over (the pool's size by default).
    static LIMIT: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Runs `f` with the products and attention it calls split over at most `threads` threads of
/// the pool (1: all on the calling thread). Results are the same bits whatever the limit;
/// only the work's split changes.
pub fn with_thread_limit<R>(threads: usize, f: impl FnOnce() -> R) -> R {
    /// Puts the previous limit back, also when `f` panics.
    struct Restore(usize);
    impl Drop for Restore {
        fn drop(&mut self) {
            LIMIT.with(|limit| limit.set(self.0));
        }
    }
    let _restore = Restore(LIMIT.with(|limit| limit.replace(threads.max(1))));
    f()
}

/// Of `available` parts (the pool's workers and the caller), how many to use.
pub(crate) fn parts(available: usize) -> usize {
    available.min(LIMIT.with(Cell::get)).max(1)
}

/// Below this many values, elementwise work (norms, quantizing activations, the gated
/// activation) runs on the calling thread alone: handing it to the pool would cost more.
pub(crate) const SERIAL_VALUES: usize = 4096;

/// Into how many parts to cut `len` values of elementwise work: at least [`SERIAL_VALUES`]
/// each, at most one per thread this caller may use (1: do it on the calling thread).
pub(crate) fn part_count(len: usize) -> usize {
    let pool = candle_core::utils::barrier_pool();
    parts(pool.n_workers() + 1).min(len / SERIAL_VALUES).max(1)
}

/// Runs `work` on each of `parts` (at most one per thread of candle's barrier pool, as
/// [`part_count`] gives), the calling thread taking one of them. Each part carries its own
/// disjoint slices; the locks only hand them across threads.
pub(crate) fn run_parts<P: Send>(parts: Vec<P>, work: impl Fn(P) + Sync) {
    if parts.len() <= 1 {
        parts.into_iter().for_each(work);
        return;
    }
    let parts: Vec<Mutex<Option<P>>> = parts.into_iter().map(|p| Mutex::new(Some(p))).collect();
    candle_core::utils::barrier_pool().execute(|i| {
        let part = parts
            .get(i)
            .and_then(|p| p.lock().unwrap_or_else(PoisonError::into_inner).take());
        if let Some(part) = part {
            work(part);
        }
    });
}
