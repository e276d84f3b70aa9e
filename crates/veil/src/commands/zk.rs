//! `veil zk`: commitments to models, and challenges that make nodes prove which weights they
//! hold.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use libp2p::Multiaddr;
use veil_model::{GgufFile, LayerRange, LlamaConfig, Shard};
use veil_zk::WeightsCommitment;

/// `veil zk` subcommands.
#[derive(Subcommand, Debug)]
pub enum ZkCommand {
    /// Print the weights commitment (Merkle root over the tensors) of a model, or of the shards
    /// it is cut into.
    Commit(CommitArgs),
    /// Challenge every node serving a model to open random chunks of its weights; fails if a
    /// node's root is not the model's or its openings do not verify.
    Challenge(ChallengeArgs),
}

/// Arguments of `veil zk commit`.
#[derive(Args, Debug)]
pub struct CommitArgs {
    /// The model file.
    #[arg(long)]
    pub model: PathBuf,
    /// Layer ranges to commit to separately, as `veil shard` cuts them (default: the whole
    /// model).
    #[arg(long, value_delimiter = ',')]
    pub ranges: Vec<LayerRange>,
}

/// Arguments of `veil zk challenge`.
#[derive(Args, Debug)]
pub struct ChallengeArgs {
    /// The model the nodes claim to serve (the verifier's own copy).
    #[arg(long)]
    pub model: PathBuf,
    /// A peer to join the swarm through.
    #[arg(long, required = true)]
    pub bootstrap: Vec<Multiaddr>,
    /// Random chunks each node must open.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=128))]
    pub openings: u32,
}

/// Runs `veil zk`.
pub fn run(command: ZkCommand) -> Result<()> {
    match command {
        ZkCommand::Commit(args) => commit(args),
        ZkCommand::Challenge(args) => challenge(args),
    }
}

fn describe(shard: &Shard) -> String {
    let mut text = format!("blocks {}-{}", shard.layers.start, shard.layers.end);
    if shard.embedding {
        text.push_str(" +embedding");
    }
    if shard.head {
        text.push_str(" +head");
    }
    text
}

fn commit(args: CommitArgs) -> Result<()> {
    let mut file = GgufFile::open(&args.model)?;
    let blocks = LlamaConfig::from_gguf(&file)?.block_count;
    let shards: Vec<Shard> = if args.ranges.is_empty() {
        vec![Shard::whole(blocks)]
    } else {
        args.ranges
            .iter()
            .map(|r| Shard::span(r.0.clone(), blocks))
            .collect::<veil_model::Result<_>>()?
    };
    for shard in shards {
        let commitment = WeightsCommitment::of_shard(&mut file, &shard)?;
        println!(
            "{}: root {} ({} leaves of {} KiB)",
            describe(&shard),
            commitment.root_hex(),
            commitment.leaf_count(),
            veil_zk::CHUNK_BYTES / 1024
        );
    }
    Ok(())
}

fn challenge(args: ChallengeArgs) -> Result<()> {
    let mut file = GgufFile::open(&args.model)?;
    let digest = veil_model::store::file_digest(&args.model)?.1;
    let runtime = crate::commands::swarm::runtime()?;
    let client = runtime
        .block_on(veil_net::SwarmClient::connect(
            &args.bootstrap,
            Duration::from_secs(60),
            Duration::from_secs(10),
        ))
        .context("cannot join the swarm")?;
    let nodes = runtime.block_on(client.discover(&digest))?;
    if nodes.is_empty() {
        bail!("no node serves {} yet", args.model.display());
    }
    let mut expected: HashMap<(usize, usize, bool, bool), [u8; 32]> = HashMap::new();
    let mut failed = 0;
    for node in &nodes {
        let shard = Shard {
            layers: node.info.first_block..node.info.end_block,
            embedding: node.info.embedding,
            head: node.info.head,
        };
        let key = (
            shard.layers.start,
            shard.layers.end,
            shard.embedding,
            shard.head,
        );
        let root = match expected.get(&key) {
            Some(root) => *root,
            None => {
                let root = WeightsCommitment::of_shard(&mut file, &shard)?.root();
                expected.insert(key, root);
                root
            }
        };
        let verdict = runtime.block_on(veil_net::challenge_weights(
            &client,
            node,
            &root,
            args.openings as usize,
        ));
        match verdict {
            Ok(opened) => println!(
                "node {} ({}): ok: root matches the model; {opened} random chunks opened and verified",
                node.peer,
                describe(&shard)
            ),
            Err(why) => {
                failed += 1;
                println!("node {} ({}): FAIL: {why}", node.peer, describe(&shard));
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} nodes failed the challenge", nodes.len());
    }
    Ok(())
}
