//! Training the private models on the digits: both learn, and fixed point keeps their accuracy.

use std::path::Path;

use veil_zk::digits::{read_digits, split};
use veil_zk::train::{fixed_accuracy, float_accuracy, train, Architecture};

fn digits() -> Vec<veil_zk::digits::Digit> {
    read_digits(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/digits/digits.csv.gz"))
        .unwrap()
}

#[test]
fn both_models_learn_the_digits_and_keep_their_accuracy_in_fixed_point() {
    let all = digits();
    assert_eq!(all.len(), 1797);
    let (train_set, test_set) = split(&all);
    for arch in [Architecture::Mlp, Architecture::Cnn] {
        let model = train(arch, &train_set, 7).unwrap();
        let fixed = model.quantize().unwrap();
        let (float, fixed_acc) = (
            float_accuracy(&model, &test_set),
            fixed_accuracy(&fixed, &test_set),
        );
        eprintln!(
            "{arch:?}: float {float:.3}, fixed {fixed_acc:.3}, {} weights",
            fixed.weights.len()
        );
        assert!(float > 0.9, "{arch:?} float accuracy {float}");
        assert!(
            fixed_acc > float - 0.03,
            "{arch:?} fixed {fixed_acc} vs float {float}"
        );
    }
}
