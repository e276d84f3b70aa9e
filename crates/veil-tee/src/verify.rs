//! Verifying evidence: the hardware signature and its chain to the vendor's root (by the
//! maintained verifiers), then Veil's checks: key binding, freshness, debug mode, TCB level and
//! measurement, each reported with its reason.

use std::fmt;

use dcap_qvl::quote::{Quote, Report};
use sev::certs::snp::{builtin, ca, Certificate, Chain, Verifiable};
use sev::firmware::guest::AttestationReport;
use sev::parser::ByteParser;
use x509_cert::der::Decode;

use crate::binding::{carries, names_peer, Freshness};
use crate::error::{Result, TeeError};
use crate::evidence::{Evidence, TeeKind};
use crate::policy::{AmdTcb, Policy};

/// What the verifier expects of the evidence beyond the policy.
#[derive(Debug, Clone, Copy, Default)]
pub struct Expectation<'a> {
    /// The libp2p public key (protobuf encoding) of the node presenting the evidence.
    pub peer_key: Option<&'a [u8]>,
    /// The nonce the verifier sent.
    pub nonce: Option<[u8; 32]>,
}

/// One check and how it went.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// Whether it passed.
    pub passed: bool,
    /// Why.
    pub detail: String,
}

/// What verification found: what the evidence says, and each check.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// The TEE.
    pub kind: TeeKind,
    /// The measurement (hex): MRTD, MRENCLAVE or MEASUREMENT.
    pub measurement: String,
    /// Whether the TEE runs in debug mode.
    pub debug: bool,
    /// The TCB: Intel's status, or AMD's reported TCB version.
    pub tcb: String,
    /// The report data (hex).
    pub report_data: String,
    /// Every check, in order.
    pub checks: Vec<Check>,
}

impl Verdict {
    /// Whether every check passed.
    pub fn accepted(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    /// Why it was refused: the failed checks' details.
    pub fn reasons(&self) -> Vec<String> {
        self.checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect()
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = if self.accepted() {
            "ACCEPTED"
        } else {
            "REJECTED"
        };
        writeln!(f, "verdict: {word} ({} evidence)", self.kind)?;
        writeln!(
            f,
            "  {}: {}",
            self.kind.measurement_name(),
            self.measurement
        )?;
        writeln!(f, "  tcb: {}", self.tcb)?;
        writeln!(f, "  debug: {}", self.debug)?;
        writeln!(f, "  report data: {}", self.report_data)?;
        for c in &self.checks {
            let mark = if c.passed { "ok  " } else { "FAIL" };
            writeln!(f, "  {mark} {:<12} {}", c.name, c.detail)?;
        }
        Ok(())
    }
}

/// What the evidence claims, read before (and whatever the outcome of) signature checks.
struct Claims {
    measurement: Vec<u8>,
    debug: bool,
    report_data: [u8; 64],
}

/// Verifies `evidence` as of `now` (Unix seconds) against `policy` and `expect`. An error
/// means the evidence could not be read at all; a refusal is a verdict with reasons.
pub fn verify(
    evidence: &Evidence,
    policy: &Policy,
    expect: &Expectation,
    now: u64,
) -> Result<Verdict> {
    let (claims, tcb, mut checks) = match evidence.kind {
        TeeKind::Tdx | TeeKind::Sgx => verify_intel(evidence, policy, now)?,
        TeeKind::SevSnp => verify_amd(evidence, policy)?,
    };
    checks.push(match (claims.debug, policy.allow_debug) {
        (false, _) => pass("debug", "debug mode off"),
        (true, true) => pass("debug", "debug mode on, which the policy allows"),
        (true, false) => fail(
            "debug",
            "the TEE runs in debug mode: its host can read its memory",
        ),
    });
    let measurement = hex::encode(&claims.measurement);
    checks.push(match policy.allows(evidence.kind, &measurement) {
        Ok(why) => pass("measurement", why),
        Err(why) => fail("measurement", why),
    });
    checks.push(binding_check(&claims.report_data, expect));
    checks.push(freshness_check(
        &claims.report_data,
        evidence,
        policy,
        expect,
        now,
    ));
    Ok(Verdict {
        kind: evidence.kind,
        measurement,
        debug: claims.debug,
        tcb,
        report_data: hex::encode(claims.report_data),
        checks,
    })
}

fn pass(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        passed: true,
        detail: detail.into(),
    }
}

fn fail(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        passed: false,
        detail: detail.into(),
    }
}

/// An Intel quote: dcap-qvl checks the quote's signature, the PCK chain to Intel's root, the
/// QE report and the collateral's signatures and dates, and gives the TCB status.
fn verify_intel(
    evidence: &Evidence,
    policy: &Policy,
    now: u64,
) -> Result<(Claims, String, Vec<Check>)> {
    let quote = Quote::parse(&evidence.quote)
        .map_err(|e| TeeError::BadEvidence(format!("unreadable {} quote: {e:#}", evidence.kind)))?;
    let claims = match &quote.report {
        Report::SgxEnclave(r) => Claims {
            measurement: r.mr_enclave.to_vec(),
            debug: r.attributes[0] & 0x02 != 0,
            report_data: r.report_data,
        },
        other => {
            let td = other.as_td10().ok_or_else(|| {
                TeeError::BadEvidence("the quote's report is neither SGX nor TDX".into())
            })?;
            Claims {
                measurement: td.mr_td.to_vec(),
                debug: td.td_attributes[0] & 0x01 != 0,
                report_data: td.report_data,
            }
        }
    };
    let found = if quote.report.is_sgx() {
        TeeKind::Sgx
    } else {
        TeeKind::Tdx
    };
    if found != evidence.kind {
        return Err(TeeError::BadEvidence(format!(
            "the evidence says {} but the quote is {found}",
            evidence.kind
        )));
    }
    let Some(collateral) = &evidence.collateral else {
        return Err(TeeError::BadEvidence(
            "an Intel quote needs its DCAP collateral (--collateral FILE)".into(),
        ));
    };
    let mut checks = Vec::new();
    let tcb = match dcap_qvl::verify::verify(&evidence.quote, collateral, now) {
        Ok(report) => {
            checks.push(pass(
                "signature",
                "quote signed by a PCK certified by Intel's root; collateral signed and current",
            ));
            let ok = policy.intel_tcb_statuses.contains(&report.status);
            checks.push(if ok {
                pass("tcb", format!("status {} is accepted", report.status))
            } else {
                fail(
                    "tcb",
                    format!(
                        "status {} is not accepted (policy: {})",
                        report.status,
                        policy.intel_tcb_statuses.join(", ")
                    ),
                )
            });
            report.status
        }
        Err(e) => {
            checks.push(fail("signature", format!("{e:#}")));
            checks.push(fail("tcb", "unknown: the quote did not verify"));
            "unknown".into()
        }
    };
    Ok((claims, tcb, checks))
}

/// An AMD report: `sev` checks the VCEK's chain to AMD's root (built into the crate, never
/// taken from the evidence) and the report's signature; the VCEK must be this chip's, at the
/// TCB the report claims.
fn verify_amd(evidence: &Evidence, policy: &Policy) -> Result<(Claims, String, Vec<Check>)> {
    let report = AttestationReport::from_bytes(&evidence.quote)
        .map_err(|e| TeeError::BadEvidence(format!("unreadable SEV-SNP report: {e}")))?;
    let claims = Claims {
        measurement: report.measurement.to_vec(),
        debug: report.policy.debug_allowed(),
        report_data: report.report_data,
    };
    let reported = AmdTcb {
        bootloader: report.reported_tcb.bootloader,
        tee: report.reported_tcb.tee,
        snp: report.reported_tcb.snp,
        microcode: report.reported_tcb.microcode,
    };
    let vcek = evidence
        .vcek
        .as_deref()
        .ok_or_else(|| {
            TeeError::BadEvidence("a SEV-SNP report needs its VCEK (--vcek FILE)".into())
        })
        .and_then(|h| {
            hex::decode(h).map_err(|e| TeeError::BadEvidence(format!("bad VCEK hex: {e}")))
        })?;
    let mut checks = Vec::new();
    checks.push(match amd_signature(&report, &vcek) {
        Ok(product) => pass(
            "signature",
            format!("report signed by the VCEK, certified by AMD's {product} ASK and ARK"),
        ),
        Err(why) => fail("signature", why),
    });
    checks.push(match vcek_matches(&vcek, &report, &reported) {
        Ok(()) => pass("vcek", "issued to this chip at the reported TCB"),
        Err(why) => fail("vcek", why),
    });
    checks.push(match &policy.amd_min_tcb {
        None => pass("tcb", "the policy sets no minimum"),
        Some(min) if reported.reaches(min) => pass("tcb", format!("reaches {min}")),
        Some(min) => fail("tcb", format!("{reported} is below the minimum {min}")),
    });
    Ok((claims, reported.to_string(), checks))
}

/// Loads one product family's built-in ARK and ASK.
type AmdRoot = fn() -> std::io::Result<(Certificate, Certificate)>;

/// Verifies the report under each AMD product family's built-in root; names the one that
/// signed.
fn amd_signature(
    report: &AttestationReport,
    vcek: &[u8],
) -> std::result::Result<&'static str, String> {
    let vek = Certificate::from_der(vcek).map_err(|e| format!("unreadable VCEK: {e}"))?;
    let roots: [(&str, AmdRoot); 3] = [
        ("Milan", || {
            Ok((builtin::milan::ark()?, builtin::milan::ask()?))
        }),
        ("Genoa", || {
            Ok((builtin::genoa::ark()?, builtin::genoa::ask()?))
        }),
        ("Turin", || {
            Ok((builtin::turin::ark()?, builtin::turin::ask()?))
        }),
    ];
    let mut last = String::new();
    for (product, root) in roots {
        let (ark, ask) = root().map_err(|e| format!("AMD's {product} root: {e}"))?;
        let chain = Chain {
            ca: ca::Chain { ark, ask },
            vek: vek.clone(),
        };
        match (&chain, report).verify() {
            Ok(()) => return Ok(product),
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!(
        "no AMD root (Milan, Genoa, Turin) certifies a VCEK that signed this report: {last}"
    ))
}

/// AMD's VCEK extensions (the KDS specification): the TCB parts it was issued for, and the
/// chip id.
const VCEK_BOOTLOADER: &str = "1.3.6.1.4.1.3704.1.3.1";
const VCEK_TEE: &str = "1.3.6.1.4.1.3704.1.3.2";
const VCEK_SNP: &str = "1.3.6.1.4.1.3704.1.3.3";
const VCEK_MICROCODE: &str = "1.3.6.1.4.1.3704.1.3.8";
const VCEK_HWID: &str = "1.3.6.1.4.1.3704.1.4";

/// Checks the VCEK was issued to the chip in the report at the TCB the report claims: a VCEK
/// from an older, weaker TCB must not vouch for a report claiming a newer one.
fn vcek_matches(
    vcek: &[u8],
    report: &AttestationReport,
    reported: &AmdTcb,
) -> std::result::Result<(), String> {
    let cert =
        x509_cert::Certificate::from_der(vcek).map_err(|e| format!("unreadable VCEK: {e}"))?;
    let mut tcb = [None::<u8>; 4];
    let mut hwid = None;
    for ext in cert.tbs_certificate.extensions.iter().flatten() {
        let value = ext.extn_value.as_bytes();
        let oid = ext.extn_id.to_string();
        let slot = match oid.as_str() {
            VCEK_BOOTLOADER => 0,
            VCEK_TEE => 1,
            VCEK_SNP => 2,
            VCEK_MICROCODE => 3,
            VCEK_HWID => {
                // Milan and Genoa VCEKs hold the chip id as raw bytes; Turin's as an OCTET STRING.
                hwid = Some(match value {
                    [0x04, len, rest @ ..] if *len as usize == rest.len() => rest.to_vec(),
                    raw => raw.to_vec(),
                });
                continue;
            }
            _ => continue,
        };
        // An INTEGER: tag 2, length, big-endian value; the levels fit one byte.
        tcb[slot] = match value {
            [0x02, len, rest @ ..] if *len as usize == rest.len() && !rest.is_empty() => {
                u8::try_from(rest.iter().fold(0u64, |acc, b| (acc << 8) | *b as u64)).ok()
            }
            _ => None,
        };
    }
    let [Some(bootloader), Some(tee), Some(snp), Some(microcode)] = tcb else {
        return Err("the VCEK lacks its TCB extensions".into());
    };
    let issued = AmdTcb {
        bootloader,
        tee,
        snp,
        microcode,
    };
    if issued != *reported {
        return Err(format!(
            "the VCEK was issued for TCB {issued}, the report claims {reported}"
        ));
    }
    let hwid = hwid.ok_or("the VCEK lacks its chip id")?;
    if hwid.is_empty() || !report.chip_id.starts_with(&hwid) {
        return Err("the VCEK was issued to another chip".into());
    }
    Ok(())
}

fn binding_check(data: &[u8; 64], expect: &Expectation) -> Check {
    match expect.peer_key {
        None => pass("binding", "not checked: no node key given"),
        Some(key) if names_peer(data, key) => pass("binding", "the report data names this node's key"),
        Some(_) => fail(
            "binding",
            "the report data does not name this node's key: wrong key binding (evidence from another node?)",
        ),
    }
}

fn freshness_check(
    data: &[u8; 64],
    evidence: &Evidence,
    policy: &Policy,
    expect: &Expectation,
    now: u64,
) -> Check {
    if let Some(nonce) = expect.nonce {
        return if carries(data, &Freshness::Nonce(nonce)) {
            pass("freshness", "the report data carries the verifier's nonce")
        } else {
            fail(
                "freshness",
                "the report data does not carry the verifier's nonce (replayed evidence?)",
            )
        };
    }
    match (evidence.produced_at, policy.max_age_seconds) {
        (Some(at), _) if !carries(data, &Freshness::Time(at)) => fail(
            "freshness",
            format!("the report data is not bound to the claimed time {at}"),
        ),
        (Some(at), Some(max)) if now.saturating_sub(at) > max => fail(
            "freshness",
            format!(
                "made {} s ago, older than the policy's {max} s",
                now.saturating_sub(at)
            ),
        ),
        (Some(at), _) if at > now + 300 => fail("freshness", format!("made in the future ({at})")),
        (Some(at), _) => pass(
            "freshness",
            format!("made {} s ago", now.saturating_sub(at)),
        ),
        (None, Some(max)) => fail(
            "freshness",
            format!(
                "of unknown age (no nonce asked, no time bound), and the policy allows {max} s"
            ),
        ),
        (None, None) => pass(
            "freshness",
            "not checked: no nonce, and the policy sets no maximum age",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binding::report_data;

    /// Freshness and binding on report data as a Veil node would have its TEE sign it (no
    /// published sample carries a Veil binding, so these run on the report data alone).
    #[test]
    fn bound_evidence_is_fresh_for_its_key_until_the_policy_says_it_is_old() {
        let key = b"node key".as_slice();
        let policy = Policy::from_toml("max_age_seconds = 600").unwrap();
        let mut evidence = Evidence::new(TeeKind::Tdx, Vec::new());
        evidence.produced_at = Some(1_000);
        let data = report_data(key, &Freshness::Time(1_000));
        let expect = Expectation {
            peer_key: Some(key),
            nonce: None,
        };
        assert!(binding_check(&data, &expect).passed);
        assert!(freshness_check(&data, &evidence, &policy, &expect, 1_500).passed);
        let old = freshness_check(&data, &evidence, &policy, &expect, 1_601);
        assert!(!old.passed && old.detail.contains("older"), "{old:?}");
        let future = freshness_check(&data, &evidence, &policy, &expect, 0);
        assert!(
            !future.passed && future.detail.contains("future"),
            "{future:?}"
        );
        evidence.produced_at = Some(999);
        assert!(!freshness_check(&data, &evidence, &policy, &expect, 1_500).passed);
        evidence.produced_at = None;
        let unknown = freshness_check(&data, &evidence, &policy, &expect, 1_500);
        assert!(
            !unknown.passed && unknown.detail.contains("unknown age"),
            "{unknown:?}"
        );

        let nonce = [5u8; 32];
        let data = report_data(key, &Freshness::Nonce(nonce));
        let asked = Expectation {
            peer_key: Some(key),
            nonce: Some(nonce),
        };
        assert!(freshness_check(&data, &evidence, &policy, &asked, 1_500).passed);
        let other = Expectation {
            peer_key: Some(b"another key"),
            nonce: Some([6; 32]),
        };
        assert!(!binding_check(&data, &other).passed);
        assert!(!freshness_check(&data, &evidence, &policy, &other, 1_500).passed);
    }
}
