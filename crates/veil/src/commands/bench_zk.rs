//! `veil zk bench`: Veil's prover and EZKL side by side on the same private models and input.
//!
//! Both engines prove that the committed (hashed) weights map the public input to the public
//! output. Each proof runs in a fresh child process (Veil: `veil zk prove`; EZKL: its prove
//! step), so peak memory is the prover's own; medians over `--runs`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::Value;

use crate::commands::json_file::write_json;
use crate::commands::measure::median;
use crate::commands::python_venv::{venv_python, VenvSpec};

/// Arguments of `veil zk bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The models to measure.
    #[arg(long, value_delimiter = ',', default_values = ["models/zk/mlp.json", "models/zk/cnn.json"])]
    pub models: Vec<PathBuf>,
    /// Proofs per engine and model (medians are reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub runs: u32,
    /// The held-out digit to prove.
    #[arg(long, default_value_t = 0)]
    pub digit: usize,
    /// EZKL's fixed-point scale (bits): 6 matches Veil's activations.
    #[arg(long, default_value_t = 6)]
    pub ezkl_scale: u32,
    /// EZKL's circuit size 2^K (16 is the least its hashed weights fit in).
    #[arg(long, default_value_t = 16)]
    pub ezkl_logrows: u32,
    /// EZKL's lookup range, ±this (Veil's activation tables cover ±1024 at scale 2^6).
    #[arg(long, default_value_t = 1024)]
    pub ezkl_lookup: i64,
    /// The digits.
    #[arg(long, default_value = "datasets/digits/digits.csv.gz")]
    pub data: PathBuf,
}

/// The EZKL release measured against.
const EZKL: &str = "ezkl==23.0.5";
/// The script that runs EZKL's pipeline.
const SCRIPT: &str = include_str!("ezkl_bench.py");

/// One engine's figures on one model.
struct Figures {
    prove_s: f64,
    verify_s: f64,
    proof_bytes: u64,
    peak_mib: u64,
    rows_log2: u32,
}

/// Runs `veil` with `args` and reads the JSON line it prints.
fn veil_json(args: &[&str]) -> Result<Value> {
    let exe = std::env::current_exe().context("cannot find the veil binary")?;
    let out = Command::new(exe)
        .args(args)
        .output()
        .context("cannot run veil")?;
    if !out.status.success() {
        bail!(
            "veil {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .with_context(|| format!("unexpected output of veil {}: {stdout:?}", args.join(" ")))
}

fn veil_figures(model: &Path, dir: &Path, digit: usize, data: &Path, runs: u32) -> Result<Figures> {
    let setup = dir.join("veil");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let exe = std::env::current_exe().context("cannot find the veil binary")?;
    let out = Command::new(exe)
        .args(["zk", "setup", "--model", &s(model), "--out", &s(&setup)])
        .output()?;
    if !out.status.success() {
        bail!(
            "veil zk setup: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let proof = setup.join("proof.json");
    let (mut prove, mut verify, mut peak, mut bytes) = (Vec::new(), Vec::new(), 0, 0);
    for _ in 0..runs {
        let p = veil_json(&[
            "zk",
            "prove",
            "--json",
            "--setup",
            &s(&setup),
            "--digit",
            &digit.to_string(),
            "--data",
            &s(data),
            "--out",
            &s(&proof),
        ])?;
        prove.push(p["prove_s"].as_f64().unwrap_or(f64::NAN));
        peak = peak.max(p["peak_mib"].as_u64().unwrap_or(0));
        bytes = p["proof_bytes"].as_u64().unwrap_or(0);
        let v = veil_json(&[
            "zk",
            "verify",
            "--json",
            "--public",
            &s(&setup.join("public.json")),
            "--params",
            &s(&setup.join("params.bin")),
            "--proof",
            &s(&proof),
        ])?;
        verify.push(v["verify_s"].as_f64().unwrap_or(f64::NAN));
    }
    Ok(Figures {
        prove_s: median(&mut prove),
        verify_s: median(&mut verify),
        proof_bytes: bytes,
        peak_mib: peak,
        rows_log2: veil_zk::circuit::K,
    })
}

fn ezkl_figures(
    python: &Path,
    model: &Path,
    pixels: &[u8],
    dir: &Path,
    args: &BenchArgs,
) -> Result<Figures> {
    let script = dir.join("ezkl_bench.py");
    std::fs::write(&script, SCRIPT).context("cannot write the EZKL script")?;
    let input = dir.join("input.json");
    let floats: Vec<f64> = pixels.iter().map(|&p| p as f64 / 16.0).collect();
    write_json(&input, &serde_json::json!({ "input": floats }))?;
    let work = dir.join("ezkl");
    let out = Command::new(python)
        .arg(&script)
        .args([
            "--model",
            &model.to_string_lossy(),
            "--input",
            &input.to_string_lossy(),
        ])
        .args(["--workdir", &work.to_string_lossy()])
        .args([
            "--scale",
            &args.ezkl_scale.to_string(),
            "--logrows",
            &args.ezkl_logrows.to_string(),
        ])
        .args([
            "--lookup-range",
            &(-args.ezkl_lookup).to_string(),
            &args.ezkl_lookup.to_string(),
        ])
        .args(["--runs", &args.runs.to_string()])
        .output()
        .context("cannot run the EZKL script")?;
    // EZKL's proving key is hundreds of megabytes: do not leave it behind.
    let _ = std::fs::remove_dir_all(&work);
    if !out.status.success() {
        bail!(
            "EZKL failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .with_context(|| format!("unexpected EZKL output {stdout:?}"))?;
    Ok(Figures {
        prove_s: v["prove_s"].as_f64().unwrap_or(f64::NAN),
        verify_s: v["verify_s"].as_f64().unwrap_or(f64::NAN),
        proof_bytes: v["proof_bytes"].as_u64().unwrap_or(0),
        peak_mib: v["prove_peak_rss_mib"].as_f64().unwrap_or(0.0) as u64,
        rows_log2: v["logrows"].as_u64().unwrap_or(0) as u32,
    })
}

/// Runs the comparison and prints the table and ratios.
pub fn run(args: BenchArgs) -> Result<()> {
    let home = veil_model::ModelStore::from_env().home().to_path_buf();
    let python = venv_python(
        &home,
        &VenvSpec {
            name: "ezkl",
            packages: &[EZKL, "onnx"],
            imports: "ezkl, onnx",
            env: Vec::new(),
            note: "prebuilt wheels, a minute or two, once",
        },
    )?;
    let digits = veil_zk::digits::read_digits(&args.data)?;
    let (_, test) = veil_zk::digits::split(&digits);
    let pixels = test
        .get(args.digit)
        .with_context(|| {
            format!(
                "--digit {}: there are {} held-out digits",
                args.digit,
                test.len()
            )
        })?
        .pixels
        .clone();
    println!(
        "EZKL: scale 2^{}, lookup range ±{}, 2^{} rows, weights hashed; both: public input and output, {} run(s), medians",
        args.ezkl_scale, args.ezkl_lookup, args.ezkl_logrows, args.runs
    );
    println!("| model | engine | rows | prove s | verify s | proof bytes | peak MiB |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for model in &args.models {
        let name = model
            .file_stem()
            .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
        let dir = tempfile::tempdir().context("cannot make a scratch directory")?;
        let veil = veil_figures(model, dir.path(), args.digit, &args.data, args.runs)?;
        let ezkl = ezkl_figures(&python, model, &pixels, dir.path(), &args)?;
        for (engine, f) in [("veil", &veil), ("ezkl", &ezkl)] {
            println!(
                "| {name} | {engine} | 2^{} | {:.2} | {:.3} | {} | {} |",
                f.rows_log2, f.prove_s, f.verify_s, f.proof_bytes, f.peak_mib
            );
        }
        println!(
            "{name}: Veil proves in {:.2}× EZKL's time (target ≤ 0.5), verifies in {:.2}×, proof {:.2}× the size, {:.2}× the memory",
            veil.prove_s / ezkl.prove_s,
            veil.verify_s / ezkl.verify_s,
            veil.proof_bytes as f64 / ezkl.proof_bytes.max(1) as f64,
            veil.peak_mib as f64 / ezkl.peak_mib.max(1) as f64
        );
    }
    Ok(())
}
