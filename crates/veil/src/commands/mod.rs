//! One module per subcommand.

pub mod bench;
pub mod bench_gateway;
pub mod bench_llama_cpp;
pub mod bench_meta;
pub mod bench_zk;
pub mod chat;
pub mod demo;
pub mod demo_verify;
pub mod ee;
pub mod generate;
pub mod meta;
pub mod models;
pub mod python_venv;
pub mod serve;
pub mod swarm;
pub mod tee;
pub mod verify;
pub mod zk;
