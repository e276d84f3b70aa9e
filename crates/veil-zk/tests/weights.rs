//! The weights commitment on the real model: random openings verify, a changed byte in any
//! tensor fails, malformed challenges and answers are clear errors.

use veil_model::{GgufFile, ModelStore, Shard, SMOLLM2_135M};
use veil_zk::{challenge, check_openings, WeightsCommitment, CHUNK_BYTES, MAX_OPENINGS};

fn model() -> GgufFile {
    let path = ModelStore::from_env()
        .ensure(&SMOLLM2_135M, &mut |_| {})
        .expect("the default model can be fetched");
    GgufFile::open(path).unwrap()
}

fn whole(file: &GgufFile) -> Shard {
    Shard::whole(file.usize("llama.block_count").unwrap())
}

#[test]
fn random_openings_verify_and_a_changed_byte_in_any_tensor_fails() {
    let mut file = model();
    let shard = whole(&file);
    let commitment = WeightsCommitment::of_shard(&mut file, &shard).unwrap();
    let (root, leaves) = (commitment.root(), commitment.leaf_count());
    assert!(leaves > 1000, "{leaves} leaves");

    let asked = challenge(leaves, 16);
    assert_eq!(asked.len(), 16);
    let answer = commitment.open(&mut file, &asked).unwrap();
    check_openings(&root, leaves, &asked, &answer).unwrap();

    // Every tensor: open its first leaf, change one byte, and the proof no longer holds.
    let mut index = 0u32;
    let mut tensors = 0;
    while (index as usize) < leaves {
        let answer = commitment.open(&mut file, &[index]).unwrap();
        let opening = &answer.openings[0];
        assert_eq!(opening.chunk, 0);
        let mut changed = answer.clone();
        let middle = opening.bytes.len() / 2;
        changed.openings[0].bytes[middle] ^= 0x01;
        let err = check_openings(&root, leaves, &[index], &changed).unwrap_err();
        assert!(
            err.to_string()
                .contains("do not hash to the committed root"),
            "{err}"
        );
        // Passing one tensor's chunk off as another's fails too.
        let mut renamed = answer.clone();
        renamed.openings[0].tensor.push('x');
        assert!(check_openings(&root, leaves, &[index], &renamed).is_err());
        tensors += 1;
        // The next tensor starts after this one's chunks.
        let size = file.tensor_bytes(&opening.tensor).unwrap().len();
        index += size.div_ceil(CHUNK_BYTES) as u32;
    }
    assert_eq!(tensors, file.tensor_names().len());
}

#[test]
fn a_shard_commits_to_its_own_tensors() {
    let mut file = model();
    let shard = whole(&file);
    let whole_root = WeightsCommitment::of_shard(&mut file, &shard)
        .unwrap()
        .root();
    let first = Shard {
        layers: 0..10,
        embedding: true,
        head: false,
    };
    let part = WeightsCommitment::of_shard(&mut file, &first).unwrap();
    assert_ne!(part.root(), whole_root);
    let asked = challenge(part.leaf_count(), 8);
    let answer = part.open(&mut file, &asked).unwrap();
    assert!(answer
        .openings
        .iter()
        .all(|o| o.tensor == "token_embd.weight" || o.tensor.starts_with("blk.")));
    check_openings(&part.root(), part.leaf_count(), &asked, &answer).unwrap();
    // The whole model's root does not accept the shard's openings.
    assert!(check_openings(&whole_root, part.leaf_count(), &asked, &answer).is_err());
}

#[test]
fn malformed_challenges_and_answers_are_clear_errors() {
    let mut file = model();
    let shard = whole(&file);
    let commitment = WeightsCommitment::of_shard(&mut file, &shard).unwrap();
    let (root, leaves) = (commitment.root(), commitment.leaf_count());
    let too_many: Vec<u32> = (0..=MAX_OPENINGS as u32).collect();
    for (asked, says) in [
        (vec![], "1 to"),
        (too_many, "1 to"),
        (vec![leaves as u32], "does not exist"),
        (vec![3, 3], "asked twice"),
    ] {
        let err = commitment.open(&mut file, &asked).unwrap_err().to_string();
        assert!(err.contains(says), "{err}");
    }
    let asked = vec![5, 1, 9];
    let answer = commitment.open(&mut file, &asked).unwrap();
    check_openings(&root, leaves, &asked, &answer).unwrap();
    // Out of order, missing a leaf, a cut proof, a proof of garbage: refused, no panic.
    let mut reordered = answer.clone();
    reordered.openings.swap(0, 1);
    assert!(check_openings(&root, leaves, &asked, &reordered)
        .unwrap_err()
        .to_string()
        .contains("asked for leaves"));
    let mut missing = answer.clone();
    missing.openings.pop();
    assert!(check_openings(&root, leaves, &asked, &missing).is_err());
    for cut in [0, 1, 31, answer.proof.len() - 32] {
        let mut short = answer.clone();
        short.proof.truncate(cut);
        assert!(check_openings(&root, leaves, &asked, &short).is_err());
    }
    let mut garbage = answer.clone();
    garbage.proof = vec![0xAB; answer.proof.len()];
    assert!(check_openings(&root, leaves, &asked, &garbage).is_err());
    let mut big = answer;
    big.openings[0].bytes = vec![0; CHUNK_BYTES + 1];
    assert!(check_openings(&root, leaves, &asked, &big)
        .unwrap_err()
        .to_string()
        .contains("over a chunk"));
}

#[test]
fn the_leaves_of_a_whole_file_give_every_shards_root() {
    let leaves = veil_zk::ModelLeaves::of_file(model()).unwrap();
    let mut file = model();
    let blocks = whole(&file).layers.end;
    let shards = [
        whole(&file),
        Shard::span(0..10, blocks).unwrap(),
        Shard::span(10..20, blocks).unwrap(),
        Shard::span(20..blocks, blocks).unwrap(),
        Shard {
            layers: 3..7,
            embedding: false,
            head: false,
        },
    ];
    let mut roots = std::collections::HashSet::new();
    for shard in &shards {
        let expected = WeightsCommitment::of_shard(&mut file, shard)
            .unwrap()
            .root();
        assert_eq!(leaves.root_of(shard).unwrap(), expected, "{shard:?}");
        roots.insert(expected);
    }
    assert_eq!(
        roots.len(),
        shards.len(),
        "every shard commits to its own root"
    );
    // A range past the model's blocks is an error, not an empty or panicking tree.
    let past = Shard {
        layers: blocks..blocks + 4,
        embedding: false,
        head: false,
    };
    assert!(leaves.root_of(&past).is_err());
}
