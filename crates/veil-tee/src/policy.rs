//! What a verifier accepts: a TOML file naming the allowed measurements, whether debug mode is
//! acceptable, the minimum TCB and how old evidence may be.
//!
//! ```toml
//! allow_debug = false                 # the default
//! max_age_seconds = 3600              # evidence made unasked must be younger than this
//! intel_tcb_statuses = ["UpToDate"]   # the default; dcap-qvl's status names
//!
//! [amd_min_tcb]                       # SEV-SNP: the reported TCB must reach each of these
//! bootloader = 3
//! tee = 0
//! snp = 8
//! microcode = 115
//!
//! [[measurement]]                     # one per allowed image; kind: tdx, sgx or sev-snp
//! kind = "tdx"
//! value = "<MRTD, 96 hex digits>"
//! note = "veil node image 1.2"
//! ```

use serde::{Deserialize, Serialize};

use crate::error::{Result, TeeError};
use crate::evidence::TeeKind;

/// Intel's TCB statuses, as dcap-qvl names them.
const INTEL_STATUSES: [&str; 9] = [
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
    "TDRelaunchAdvised",
    "TDRelaunchAdvisedConfigurationNeeded",
];

/// A verifier's policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Accept evidence from a TEE in debug mode (whose memory the host can read).
    #[serde(default)]
    pub allow_debug: bool,
    /// How old evidence made without a verifier's nonce may be, in seconds; unset, such
    /// evidence is refused as of unknown age.
    #[serde(default)]
    pub max_age_seconds: Option<u64>,
    /// Intel TCB statuses accepted.
    #[serde(default = "up_to_date")]
    pub intel_tcb_statuses: Vec<String>,
    /// The lowest AMD TCB accepted.
    #[serde(default)]
    pub amd_min_tcb: Option<AmdTcb>,
    /// The measurements accepted; a kind with none listed is refused.
    #[serde(default)]
    pub measurement: Vec<AllowedMeasurement>,
}

fn up_to_date() -> Vec<String> {
    vec!["UpToDate".into()]
}

/// An AMD TCB version: the security patch level of each firmware part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmdTcb {
    /// PSP bootloader.
    pub bootloader: u8,
    /// PSP OS (TEE).
    pub tee: u8,
    /// SNP firmware.
    pub snp: u8,
    /// CPU microcode.
    pub microcode: u8,
}

impl AmdTcb {
    /// Whether every part reaches `min`'s level.
    pub fn reaches(&self, min: &AmdTcb) -> bool {
        self.bootloader >= min.bootloader
            && self.tee >= min.tee
            && self.snp >= min.snp
            && self.microcode >= min.microcode
    }
}

impl std::fmt::Display for AmdTcb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "bootloader {} tee {} snp {} microcode {}",
            self.bootloader, self.tee, self.snp, self.microcode
        )
    }
}

/// One accepted measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowedMeasurement {
    /// The TEE it is for.
    pub kind: TeeKind,
    /// The measurement, hex (MRTD for TDX, MRENCLAVE for SGX, MEASUREMENT for SEV-SNP).
    pub value: String,
    /// What it is, for people reading the policy.
    #[serde(default)]
    pub note: Option<String>,
}

impl Policy {
    /// Reads and checks a policy.
    pub fn from_toml(text: &str) -> Result<Self> {
        let mut policy: Policy =
            toml::from_str(text).map_err(|e| TeeError::BadPolicy(e.to_string()))?;
        for status in &policy.intel_tcb_statuses {
            if !INTEL_STATUSES.contains(&status.as_str()) {
                return Err(TeeError::BadPolicy(format!(
                    "unknown Intel TCB status {status:?} (one of {})",
                    INTEL_STATUSES.join(", ")
                )));
            }
        }
        for m in &mut policy.measurement {
            m.value = m.value.trim().to_ascii_lowercase();
            let want = m.kind.measurement_len() * 2;
            if m.value.len() != want || !m.value.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(TeeError::BadPolicy(format!(
                    "a {} {} is {want} hex digits, not {:?}",
                    m.kind,
                    m.kind.measurement_name(),
                    m.value
                )));
            }
        }
        Ok(policy)
    }

    /// Whether `measurement` (hex) is allowed for `kind`, and if not, why.
    pub(crate) fn allows(
        &self,
        kind: TeeKind,
        measurement: &str,
    ) -> std::result::Result<String, String> {
        let listed: Vec<_> = self.measurement.iter().filter(|m| m.kind == kind).collect();
        if listed.is_empty() {
            return Err(format!("the policy allows no {kind} measurement"));
        }
        match listed.iter().find(|m| m.value == measurement) {
            Some(m) => Ok(match &m.note {
                Some(note) => format!("{} on the allow-list ({note})", kind.measurement_name()),
                None => format!("{} on the allow-list", kind.measurement_name()),
            }),
            None => Err(format!(
                "{} {measurement} is not on the allow-list",
                kind.measurement_name()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_reads_with_defaults_and_refuses_mistakes() {
        let policy = Policy::from_toml("").unwrap();
        assert!(!policy.allow_debug);
        assert_eq!(policy.intel_tcb_statuses, ["UpToDate"]);
        assert!(policy.allows(TeeKind::Tdx, "00").is_err());

        let sgx = "ab".repeat(32);
        let policy = Policy::from_toml(&format!(
            "[[measurement]]\nkind = \"sgx\"\nvalue = \"{}\"\nnote = \"v1\"\n",
            sgx.to_uppercase()
        ))
        .unwrap();
        assert!(policy.allows(TeeKind::Sgx, &sgx).unwrap().contains("v1"));
        assert!(policy.allows(TeeKind::Sgx, &"cd".repeat(32)).is_err());
        assert!(policy.allows(TeeKind::Tdx, &"ab".repeat(48)).is_err());

        for (bad, says) in [
            ("allow_debug = \"yes\"", "invalid type"),
            ("unknown = 1", "unknown field"),
            (
                "intel_tcb_statuses = [\"Fine\"]",
                "unknown Intel TCB status",
            ),
            (
                "[[measurement]]\nkind = \"tdx\"\nvalue = \"abcd\"",
                "96 hex digits",
            ),
            (
                "[[measurement]]\nkind = \"nitro\"\nvalue = \"abcd\"",
                "unknown variant",
            ),
        ] {
            let err = Policy::from_toml(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn amd_tcb_must_reach_every_part() {
        let min = AmdTcb {
            bootloader: 3,
            tee: 0,
            snp: 8,
            microcode: 115,
        };
        assert!(AmdTcb {
            bootloader: 3,
            tee: 0,
            snp: 8,
            microcode: 115
        }
        .reaches(&min));
        assert!(AmdTcb {
            bootloader: 4,
            tee: 1,
            snp: 9,
            microcode: 200
        }
        .reaches(&min));
        assert!(!AmdTcb {
            bootloader: 9,
            tee: 9,
            snp: 7,
            microcode: 200
        }
        .reaches(&min));
    }
}
