//! Evidence records: signed by everyone involved, re-checkable by anyone, and no byte of them
//! can change without the check failing.

use veil_verify::{
    committee, Claim, CommitmentBuilder, Evidence, Job, Keypair, SamplingSpec, Signed, Verdict,
    VerdictReveal, VerifyError, EVIDENCE_VERSION,
};

fn job(generator: &Keypair) -> Job {
    let mut builder = CommitmentBuilder::new(8, veil_verify::CommitmentMode::Tolerant).unwrap();
    for t in 0..5 {
        builder
            .push(
                &(0..8)
                    .map(|d| (t * 8 + d) as f32 - 20.0)
                    .collect::<Vec<_>>(),
            )
            .unwrap();
    }
    Job {
        request_id: "ab".repeat(32),
        model_digest: "cd".repeat(32),
        format: "f32".into(),
        generator: generator.public().to_peer_id().to_string(),
        claim: Claim {
            prompt: vec![1, 2, 3],
            output: vec![4, 5, 6, 7, 8],
            sampling: SamplingSpec {
                temperature: 0.0,
                top_k: None,
                top_p: None,
                seed: 0,
            },
            commitment: builder.finish(),
        },
    }
}

/// Evidence where `fails` of the `judges` failed the answer.
fn evidence(generator: &Keypair, judges: &[Keypair], fails: usize) -> Evidence {
    let job = Signed::sign(job(generator), generator).unwrap();
    let digest = job.body.digest().unwrap();
    let mut commits = Vec::new();
    let mut reveals = Vec::new();
    for (i, judge) in judges.iter().enumerate() {
        let verdict = if i < fails {
            Verdict::Fail {
                token: 2,
                reason: "committed activations are off".into(),
            }
        } else {
            Verdict::Pass
        };
        let reveal = VerdictReveal::new(digest.clone(), verdict);
        let commit = reveal.commit(&judge.public().to_peer_id()).unwrap();
        commits.push(Signed::sign(commit, judge).unwrap());
        reveals.push(Signed::sign(reveal, judge).unwrap());
    }
    Evidence {
        version: EVIDENCE_VERSION,
        job,
        commits,
        reveals,
        inputs: Vec::new(),
    }
}

fn keys(n: usize) -> Vec<Keypair> {
    (0..n).map(|_| Keypair::generate_ed25519()).collect()
}

#[test]
fn a_majority_of_signed_failures_proves_the_lie() {
    let generator = Keypair::generate_ed25519();
    let judges = keys(3);
    let record = evidence(&generator, &judges, 2);
    let proven = record.check().unwrap();
    assert_eq!(
        proven.generator,
        generator.public().to_peer_id().to_string()
    );
    assert_eq!(proven.failed.len(), 2);
    assert_eq!(proven.passed.len(), 1);
    let bytes = record.to_bytes().unwrap();
    assert_eq!(<Evidence>::from_bytes(&bytes).unwrap(), record);

    // No majority, no proof.
    let weak = evidence(&generator, &judges, 1);
    assert!(matches!(weak.check(), Err(VerifyError::Evidence(m)) if m.contains("not a majority")));
}

#[test]
fn changing_any_byte_of_the_evidence_makes_the_check_fail() {
    let generator = Keypair::generate_ed25519();
    let bytes = evidence(&generator, &keys(3), 3).to_bytes().unwrap();
    for at in 0..bytes.len() {
        for flip in [0x01u8, 0x20] {
            let mut tampered = bytes.clone();
            tampered[at] ^= flip;
            let outcome = <Evidence>::from_bytes(&tampered).and_then(|e| e.check());
            assert!(outcome.is_err(), "byte {at} ^ {flip:#x} went unnoticed");
        }
    }
}

#[test]
fn forged_and_inconsistent_messages_are_clear_errors() {
    let generator = Keypair::generate_ed25519();
    let judges = keys(3);
    let good = evidence(&generator, &judges, 2);

    // Another key signs in a judge's name.
    let mut forged = good.clone();
    let impostor = Keypair::generate_ed25519();
    let stolen = Signed::sign(forged.reveals[0].body.clone(), &impostor).unwrap();
    forged.reveals[0].signature = stolen.signature;
    let err = forged.check().unwrap_err();
    assert!(
        matches!(&err, VerifyError::Signature(m) if m.contains("does not match")),
        "{err}"
    );

    // A reveal that does not open its commit (the verdict was changed after sealing).
    let mut switched = good.clone();
    let judge = &judges[2];
    let mut body = switched.reveals[2].body.clone();
    body.verdict = Verdict::Fail {
        token: 0,
        reason: "changed my mind".into(),
    };
    switched.reveals[2] = Signed::sign(body, judge).unwrap();
    let err = switched.check().unwrap_err();
    assert!(
        err.to_string().contains("does not open its commit"),
        "{err}"
    );

    // The generator judging itself, or a job signed by someone else.
    let self_judged = evidence(&generator, &[generator.clone(), judges[0].clone()], 2);
    assert!(self_judged
        .check()
        .unwrap_err()
        .to_string()
        .contains("own answer"));
    let mut misnamed = good.clone();
    misnamed.job = Signed::sign(good.job.body.clone(), &judges[0]).unwrap();
    assert!(misnamed
        .check()
        .unwrap_err()
        .to_string()
        .contains("signed it"));

    // Garbage and edited files.
    assert!(matches!(
        <Evidence>::from_bytes(b"{not json"),
        Err(VerifyError::Json(_))
    ));
    let mut edited = good.to_bytes().unwrap();
    edited.insert(1, b' ');
    assert!(<Evidence>::from_bytes(&edited)
        .unwrap_err()
        .to_string()
        .contains("canonical"));
}

#[test]
fn the_committee_is_a_deterministic_function_of_request_and_seed() {
    let peers: Vec<String> = keys(8)
        .iter()
        .map(|k| k.public().to_peer_id().to_string())
        .collect();
    let a = committee(&"01".repeat(32), "veil", &peers, 4);
    assert_eq!(a, committee(&"01".repeat(32), "veil", &peers, 4));
    assert_eq!(a.len(), 4);
    let mut reversed = peers.clone();
    reversed.reverse();
    assert_eq!(a, committee(&"01".repeat(32), "veil", &reversed, 4));
    // Other requests draw other committees.
    let firsts: std::collections::HashSet<String> = (0..40)
        .map(|n| committee(&format!("{n:064x}"), "veil", &peers, 1)[0].clone())
        .collect();
    assert!(firsts.len() >= 4, "{firsts:?}");
}
