//! `veil zk`: zero-knowledge proofs that a committed private model produced an answer
//! (train, setup, prove, verify), commitments to served models, and challenges that make
//! nodes prove which weights they hold.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use libp2p::Multiaddr;
use veil_model::{GgufFile, LayerRange, LlamaConfig, Shard};
use veil_zk::WeightsCommitment;

use crate::commands::bench_zk::BenchArgs;
use crate::commands::json_file::{read_json, write_json};

/// `veil zk` subcommands.
#[derive(Subcommand, Debug)]
pub enum ZkCommand {
    /// Print the weights commitment (Merkle root over the tensors) of a model, or of the shards
    /// it is cut into.
    Commit(CommitArgs),
    /// Challenge every node serving a model to open random chunks of its weights; fails if a
    /// node's root is not the model's or its openings do not verify.
    Challenge(ChallengeArgs),
    /// Train the private models (an MLP and a CNN) on the digits and write them.
    Train(TrainArgs),
    /// Commit to a private model: writes its secret (weights, salt) and public (shape,
    /// commitment, key fingerprint) files and the proof system's parameters.
    Setup(SetupArgs),
    /// Prove the committed model's answer on one input.
    Prove(ProveArgs),
    /// Verify a proof against the published commitment (needs only the public files).
    Verify(VerifyArgs),
    /// Side by side with EZKL on the same models and inputs: proving and verifying time,
    /// proof size, peak memory (installs `ezkl` with pip into $VEIL_HOME/ezkl once).
    Bench(BenchArgs),
}

/// Arguments of `veil zk train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// The digits (CSV, gzipped).
    #[arg(long, default_value = "datasets/digits/digits.csv.gz")]
    pub data: PathBuf,
    /// Where to write mlp.json and cnn.json.
    #[arg(long, default_value = "models/zk")]
    pub out: PathBuf,
    /// Seed of the weights' initialisation.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

/// Arguments of `veil zk setup`.
#[derive(Args, Debug)]
pub struct SetupArgs {
    /// The trained model (JSON from `veil zk train`).
    #[arg(long)]
    pub model: PathBuf,
    /// Directory for secret.json, public.json and params.bin.
    #[arg(long)]
    pub out: PathBuf,
}

/// Arguments of `veil zk prove`.
#[derive(Args, Debug)]
pub struct ProveArgs {
    /// The directory `veil zk setup` wrote.
    #[arg(long)]
    pub setup: PathBuf,
    /// The input: a JSON file `{"input": [64 pixels of 0..16]}`.
    #[arg(long, conflicts_with = "digit")]
    pub input: Option<PathBuf>,
    /// Or: the Nth held-out test digit.
    #[arg(long)]
    pub digit: Option<usize>,
    /// The digits, for --digit.
    #[arg(long, default_value = "datasets/digits/digits.csv.gz")]
    pub data: PathBuf,
    /// Where to write the proof.
    #[arg(long)]
    pub out: PathBuf,
    /// Print the figures as one JSON line (for `veil zk bench`).
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `veil zk verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The published public.json.
    #[arg(long)]
    pub public: PathBuf,
    /// The proof system's parameters (params.bin).
    #[arg(long)]
    pub params: PathBuf,
    /// The proof.
    #[arg(long)]
    pub proof: PathBuf,
    /// Print the figures as one JSON line (for `veil zk bench`).
    #[arg(long)]
    pub json: bool,
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
        ZkCommand::Train(args) => train(args),
        ZkCommand::Setup(args) => setup(args),
        ZkCommand::Prove(args) => prove(args),
        ZkCommand::Verify(args) => verify(args),
        ZkCommand::Bench(args) => crate::commands::bench_zk::run(args),
    }
}

fn train(args: TrainArgs) -> Result<()> {
    use veil_zk::train::{fixed_accuracy, float_accuracy, train, Architecture};
    let digits = veil_zk::digits::read_digits(&args.data)?;
    let (train_set, test_set) = veil_zk::digits::split(&digits);
    for (arch, name) in [(Architecture::Mlp, "mlp"), (Architecture::Cnn, "cnn")] {
        let model = train(arch, &train_set, args.seed)?;
        let fixed = model.quantize()?;
        let path = args.out.join(format!("{name}.json"));
        write_json(&path, &model)?;
        println!(
            "{name}: {} weights; held-out accuracy {:.3} in float, {:.3} in fixed point ({} digits); written to {}",
            fixed.weights.len(),
            float_accuracy(&model, &test_set),
            fixed_accuracy(&fixed, &test_set),
            test_set.len(),
            path.display()
        );
    }
    Ok(())
}

fn setup(args: SetupArgs) -> Result<()> {
    let model: veil_zk::model::FloatModel = read_json(&args.model, "model")?;
    let fixed = model.quantize()?;
    let params = veil_zk::proof::parameters();
    let secret = veil_zk::proof::SecretModel::new(&fixed);
    let public = secret.public(&params)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    crate::commands::write_secret(
        &args.out.join("secret.json"),
        serde_json::to_string_pretty(&secret)?.as_bytes(),
    )?;
    write_json(&args.out.join("public.json"), &public)?;
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(args.out.join("params.bin")).context("cannot write params.bin")?,
    );
    params.write(&mut file).context("cannot write params.bin")?;
    println!("commitment {}", public.commitment);
    println!(
        "wrote {0}/public.json and {0}/params.bin (publish these) and {0}/secret.json (keep it: the weights and salt)",
        args.out.display()
    );
    Ok(())
}

fn read_params(
    path: &Path,
) -> Result<halo2_proofs::poly::commitment::Params<halo2_proofs::pasta::EqAffine>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    halo2_proofs::poly::commitment::Params::read(&mut std::io::BufReader::new(file))
        .with_context(|| format!("{} is not halo2 parameters", path.display()))
}

fn prove(args: ProveArgs) -> Result<()> {
    let secret: veil_zk::proof::SecretModel =
        read_json(&args.setup.join("secret.json"), "secret model")?;
    let (model, salt) = secret.open()?;
    let pixels: Vec<u8> = match (&args.input, args.digit) {
        (Some(path), _) => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Input {
                input: Vec<u8>,
            }
            read_json::<Input>(path, "input")?.input
        }
        (None, Some(n)) => {
            let digits = veil_zk::digits::read_digits(&args.data)?;
            let (_, test) = veil_zk::digits::split(&digits);
            test.get(n)
                .with_context(|| format!("--digit {n}: there are {} held-out digits", test.len()))?
                .pixels
                .clone()
        }
        (None, None) => bail!("give --input FILE or --digit N"),
    };
    let params = read_params(&args.setup.join("params.bin"))?;
    let started = std::time::Instant::now();
    let pk = veil_zk::proof::proving_key(&params, &secret.shape)?;
    let keys = started.elapsed();
    let started = std::time::Instant::now();
    let proof = veil_zk::proof::prove(&params, &pk, &model, salt, &pixels)?;
    let proving = started.elapsed();
    write_json(&args.out, &proof)?;
    let peak_mib = crate::commands::measure::peak_memory().unwrap_or(0) >> 20;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "prove_s": proving.as_secs_f64(),
                "keys_s": keys.as_secs_f64(),
                "proof_bytes": proof.proof.len() / 2,
                "peak_mib": peak_mib,
            })
        );
        return Ok(());
    }
    println!(
        "digit {}: proved in {:.2} s (keys {:.2} s), proof {} bytes, peak memory {} MiB; written to {}",
        veil_zk::model::argmax(&proof.output),
        proving.as_secs_f64(),
        keys.as_secs_f64(),
        proof.proof.len() / 2,
        peak_mib,
        args.out.display()
    );
    Ok(())
}

/// The verifier of the committed private model whose public files are in `dir`.
pub fn open_verifier(dir: &Path) -> Result<veil_zk::proof::Verifier> {
    let public: veil_zk::proof::PublicModel = read_json(&dir.join("public.json"), "public model")?;
    let params = read_params(&dir.join("params.bin"))?;
    Ok(veil_zk::proof::Verifier::open(&public, params)?)
}

/// The prover of the committed private model set up in `dir` (secret.json, public.json,
/// params.bin).
pub fn open_prover(dir: &Path) -> Result<veil_zk::proof::Prover> {
    let secret: veil_zk::proof::SecretModel = read_json(&dir.join("secret.json"), "secret model")?;
    let public: veil_zk::proof::PublicModel = read_json(&dir.join("public.json"), "public model")?;
    let params = read_params(&dir.join("params.bin"))?;
    Ok(veil_zk::proof::Prover::open(&secret, &public, params)?)
}

fn verify(args: VerifyArgs) -> Result<()> {
    let public: veil_zk::proof::PublicModel = read_json(&args.public, "public model")?;
    let proof: veil_zk::proof::InferenceProof = read_json(&args.proof, "proof")?;
    let params = read_params(&args.params)?;
    let vk = public.verifying_key(&params)?;
    let trusted = veil_zk::proof::fp_from_hex(&public.commitment)?;
    let started = std::time::Instant::now();
    veil_zk::proof::verify(&params, &vk, &trusted, &proof)?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "verify_s": started.elapsed().as_secs_f64() })
        );
        return Ok(());
    }
    println!(
        "verified in {:.3} s: the committed model labels this input {} (logits {:?})",
        started.elapsed().as_secs_f64(),
        veil_zk::model::argmax(&proof.output),
        proof.output
    );
    Ok(())
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
    let runtime = crate::commands::network_runtime::runtime()?;
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
