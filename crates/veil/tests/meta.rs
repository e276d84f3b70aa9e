//! `veil meta` and `--accel`: the sweep records real runs, the selector is evaluated on the
//! committed dataset, forced methods give the plain method's answer, bad input is refused.

mod common;

use std::process::Command;

use common::{model_path, veil_bin};

fn veil() -> Command {
    Command::new(veil_bin())
}

fn run(args: &[&str]) -> String {
    let out = veil().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "veil {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn fails(args: &[&str]) -> String {
    let out = veil().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "veil {args:?} succeeded");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn a_quick_sweep_records_every_run_in_the_history_and_the_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let (out, history) = (dir.path().join("runs.jsonl"), dir.path().join("meta.redb"));
    let model = model_path();
    let args = [
        "meta",
        "collect",
        "--quick",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--history",
        history.to_str().unwrap(),
    ];
    run(&args);
    let records = veil_meta::read_jsonl(&out).unwrap();
    // A single short question (plain; batch and the prefix cache would be idle, so they are
    // not run), then two requests sharing a text (plain, batch, prefix+lookup); each short
    // run is repeated up to six times.
    assert!((4..=24).contains(&records.len()), "{records:?}");
    assert!(records.iter().all(|r| r.seconds > 0.0 && r.tokens > 0));
    for method in ["plain", "batch", "prefix+lookup"] {
        assert!(records.iter().any(|r| r.method == method), "{method}");
    }
    assert!(records
        .iter()
        .all(|r| r.method != "lookup" && r.method != "q8_0"));
    let first = records.len();
    // The history keeps every sweep: a second one adds to it.
    run(&args);
    let store = veil_meta::RecordStore::open(&history).unwrap();
    let second = veil_meta::read_jsonl(&out).unwrap().len();
    assert_eq!(store.all().unwrap().len(), first + second);
}

#[test]
fn the_selector_beats_the_baselines_on_the_committed_dataset() {
    let report = run(&["meta", "eval"]);
    let row = |name: &str| -> (f64, f64) {
        let line = report
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no {name} row in {report}"));
        let nums: Vec<f64> = line
            .split_whitespace()
            .filter_map(|w| w.trim_end_matches('%').parse().ok())
            .collect();
        (nums[nums.len() - 3], nums[nums.len() - 1])
    };
    // Veil's selector is the vote; each learner it is made of, and every baseline, alone.
    let (accuracy, regret) = row("veil (vote");
    assert!(accuracy >= 0.88, "accuracy {accuracy}: {report}");
    assert!(regret <= 5.0, "regret {regret}%: {report}");
    let (random_accuracy, _) = row("random choice");
    assert!(random_accuracy < accuracy);
    for baseline in [
        "cost model",
        "single best method",
        "gradient boosting",
        "kNN",
        "random forest",
    ] {
        assert!(row(baseline).0 <= accuracy, "{baseline}: {report}");
    }
}

#[test]
fn forced_methods_answer_like_the_plain_method_and_auto_says_what_it_chose() {
    let model = model_path();
    let model = model.to_str().unwrap();
    let answer = |accel: &str| {
        let out = veil()
            .args([
                "generate",
                "--model",
                model,
                "--max-tokens",
                "24",
                "--accel",
                accel,
                "--prompt",
                "Repeat exactly: the cat sat on the mat, the cat sat on the mat.",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (plain, _) = answer("plain");
    for accel in ["lookup", "chunked", "prefix+lookup"] {
        let (text, stderr) = answer(accel);
        assert_eq!(text, plain, "{accel}");
        assert!(
            stderr.contains(&format!("accel: {accel} (forced)")),
            "{stderr}"
        );
    }
    let (text, stderr) = answer("auto");
    assert_eq!(text, plain, "auto keeps the answer exact");
    assert!(
        stderr.contains("accel: ") && stderr.contains("auto"),
        "{stderr}"
    );
}

#[test]
fn bad_methods_and_datasets_are_clear_errors() {
    let err = fails(&["generate", "--prompt", "hi", "--accel", "warp-drive"]);
    assert!(err.contains("unknown acceleration method"), "{err}");
    let err = fails(&[
        "generate",
        "--prompt",
        "hi",
        "--accel",
        "lookup",
        "--bootstrap",
        "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq",
    ]);
    assert!(err.contains("local plaintext generation"), "{err}");
    let err = fails(&[
        "generate", "--prompt", "hi", "--accel", "q8_0", "--dtype", "f32",
    ]);
    assert!(err.contains("loaded as f32"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"not\": \"a record\"}\n").unwrap();
    let err = fails(&["meta", "eval", "--data", bad.to_str().unwrap()]);
    assert!(err.contains("line 1"), "{err}");
    let err = fails(&["meta", "eval", "--data", "/nonexistent/runs.jsonl"]);
    assert!(err.contains("/nonexistent/runs.jsonl"), "{err}");
    let err = fails(&["meta", "collect", "--quick", "--price=-1"]);
    assert!(err.contains("--price"), "{err}");
}
