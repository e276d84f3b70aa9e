//! `veil bench --llama-cpp` against llama.cpp's own `llama-bench`: the table and the JSON carry
//! finite positive figures for every file. Never asserts on speed.
//!
//! Building llama.cpp takes about 5 minutes, so this runs only when its tools are already
//! there: `$VEIL_LLAMA_CPP` (a bin directory), or a finished build of
//! `shared/tools/build_llamacpp.sh` in its default directory; otherwise it says it skipped.

mod common;

use std::path::PathBuf;

use assert_cmd::Command;

/// Whether llama.cpp's tools are ready without building them.
fn llama_cpp_ready() -> bool {
    if let Some(dir) = std::env::var_os("VEIL_LLAMA_CPP") {
        return PathBuf::from(dir).join("llama-bench").is_file();
    }
    let Some(home) = std::env::var_os("HOME") else {
        return false;
    };
    let bin = PathBuf::from(home).join(".cache/llamacpp-ref/build/bin");
    // The build script's own test for a finished build.
    ["llama-bench", "llama-server", "llama-quantize"]
        .iter()
        .all(|tool| bin.join(tool).is_file())
}

fn positive(cell: &str, what: &str) -> f64 {
    let x: f64 = cell
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{what}: {cell:?} is not a number"));
    assert!(x.is_finite() && x > 0.0, "{what}: {x}");
    x
}

#[test]
fn the_benchmark_against_llama_bench_prints_both_engines_and_the_ratios() {
    if !llama_cpp_ready() {
        eprintln!(
            "skipped: llama.cpp's llama-bench is not built (set VEIL_LLAMA_CPP, or run \
             ../shared/tools/build_llamacpp.sh once)"
        );
        return;
    }
    let model = common::model_path();

    // The table: the model as stored and a llama-quantize Q8_0 copy of it.
    let out = Command::cargo_bin("veil")
        .unwrap()
        .args(["bench", "--llama-cpp", "--runs", "1", "--tokens", "8"])
        .args(["--threads", "1", "--quantize", "Q8_0", "--file"])
        .arg(&model)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("llama.cpp build"), "{stdout}");
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| file") && !l.starts_with("| ---"))
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    for row in &rows {
        assert_eq!(row.len(), 12, "{row:?}");
        assert_eq!(row[2], "37", "the chat prompt's tokens: {row:?}");
        for (i, cell) in row.iter().enumerate().skip(3) {
            positive(cell, &format!("column {i} of {row:?}"));
        }
    }
    assert!(
        rows[0][1].contains("Q4_1"),
        "the shipped file's types: {rows:?}"
    );
    assert!(rows[1][0].ends_with(".q8_0.gguf"), "{rows:?}");
    assert!(rows[1][1].starts_with("Q8_0"), "{rows:?}");

    // The JSON: one file.
    let out = Command::cargo_bin("veil")
        .unwrap()
        .args([
            "bench",
            "--llama-cpp",
            "--json",
            "--runs",
            "1",
            "--tokens",
            "4",
        ])
        .args(["--threads", "1", "--file"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["threads"], 1);
    // A build from a source tarball without git says build 0, commit "unknown".
    assert!(report["llama_cpp"]["build_number"].as_i64().is_some());
    let files = report["files"].as_array().unwrap();
    assert_eq!(files.len(), 1);
    let file = &files[0];
    assert_eq!(file["prompt_tokens"], 37);
    for engine in ["veil", "llama_cpp"] {
        for figure in [
            "prefill_tokens_per_second",
            "decode_tokens_per_second",
            "peak_memory_bytes",
        ] {
            let x = file[engine][figure].as_f64().unwrap();
            assert!(x.is_finite() && x > 0.0, "{engine} {figure}: {x}");
        }
    }
    for ratio in ["prefill_ratio", "decode_ratio", "peak_memory_ratio"] {
        let x = file[ratio].as_f64().unwrap();
        assert!(x.is_finite() && x > 0.0, "{ratio}: {x}");
    }
}
