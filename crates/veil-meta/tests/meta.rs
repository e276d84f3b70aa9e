//! The run database and the selector on synthetic data.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use veil_meta::{
    cases, evaluate, parse_jsonl, read_jsonl, write_jsonl, Chooser, CostModel, Features,
    HardwareFeatures, HeldOut, Learner, MetaError, ModelFeatures, RecordStore, RunRecord,
    SelectionRules, Selector, WorkloadFeatures,
};

fn features(
    model: &str,
    prompt: u32,
    output: u32,
    batch: u32,
    shared: f64,
    rewrite: bool,
) -> Features {
    Features {
        model: ModelFeatures {
            name: model.to_string(),
            parameters_m: if model == "small" { 135.0 } else { 360.0 },
            layers: if model == "small" { 30 } else { 32 },
            hidden: if model == "small" { 576 } else { 960 },
            stored_bits: 5.0,
        },
        hardware: HardwareFeatures {
            cores: 2,
            memory_gib: 24.0,
            avx2: true,
            avx512_vnni: true,
            price_per_hour: 1.0,
        },
        workload: WorkloadFeatures {
            prompt_tokens: prompt,
            output_tokens: output,
            batch,
            shared_prefix: shared,
            rewrite,
        },
    }
}

fn record(f: &Features, method: &str, seconds: f64) -> RunRecord {
    RunRecord {
        features: f.clone(),
        method: method.to_string(),
        seconds,
        tokens: 100,
        latency_ms: seconds * 1000.0,
        perplexity: 10.0,
        node: "test".into(),
        at_unix: 1,
    }
}

#[test]
fn records_go_in_and_come_back_out() {
    let dir = tempfile::tempdir().unwrap();
    let store = RecordStore::open(&dir.path().join("meta.redb")).unwrap();
    assert!(store.all().unwrap().is_empty());
    let f = features("small", 40, 16, 1, 0.0, false);
    let written = vec![record(&f, "plain", 2.0), record(&f, "batch", 1.5)];
    store.append(&written).unwrap();
    store.append(&written[..1]).unwrap();
    let read = store.all().unwrap();
    assert_eq!(read.len(), 3);
    assert_eq!(read[..2], written[..]);
    // Reopened, the history is still there.
    drop(store);
    let store = RecordStore::open(&dir.path().join("meta.redb")).unwrap();
    assert_eq!(store.all().unwrap().len(), 3);
    // JSON lines round trip.
    let file = dir.path().join("runs.jsonl");
    write_jsonl(&file, &read).unwrap();
    assert_eq!(read_jsonl(&file).unwrap(), read);
}

#[test]
fn bad_records_are_refused_with_the_line_that_broke() {
    let f = features("small", 40, 16, 1, 0.0, false);
    let good = serde_json::to_string(&record(&f, "plain", 2.0)).unwrap();
    let mut negative = record(&f, "plain", 2.0);
    negative.seconds = -1.0;
    let mut unknown = record(&f, "plain", 2.0);
    unknown.method = "warp-drive".into();
    let mut prefix = record(&f, "plain", 2.0);
    prefix.features.workload.shared_prefix = 1.5;
    for bad in [negative, unknown, prefix] {
        let text = format!("{good}\n{}\n", serde_json::to_string(&bad).unwrap());
        let err = parse_jsonl(text.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }
    let huge = format!("{{\"method\": \"{}\"}}", "x".repeat(20_000));
    assert!(matches!(
        RunRecord::from_json(huge.as_bytes()),
        Err(MetaError::BadRecord(_))
    ));
    assert!(parse_jsonl("not json\n".as_bytes()).is_err());
    let dir = tempfile::tempdir().unwrap();
    let store = RecordStore::open(&dir.path().join("meta.redb")).unwrap();
    let mut bad = record(&f, "plain", 2.0);
    bad.tokens = 0;
    assert!(store.append(&[record(&f, "plain", 1.0), bad]).is_err());
    assert!(
        store.all().unwrap().is_empty(),
        "a refused batch wrote nothing"
    );
}

/// A synthetic world where one method is clearly cheapest in each region: batching when
/// several requests arrive together, the prefix cache when prompts share most of their text,
/// prompt lookup for rewrites, and plain otherwise.
fn synthetic(rng: &mut ChaCha8Rng) -> Vec<RunRecord> {
    let mut out = Vec::new();
    for model in ["small", "large"] {
        for prompt in [32, 128, 512] {
            for output in [16, 64] {
                for batch in [1, 4] {
                    for shared in [0.0, 0.8] {
                        for rewrite in [false, true] {
                            let f = features(model, prompt, output, batch, shared, rewrite);
                            let base = if model == "small" { 1.0 } else { 2.5 };
                            let noise = |rng: &mut ChaCha8Rng| 1.0 + rng.random_range(-0.03..0.03);
                            let cost =
                                |speedup: f64, rng: &mut ChaCha8Rng| base / speedup * noise(rng);
                            let batch_gain = if batch > 1 { 2.5 } else { 0.95 };
                            let prefix_gain = if shared > 0.5 && batch == 1 {
                                1.8
                            } else {
                                0.97
                            };
                            let lookup_gain = if rewrite && batch == 1 && shared < 0.5 {
                                1.6
                            } else {
                                0.9
                            };
                            out.push(record(&f, "plain", cost(1.0, rng)));
                            out.push(record(&f, "batch", cost(batch_gain, rng)));
                            out.push(record(&f, "prefix", cost(prefix_gain, rng)));
                            out.push(record(&f, "lookup", cost(lookup_gain, rng)));
                        }
                    }
                }
            }
        }
    }
    out
}

#[test]
fn the_selector_picks_the_method_that_is_clearly_best_in_each_region() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let records = synthetic(&mut rng);
    let all = cases(&records, &SelectionRules::default());
    assert_eq!(all.len(), 96);
    let model = CostModel::fit(&all).unwrap();
    // Points between the training grid's: the region decides.
    let probe = |prompt, batch, shared, rewrite| {
        let f = features("small", prompt, 32, batch, shared, rewrite);
        model.choose(&f)
    };
    assert_eq!(probe(200, 4, 0.0, false), "batch");
    assert_eq!(probe(64, 1, 0.8, false), "prefix");
    assert_eq!(probe(300, 1, 0.0, true), "lookup");
    assert_eq!(probe(100, 1, 0.0, false), "plain");
    // As `--accel auto` uses it, with its ranking.
    let selector = Selector::fit(&all).unwrap();
    for (prompt, batch, shared, rewrite, want) in [
        (200, 4, 0.0, false, "batch"),
        (64, 1, 0.8, false, "prefix"),
        (300, 1, 0.0, true, "lookup"),
    ] {
        let f = features("small", prompt, 32, batch, shared, rewrite);
        assert_eq!(selector.choose(&f), want);
        assert_eq!(selector.rank(&f)[0], want);
    }
    // Held-out workloads and models: the selector (the vote) finds the best method nearly always.
    for held_out in [HeldOut::Workloads, HeldOut::Models] {
        let scores = evaluate(&all, held_out).unwrap();
        let veil = scores
            .iter()
            .find(|s| s.name == Learner::Vote.name())
            .unwrap();
        assert!(veil.accuracy >= 0.9, "{held_out:?}: {scores:?}");
        let random = scores.iter().find(|s| s.name == "random choice").unwrap();
        assert!(random.accuracy < 0.5 && random.mean_regret > veil.mean_regret);
        assert_eq!(scores[0].name, "oracle");
    }
}

#[test]
fn too_little_data_is_a_clear_error() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let records: Vec<RunRecord> = synthetic(&mut rng)
        .into_iter()
        .filter(|r| r.features.model.name == "small")
        .collect();
    let all = cases(&records, &SelectionRules::default());
    assert!(matches!(
        evaluate(&all, HeldOut::Models),
        Err(MetaError::NotEnoughData(_))
    ));
    assert!(CostModel::fit(&[]).is_err());
    // Methods over the quality budget are never candidates.
    let f = features("small", 40, 16, 4, 0.0, false);
    let mut worse = record(&f, "q8_0", 0.5);
    worse.perplexity = 20.0;
    let kept = cases(
        &[record(&f, "plain", 1.0), record(&f, "batch", 0.9), worse],
        &SelectionRules::default(),
    );
    assert_eq!(kept.len(), 1);
    assert!(!kept[0].costs.contains_key("q8_0"));
    assert_eq!(kept[0].best(), "batch");
}
