//! How many of the pool's threads the products of one calling thread may use.
//!
//! candle's barrier pool is sized once per process, but verification must show that an answer
//! does not depend on how the work was split: its trials run the same model with its rows
//! dealt to one thread or to all of them, in one process.

use std::cell::Cell;

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
