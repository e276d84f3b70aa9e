//! Proofs of inference on the real private models: an honest proof verifies; a changed
//! output, a changed input, other weights than the committed ones, or a corrupted proof fail.

use std::path::Path;

use halo2_proofs::circuit::Value;
use halo2_proofs::dev::MockProver;
use halo2_proofs::pasta::Fp;
use veil_zk::circuit::{commitment, instance, InferenceCircuit, K};
use veil_zk::digits::{read_digits, split};
use veil_zk::model::FixedModel;

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
    let (_, test_set) = split(&digits());
    for name in ["mlp", "cnn"] {
        let model = committed(name);
        for digit in &test_set[..3] {
            mock(&model, Fp::from(12345), &digit.pixels).unwrap();
        }
    }
}

fn committed(name: &str) -> FixedModel {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../models/zk/{name}.json"));
    let model: veil_zk::model::FloatModel =
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    model.quantize().unwrap()
}

#[test]
fn honest_proofs_verify_and_every_tampering_fails() {
    use veil_zk::proof::{
        fp_from_hex, hex_fp, parameters, prove, proving_key, verify, verifying_key,
    };
    let params = parameters();
    let (_, test_set) = split(&digits());
    let model = committed("mlp");
    let salt = Fp::from(987_654_321);
    let pk = proving_key(&params, &model.shape).unwrap();
    let vk = verifying_key(&params, &model.shape).unwrap();
    let trusted = commitment(&model.weights, salt);
    let pixels = &test_set[1].pixels;
    let proof = prove(&params, &pk, &model, salt, pixels).unwrap();
    verify(&params, &vk, &trusted, &proof).unwrap();
    assert_eq!(fp_from_hex(&proof.commitment).unwrap(), trusted);

    // A changed output (the runner-up digit made the winner).
    let mut lie = proof.clone();
    let top = veil_zk::model::argmax(&lie.output);
    lie.output[(top + 1) % 10] = lie.output[top] + 1;
    assert!(verify(&params, &vk, &trusted, &lie)
        .unwrap_err()
        .to_string()
        .contains("does not verify"));
    // A changed input.
    let mut lie = proof.clone();
    lie.input[20] = (lie.input[20] + 1) % 17;
    assert!(verify(&params, &vk, &trusted, &lie).is_err());
    // Other weights than the committed ones: an honest proof for them names another
    // commitment, and passing it off under the published one fails.
    let mut other = model.clone();
    other.weights[5] = if other.weights[5] == 0 { 1 } else { 0 };
    let other_proof = prove(&params, &pk, &other, salt, pixels).unwrap();
    assert!(verify(&params, &vk, &trusted, &other_proof)
        .unwrap_err()
        .to_string()
        .contains("another commitment"));
    let mut disguised = other_proof.clone();
    disguised.commitment = hex_fp(&trusted);
    assert!(verify(&params, &vk, &trusted, &disguised)
        .unwrap_err()
        .to_string()
        .contains("does not verify"));
    // A corrupted proof: a flipped byte, a cut proof, not hex.
    let mut corrupt = proof.clone();
    let mut bytes = hex::decode(&corrupt.proof).unwrap();
    bytes[100] ^= 0x01;
    corrupt.proof = hex::encode(&bytes);
    assert!(verify(&params, &vk, &trusted, &corrupt).is_err());
    let mut cut = proof.clone();
    cut.proof.truncate(200);
    assert!(verify(&params, &vk, &trusted, &cut).is_err());
    let mut garbage = proof;
    garbage.proof = "zz".into();
    assert!(verify(&params, &vk, &trusted, &garbage)
        .unwrap_err()
        .to_string()
        .contains("not hex"));
}

#[test]
fn a_weight_outside_the_committed_packing_cannot_be_used() {
    // The circuit itself refuses a witness whose weights break the 8-bit packing, even when
    // the commitment is computed from those very weights.
    let (_, test_set) = split(&digits());
    let mut model = committed("mlp");
    model.weights[0] = 300;
    let pixels = &test_set[0].pixels;
    let trace = model.trace(pixels).unwrap();
    let public = instance(commitment(&model.weights, Fp::one()), pixels, &trace.output);
    let circuit = InferenceCircuit {
        model,
        salt: Value::known(Fp::one()),
        known: true,
        trace: Value::known(trace),
    };
    let prover = MockProver::run(K, &circuit, vec![public]).unwrap();
    assert!(prover.verify().is_err());
}
