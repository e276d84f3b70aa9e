//! `veil demo`: the whole pipeline on loopback. Fetch the model, encrypt it under a fresh key,
//! cut the encrypted model into shards, start a swarm of `veil node` processes (a bootstrap node
//! serving blocks 0-10, two replicas of 10-20, one node for 20-30), answer a prompt through it,
//! print the route and what the nodes saw, and stop everything; then show a committee of nodes
//! serving the same encrypted model verifying an answer and catching a lying node
//! (`demo_verify`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use veil_ee::{
    encrypt_model, encrypt_tokens, model_digest, natural_kind, EeKey, EncryptedStep, KeyKind,
};
use veil_model::{
    generate, ChatMessage, GenerationParams, GgufFile, LlamaConfig, LocalModel, Shard, ShardModel,
    WeightFormat,
};

use crate::args::ModelArgs;
use crate::commands::demo_nodes::{retry, NodeChild};
use crate::commands::generate::{print_stats, StdoutStream};
use crate::commands::measure::median;
use crate::commands::network_runtime::runtime;
use crate::commands::swarm::{open_chain, route_lines, SwarmArgs};
use crate::progress;

/// Arguments of `veil demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// The question to answer.
    #[arg(long, default_value = "Name the capital city of France.")]
    pub prompt: String,

    /// The most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,

    /// Also measure decode speed of the swarm against one process, side by side.
    #[arg(long)]
    pub bench: bool,
}

/// Runs `veil demo`.
pub fn run(args: DemoArgs) -> Result<()> {
    let base_args = ModelArgs {
        model: None,
        dtype: WeightFormat::AsStored,
        layers: Vec::new(),
        threads: None,
        kernels: veil_model::Kernels::default(),
    };
    let base = base_args.resolve_path()?;
    let home = veil_model::ModelStore::from_env().home().to_path_buf();
    let work = tempfile::Builder::new()
        .prefix("demo-")
        .tempdir_in(&home)
        .with_context(|| format!("cannot make a work directory in {}", home.display()))?;
    eprintln!("veil demo: a private swarm on loopback answers one prompt.\n");

    // 1. The key holder: a fresh key, the encrypted model, shards of it for the nodes.
    let started = Instant::now();
    let gguf = GgufFile::open(&base)?;
    let config = LlamaConfig::from_gguf(&gguf)?;
    // A group-local key for the quantized file: the encrypted model stays Q4_1 and gives the
    // plaintext model's bits, so a committee can verify it with exact commitments.
    let kind = natural_kind(&gguf);
    let digest = model_digest(&base)?;
    let key = EeKey::generate_of_kind(&config, &digest, kind);
    let stored = if kind == KeyKind::GroupLocal {
        WeightFormat::AsStored
    } else {
        WeightFormat::F32
    };
    let encrypted = work.path().join("encrypted.gguf");
    let spinner = progress::spinner("encrypting the model under a fresh key".into());
    encrypt_model(&base, &key, &encrypted)?;
    let plan = Shard::tiling(&[0..10, 10..20, 20..30], config.block_count)?;
    let shard_dir = work.path().join("shards");
    let manifests = veil_model::write_shard_files(&encrypted, &plan, &shard_dir, &mut |_, _| {})?;
    spinner.finish_and_clear();
    eprintln!(
        "1. encrypted the model under a fresh {kind} key ({}) and cut it into {} shards in {:.1} s",
        if kind == KeyKind::GroupLocal {
            "kept in its stored formats"
        } else {
            "written in F32"
        },
        manifests.len(),
        started.elapsed().as_secs_f64()
    );

    // 2. The swarm: separate processes, joined through the first.
    let file = |i: usize| shard_dir.join(&manifests[i].file);
    let state = |name: &str| work.path().join(format!("{name}.redb"));
    let mut nodes = vec![NodeChild::start(&file(0), "0-10", &state("boot"), None)?];
    let boot = nodes[0].addr.clone();
    for (i, blocks, name) in [(1, "10-20", "a"), (1, "10-20", "b"), (2, "20-30", "c")] {
        nodes.push(NodeChild::start(
            &file(i),
            blocks,
            &state(name),
            Some(&boot),
        )?);
    }
    eprintln!("2. started {} node processes:", nodes.len());
    for n in &nodes {
        eprintln!("   blocks {:<5} {}", n.blocks, n.addr);
    }

    // 3. The client: finds a route, sends encrypted ids, decrypts the answer.
    let text = LocalModel::open_text(&base)?;
    let prompt = text.chat_prompt(&[ChatMessage::user(args.prompt.clone())])?;
    let swarm = SwarmArgs {
        bootstrap: vec![boot.parse()?],
        client_layers: None,
        weights_openings: veil_net::DEFAULT_OPENINGS as u16,
        allow_nodes: None,
        p2p_listen: Vec::new(),
    };
    let rt = runtime()?;
    let mut chain = retry(|| open_chain(&rt, &swarm, &encrypted, stored, &Default::default()))?;
    let params = GenerationParams {
        max_tokens: args.max_tokens,
        ..GenerationParams::default()
    };
    eprintln!("3. prompt {:?} ({} tokens)", args.prompt, prompt.len());
    let shown: Vec<u32> = prompt.iter().take(6).copied().collect();
    eprintln!(
        "   the nodes see ids {:?}... where the key holder sees {:?}...",
        encrypt_tokens(&key, &shown),
        shown
    );
    eprint!("   answer: ");
    let mut out = StdoutStream::default();
    let completion = generate(
        &mut EncryptedStep::new(&key, &mut chain),
        &text.tokenizer,
        &prompt,
        config.context_length,
        &params,
        &mut |t| out.write(t),
    )?;
    out.finish()?;
    print_stats(&completion);
    eprintln!("4. route:");
    for line in route_lines(&veil_serve::backend::Route::of_chain(&chain)) {
        eprintln!("   {line}");
    }
    if args.bench {
        // A prompt with a long answer, so decode speed is measured over many tokens.
        let long = text.chat_prompt(&[ChatMessage::user(
            "Write a short story about a lighthouse keeper.",
        )])?;
        let params = GenerationParams {
            max_tokens: 96,
            ..GenerationParams::default()
        };
        bench(
            &rt, &swarm, &encrypted, stored, &key, &text, &long, &params, &mut chain,
        )?;
    }
    chain.close();
    drop(nodes);
    eprintln!("5. stopped the nodes");
    let encrypted_model = crate::commands::demo_verify::EncryptedModel {
        file: &encrypted,
        key: &key,
    };
    crate::commands::demo_verify::run(
        work.path(),
        &base,
        &encrypted_model,
        &text,
        &args.prompt,
        args.bench,
    )?;
    eprintln!("   removed {}", work.path().display());
    Ok(())
}

/// Decode speed through the swarm against the same encrypted model in this process, runs
/// alternating, medians; and the bytes each hop is sent per generated token.
#[allow(clippy::too_many_arguments)]
fn bench(
    rt: &tokio::runtime::Runtime,
    swarm: &SwarmArgs,
    encrypted: &PathBuf,
    format: WeightFormat,
    key: &EeKey,
    text: &LocalModel,
    prompt: &[u32],
    params: &GenerationParams,
    first: &mut veil_net::RemoteChain,
) -> Result<()> {
    let shards = vec![ShardModel::load(
        &mut GgufFile::open(encrypted)?,
        &Shard::whole(text.config.block_count),
        format,
    )?];
    // Decode tokens/s of one greedy run of `prompt` on `session`.
    let decode_rate = |session: &mut dyn veil_model::TokenStep| -> Result<f64> {
        let c = generate(
            session,
            &text.tokenizer,
            prompt,
            text.config.context_length,
            params,
            &mut |_| {},
        )?;
        Ok(c.tokens.len().saturating_sub(1) as f64 / c.decode_time.as_secs_f64().max(1e-9))
    };
    let mut local = Vec::new();
    let mut remote = Vec::new();
    for _ in 0..3 {
        local.push(decode_rate(&mut veil_ee::EncryptedSession::new(
            key, &shards,
        ))?);
        let mut chain = open_chain(rt, swarm, encrypted, format, &Default::default())?;
        remote.push(decode_rate(&mut EncryptedStep::new(key, &mut chain))?);
        chain.close();
    }
    let (l, r) = (median(&mut local), median(&mut remote));
    eprintln!("bench: decode {r:.1} tok/s through 3 node processes vs {l:.1} tok/s in one process: ratio {:.2} (median of 3)", r / l);
    for (node, stats) in first.route() {
        eprintln!(
            "bench: blocks {}-{}: {} bytes sent to the node and {} back per generated token",
            node.info.first_block,
            node.info.end_block,
            stats.decode_bytes_sent / stats.decode_steps.max(1) as u64,
            stats.decode_bytes_received / stats.decode_steps.max(1) as u64
        );
    }
    Ok(())
}
