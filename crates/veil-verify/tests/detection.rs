//! On the real model: honest answers pass whatever threads, prefill batch and generator/validator
//! pair produced them, every kind of cheat is caught, and bad claims are clear errors.
//!
//! The tests run 40 honest validations and 10 trials per cheat to keep the suite within its time
//! budget; `veil verify calibrate` runs the same code at 200 and 50 for the reported figures.

use veil_model::{ChatMessage, LocalModel, ModelStore, SamplingParams, WeightFormat, SMOLLM2_135M};
use veil_verify::trials::{detection_trials, honest_trials, load_whole, TRIAL_PROMPTS};
use veil_verify::{
    serve_fixed_length, validate, Misbehaviour, ServingSession, Tolerances, VerifyError,
};

fn model_path() -> std::path::PathBuf {
    ModelStore::from_env()
        .ensure(&SMOLLM2_135M, &mut |_| {})
        .expect("the default model can be fetched")
}

#[test]
fn honest_runs_raise_no_false_accusation() {
    let tol = Tolerances::default();
    let report = honest_trials(&model_path(), WeightFormat::F32, 40, &tol, &mut |_, _| {}).unwrap();
    assert_eq!(report.runs, 40);
    assert!(report.failures.is_empty(), "{:#?}", report.failures);
    assert!(report.closest < 1.0);
}

#[test]
fn every_kind_of_cheat_is_caught_in_every_trial() {
    let tol = Tolerances::default();
    for kind in Misbehaviour::ALL {
        let report = detection_trials(
            &model_path(),
            WeightFormat::F32,
            kind,
            10,
            &tol,
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(report.caught, 10, "{kind}: {report:?}");
    }
}

#[test]
fn bad_claims_are_clear_errors() {
    let path = model_path();
    let text = LocalModel::open_text(&path).unwrap();
    let shards = [load_whole(&path, WeightFormat::F32, None).unwrap()];
    let prompt = text
        .chat_prompt(&[ChatMessage::user(TRIAL_PROMPTS[0])])
        .unwrap();
    let session = ServingSession::new(&shards, SamplingParams::greedy(), None, 0).unwrap();
    let answer = serve_fixed_length(&shards, session, &prompt, 4).unwrap();
    let tol = Tolerances::default();
    assert!(validate(&shards, &answer, &tol).unwrap().verdict.passed());

    let mut c = answer.clone();
    c.commitment.chunks[0].values.pop();
    assert!(matches!(
        validate(&shards, &c, &tol),
        Err(VerifyError::MalformedCommitment(_))
    ));
    let mut c = answer.clone();
    c.output.push(1);
    assert!(
        matches!(validate(&shards, &c, &tol), Err(VerifyError::MalformedCommitment(m)) if m.contains("covers 4 tokens"))
    );
    let mut c = answer.clone();
    c.prompt.clear();
    assert!(matches!(
        validate(&shards, &c, &tol),
        Err(VerifyError::InvalidClaim(_))
    ));
    let mut c = answer.clone();
    c.output[1] = 1_000_000;
    assert!(
        matches!(validate(&shards, &c, &tol), Err(VerifyError::InvalidClaim(m)) if m.contains("vocabulary"))
    );
    let mut c = answer.clone();
    c.sampling.temperature = -1.0;
    assert!(validate(&shards, &c, &tol).is_err());
    let mut c = answer;
    c.commitment.hidden_size = 100;
    assert!(
        matches!(validate(&shards, &c, &tol), Err(VerifyError::MalformedCommitment(m)) if m.contains("hidden size"))
    );
}
