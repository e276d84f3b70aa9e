//! The async runtime client commands run the network on, in one home so that commands do not
//! borrow it from each other.

use anyhow::{Context, Result};

/// The async runtime the network runs on; generation blocks on it from the main thread.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}
