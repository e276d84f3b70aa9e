//! One module per subcommand.

pub mod bench;
pub mod chat;
pub mod demo;
pub mod generate;
pub mod models;
