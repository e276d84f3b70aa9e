//! `veil tee`: verify TEE evidence offline against a policy, and obtain this machine's
//! evidence through configfs-tsm.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use veil_tee::{Evidence, EvidenceSource, Expectation, Freshness, Policy, MAX_EVIDENCE_BYTES};

/// `veil tee` subcommands.
#[derive(Subcommand, Debug)]
pub enum TeeCommand {
    /// Verify evidence (a quote, report or bundle) against a policy; prints the verdict and
    /// why, and exits non-zero when it is rejected.
    Verify(VerifyArgs),
    /// Obtain this machine's evidence (configfs-tsm), bound to the node identity in --state.
    Report(ReportArgs),
}

/// Arguments of `veil tee verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The evidence: a bundle from `veil tee report` or a node, or a bare quote or report.
    #[arg(long)]
    pub evidence: PathBuf,
    /// The policy (TOML): allowed measurements, debug, minimum TCB, maximum age.
    #[arg(long)]
    pub policy: PathBuf,
    /// Intel DCAP collateral (JSON) for a bare quote.
    #[arg(long)]
    pub collateral: Option<PathBuf>,
    /// The chip's VCEK (DER or PEM) for a bare SEV-SNP report.
    #[arg(long)]
    pub vcek: Option<PathBuf>,
    /// The peer id the evidence must be bound to.
    #[arg(long)]
    pub peer: Option<String>,
    /// The nonce (64 hex digits) the evidence must carry.
    #[arg(long)]
    pub nonce: Option<String>,
    /// Verify as of this time (Unix seconds) instead of now: collateral is only valid for a
    /// month, so published samples verify only as of their own dates.
    #[arg(long)]
    pub at: Option<u64>,
}

/// Arguments of `veil tee report`.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Where to write the evidence bundle (JSON).
    #[arg(long)]
    pub out: PathBuf,
    /// The node database whose identity the evidence names (default $VEIL_HOME/node.redb).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// The configfs-tsm report directory (default /sys/kernel/config/tsm/report).
    #[arg(long)]
    pub report_dir: Option<PathBuf>,
    /// Intel DCAP collateral (JSON) to bundle with the quote.
    #[arg(long)]
    pub collateral: Option<PathBuf>,
    /// The chip's VCEK (DER or PEM) to bundle with a SEV-SNP report.
    #[arg(long)]
    pub vcek: Option<PathBuf>,
}

/// Runs `veil tee`.
pub fn run(command: TeeCommand) -> Result<()> {
    match command {
        TeeCommand::Verify(args) => verify(args),
        TeeCommand::Report(args) => report(args),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads a file of at most [`MAX_EVIDENCE_BYTES`]: evidence, collateral and policies are small.
fn read_small(path: &Path, what: &str) -> Result<Vec<u8>> {
    crate::args::read_limited(path, what, MAX_EVIDENCE_BYTES as u64)
}

/// Reads a TEE policy file.
pub fn read_policy(path: &Path) -> Result<Policy> {
    let bytes = read_small(path, "policy")?;
    let text = String::from_utf8(bytes).context("the policy is not UTF-8 text")?;
    Policy::from_toml(&text).with_context(|| format!("in the policy {}", path.display()))
}

/// Where `veil node` gets its TEE evidence: the report directory given, or the kernel's when
/// this machine has one; none with `--no-tee` or on a machine without the interface.
pub fn evidence_source(
    no_tee: bool,
    report_dir: Option<&Path>,
    collateral: Option<&Path>,
    vcek: Option<&Path>,
) -> Result<Option<EvidenceSource>> {
    let default = Path::new(veil_tee::TSM_REPORT_DIR);
    let dir = match report_dir {
        _ if no_tee => None,
        Some(dir) => Some(dir.to_path_buf()),
        None => default.is_dir().then(|| default.to_path_buf()),
    };
    let Some(dir) = dir else {
        if collateral.is_some() || vcek.is_some() {
            bail!("--tee-collateral and --tee-vcek go with TEE evidence, and this node has none (no --tee-report-dir, no {})", default.display());
        }
        return Ok(None);
    };
    let collateral = collateral
        .map(|p| read_small(p, "collateral"))
        .transpose()?;
    let vcek = vcek.map(|p| read_small(p, "VCEK")).transpose()?;
    Ok(Some(EvidenceSource::new(
        dir,
        collateral.as_deref(),
        vcek.as_deref(),
    )?))
}

fn verify(args: VerifyArgs) -> Result<()> {
    let mut evidence = Evidence::read(&read_small(&args.evidence, "evidence")?)
        .with_context(|| format!("in {}", args.evidence.display()))?;
    if let Some(path) = &args.collateral {
        evidence.set_collateral(&read_small(path, "collateral")?)?;
    }
    if let Some(path) = &args.vcek {
        evidence.set_vcek(&read_small(path, "VCEK")?)?;
    }
    let policy = read_policy(&args.policy)?;
    let key = match &args.peer {
        Some(peer) => {
            let id: libp2p::PeerId = peer
                .parse()
                .with_context(|| format!("--peer {peer:?} is not a peer id"))?;
            Some(veil_net::public_key_of(&id).map_err(|e| anyhow::anyhow!("--peer {peer}: {e}"))?)
        }
        None => None,
    };
    let nonce = match &args.nonce {
        Some(hex_text) => {
            let bytes = hex::decode(hex_text).context("--nonce is not hex")?;
            Some(
                <[u8; 32]>::try_from(bytes.as_slice())
                    .ok()
                    .context("--nonce must be 64 hex digits")?,
            )
        }
        None => None,
    };
    let expect = Expectation {
        peer_key: key.as_deref(),
        nonce,
    };
    let verdict = veil_tee::verify(&evidence, &policy, &expect, args.at.unwrap_or_else(now))?;
    print!("{verdict}");
    if !verdict.accepted() {
        bail!("evidence rejected: {}", verdict.reasons().join("; "));
    }
    Ok(())
}

fn report(args: ReportArgs) -> Result<()> {
    let state = args
        .state
        .clone()
        .unwrap_or_else(|| veil_model::ModelStore::from_env().home().join("node.redb"));
    let key = veil_net::NodeState::open(&state)?.identity()?;
    let source = evidence_source(
        false,
        args.report_dir.as_deref(),
        args.collateral.as_deref(),
        args.vcek.as_deref(),
    )?
    .with_context(|| {
        format!(
            "this machine has no TEE report interface ({}); give --report-dir",
            veil_tee::TSM_REPORT_DIR
        )
    })?;
    let evidence = source.evidence(&key.public().encode_protobuf(), Freshness::Time(now()))?;
    std::fs::write(&args.out, evidence.to_json())
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    println!(
        "{} evidence for node {} written to {}",
        evidence.kind,
        key.public().to_peer_id(),
        args.out.display()
    );
    Ok(())
}
