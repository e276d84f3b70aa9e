//! Real, published evidence (dcap-qvl's TDX and SGX sample quotes with their collateral, the
//! `sev` crate's Milan attestation report and VCEK; see `fixtures/README.md`) through Veil's
//! verifier: each verifies, and each kind of tampering or policy breach fails with its reason.

use veil_tee::{verify, Evidence, Expectation, Policy, TeeKind, Verdict};

/// A moment inside the samples' collateral validity (TCB info and QE identity issued
/// 2025-06-19, next update 2025-07-19): 2025-07-01T00:00:00Z.
const COLLATERAL_CURRENT: u64 = 1_751_328_000;
/// A day after the collateral's next update (2025-07-19): expired.
const COLLATERAL_EXPIRED: u64 = 1_753_000_000;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn intel(quote: &str, collateral: &str) -> Evidence {
    let mut evidence = Evidence::read(&fixture(quote)).unwrap();
    evidence.set_collateral(&fixture(collateral)).unwrap();
    evidence
}

fn tdx() -> Evidence {
    intel("tdx_quote", "tdx_quote_collateral.json")
}

fn sgx() -> Evidence {
    intel("sgx_quote", "sgx_quote_collateral.json")
}

fn snp() -> Evidence {
    let mut evidence = Evidence::read(&fixture("report_milan.hex")).unwrap();
    evidence.set_vcek(&fixture("vcek_milan.der")).unwrap();
    evidence
}

/// A policy that allows exactly what `evidence` measures (read from an unchecked first pass).
fn allowing(evidence: &Evidence, extra: &str) -> Policy {
    let seen = verify(
        evidence,
        &Policy::from_toml("").unwrap(),
        &Expectation::default(),
        COLLATERAL_CURRENT,
    )
    .unwrap();
    Policy::from_toml(&format!(
        "{extra}\n[[measurement]]\nkind = \"{}\"\nvalue = \"{}\"\n",
        evidence.kind, seen.measurement
    ))
    .unwrap()
}

const INTEL_OK: &str = "intel_tcb_statuses = [\"UpToDate\", \"SWHardeningNeeded\", \"ConfigurationAndSWHardeningNeeded\", \"OutOfDate\"]";

fn check<'a>(verdict: &'a Verdict, name: &str) -> &'a veil_tee::Check {
    verdict.checks.iter().find(|c| c.name == name).unwrap()
}

fn failed(verdict: &Verdict, name: &str) -> String {
    let c = check(verdict, name);
    assert!(!c.passed, "{name} passed: {verdict}");
    assert!(!verdict.accepted());
    c.detail.clone()
}

#[test]
fn published_samples_verify() {
    for (evidence, kind) in [
        (tdx(), TeeKind::Tdx),
        (sgx(), TeeKind::Sgx),
        (snp(), TeeKind::SevSnp),
    ] {
        assert_eq!(evidence.kind, kind);
        let policy = allowing(&evidence, INTEL_OK);
        let verdict = verify(
            &evidence,
            &policy,
            &Expectation::default(),
            COLLATERAL_CURRENT,
        )
        .unwrap();
        assert!(verdict.accepted(), "{verdict}");
        assert!(!verdict.debug);
        assert_eq!(verdict.measurement.len(), kind.measurement_len() * 2);
    }
}

#[test]
fn a_changed_byte_fails_the_signature() {
    for (evidence, at) in [(tdx(), 700), (sgx(), 450), (snp(), 0x90)] {
        let policy = allowing(&evidence, INTEL_OK);
        let mut changed = evidence.clone();
        changed.quote[at] ^= 0x01;
        let verdict = verify(
            &changed,
            &policy,
            &Expectation::default(),
            COLLATERAL_CURRENT,
        )
        .unwrap();
        failed(&verdict, "signature");
    }
}

#[test]
fn a_wrong_key_binding_fails() {
    // The samples were not made by a Veil node, so no key is bound in them.
    for evidence in [tdx(), sgx(), snp()] {
        let policy = allowing(&evidence, INTEL_OK);
        let expect = Expectation {
            peer_key: Some(b"this node's public key"),
            nonce: None,
        };
        let verdict = verify(&evidence, &policy, &expect, COLLATERAL_CURRENT).unwrap();
        assert!(failed(&verdict, "binding").contains("wrong key binding"));
        assert!(check(&verdict, "signature").passed);
        let expect = Expectation {
            peer_key: None,
            nonce: Some([9; 32]),
        };
        let verdict = verify(&evidence, &policy, &expect, COLLATERAL_CURRENT).unwrap();
        assert!(failed(&verdict, "freshness").contains("nonce"));
    }
}

#[test]
fn expired_collateral_fails() {
    for evidence in [tdx(), sgx()] {
        let policy = allowing(&evidence, INTEL_OK);
        let verdict = verify(
            &evidence,
            &policy,
            &Expectation::default(),
            COLLATERAL_EXPIRED,
        )
        .unwrap();
        let why = failed(&verdict, "signature").to_lowercase();
        assert!(
            why.contains("expired") || why.contains("outdated") || why.contains("not valid"),
            "{why}"
        );
    }
}

#[test]
fn a_debug_mode_report_fails() {
    // Setting the debug bit breaks the signature too (the hardware signed a non-debug report),
    // and the policy names the debug mode on its own.
    let cases = [(tdx(), 48 + 120), (sgx(), 48 + 48), (snp(), 8)];
    let bits = [0x01u8, 0x02, 0x00];
    for ((evidence, at), bit) in cases.into_iter().zip(bits) {
        let policy = allowing(&evidence, INTEL_OK);
        let mut debug = evidence.clone();
        if evidence.kind == TeeKind::SevSnp {
            // Guest policy bit 19: DEBUG allowed.
            debug.quote[at + 2] |= 0x08;
        } else {
            debug.quote[at] |= bit;
        }
        let verdict = verify(&debug, &policy, &Expectation::default(), COLLATERAL_CURRENT).unwrap();
        assert!(verdict.debug, "{verdict}");
        assert!(failed(&verdict, "debug").contains("debug mode"));
        let lenient = Policy {
            allow_debug: true,
            ..policy.clone()
        };
        let verdict = verify(
            &debug,
            &lenient,
            &Expectation::default(),
            COLLATERAL_CURRENT,
        )
        .unwrap();
        assert!(check(&verdict, "debug").passed);
    }
}

#[test]
fn a_measurement_not_on_the_allow_list_fails() {
    for evidence in [tdx(), sgx(), snp()] {
        let len = evidence.kind.measurement_len() * 2;
        let other = Policy::from_toml(&format!(
            "{INTEL_OK}\n[[measurement]]\nkind = \"{}\"\nvalue = \"{}\"\n",
            evidence.kind,
            "0".repeat(len)
        ))
        .unwrap();
        let verdict = verify(
            &evidence,
            &other,
            &Expectation::default(),
            COLLATERAL_CURRENT,
        )
        .unwrap();
        assert!(failed(&verdict, "measurement").contains("not on the allow-list"));
        assert!(check(&verdict, "signature").passed);
        let none = Policy::from_toml(INTEL_OK).unwrap();
        let verdict = verify(
            &evidence,
            &none,
            &Expectation::default(),
            COLLATERAL_CURRENT,
        )
        .unwrap();
        assert!(failed(&verdict, "measurement").contains("allows no"));
    }
}

#[test]
fn tcb_below_the_policy_fails() {
    // The SGX sample's platform needs configuration and SW hardening: UpToDate alone refuses it.
    let evidence = sgx();
    let strict = allowing(&evidence, "intel_tcb_statuses = [\"UpToDate\"]");
    let verdict = verify(
        &evidence,
        &strict,
        &Expectation::default(),
        COLLATERAL_CURRENT,
    )
    .unwrap();
    assert!(failed(&verdict, "tcb").contains("not accepted"));
    let evidence = snp();
    let high = allowing(
        &evidence,
        "[amd_min_tcb]\nbootloader = 255\ntee = 0\nsnp = 0\nmicrocode = 0",
    );
    let verdict = verify(
        &evidence,
        &high,
        &Expectation::default(),
        COLLATERAL_CURRENT,
    )
    .unwrap();
    assert!(failed(&verdict, "tcb").contains("below the minimum"));
}

#[test]
fn a_vcek_for_another_report_fails() {
    let mut evidence = snp();
    // Claim a higher reported TCB (offset 0x180, bootloader first): the VCEK was not issued for it.
    evidence.quote[0x180] = evidence.quote[0x180].wrapping_add(1);
    let policy = allowing(&evidence, "");
    let verdict = verify(
        &evidence,
        &policy,
        &Expectation::default(),
        COLLATERAL_CURRENT,
    )
    .unwrap();
    assert!(failed(&verdict, "vcek").contains("issued for TCB"));
}

#[test]
fn unreadable_evidence_is_a_clear_error() {
    for (bytes, says) in [
        (b"not a quote".to_vec(), "header matches none"),
        (b"{\"kind\": \"tdx\"}".to_vec(), "not an evidence bundle"),
        (vec![0u8; 300 * 1024], "limit"),
        (b"abc".to_vec(), "bad hex"),
    ] {
        let err = Evidence::read(&bytes).unwrap_err().to_string();
        assert!(err.contains(says), "{err}");
    }
    let mut no_collateral = Evidence::read(&fixture("tdx_quote")).unwrap();
    no_collateral.collateral = None;
    let err = verify(
        &no_collateral,
        &Policy::from_toml("").unwrap(),
        &Expectation::default(),
        0,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("collateral"), "{err}");
    let mut wrong_kind = tdx();
    wrong_kind.kind = TeeKind::SevSnp;
    let bundle = wrong_kind.to_json();
    assert!(Evidence::read(bundle.as_bytes())
        .unwrap_err()
        .to_string()
        .contains("the quote is tdx"));
    let round = Evidence::read(tdx().to_json().as_bytes()).unwrap();
    assert_eq!(round.quote, tdx().quote);
}
