//! Evidence as a node presents it: the quote (Intel) or attestation report (AMD), and what an
//! offline verifier needs beside it (DCAP collateral, or the chip's VCEK certificate).

use std::fmt;
use std::str::FromStr;

use dcap_qvl::QuoteCollateralV3;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TeeError};

/// The largest evidence file or message accepted (a quote is ~5 KiB, collateral ~20 KiB).
pub const MAX_EVIDENCE_BYTES: usize = 256 * 1024;

/// Size of an AMD SEV-SNP `ATTESTATION_REPORT`.
const SNP_REPORT_BYTES: usize = 0x4A0;

/// Which trusted execution environment made the evidence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TeeKind {
    /// Intel TDX (a trust domain: a confidential VM).
    Tdx,
    /// Intel SGX (an enclave).
    Sgx,
    /// AMD SEV-SNP (a confidential VM).
    SevSnp,
}

impl TeeKind {
    /// Recognises a raw quote or report by its header.
    pub fn detect(quote: &[u8]) -> Option<Self> {
        if quote.len() == SNP_REPORT_BYTES {
            let version = u32::from_le_bytes(quote[..4].try_into().ok()?);
            return (2..=5).contains(&version).then_some(Self::SevSnp);
        }
        if quote.len() < 48 {
            return None;
        }
        let version = u16::from_le_bytes([quote[0], quote[1]]);
        let tee_type = u32::from_le_bytes(quote[4..8].try_into().ok()?);
        match (version, tee_type) {
            (3..=5, 0) => Some(Self::Sgx),
            (4..=5, 0x81) => Some(Self::Tdx),
            _ => None,
        }
    }

    /// The kind a configfs-tsm provider name stands for.
    pub fn of_provider(provider: &str) -> Option<Self> {
        match provider.trim() {
            "tdx_guest" => Some(Self::Tdx),
            "sev_guest" => Some(Self::SevSnp),
            _ => None,
        }
    }

    /// What the policy's measurement of this kind is called.
    pub fn measurement_name(self) -> &'static str {
        match self {
            Self::Tdx => "MRTD",
            Self::Sgx => "MRENCLAVE",
            Self::SevSnp => "MEASUREMENT",
        }
    }

    /// Bytes in this kind's measurement.
    pub fn measurement_len(self) -> usize {
        match self {
            Self::Sgx => 32,
            Self::Tdx | Self::SevSnp => 48,
        }
    }
}

impl fmt::Display for TeeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tdx => "tdx",
            Self::Sgx => "sgx",
            Self::SevSnp => "sev-snp",
        })
    }
}

impl FromStr for TeeKind {
    type Err = TeeError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tdx" => Ok(Self::Tdx),
            "sgx" => Ok(Self::Sgx),
            "sev-snp" => Ok(Self::SevSnp),
            _ => Err(TeeError::BadEvidence(format!(
                "unknown TEE kind {s:?} (tdx, sgx or sev-snp)"
            ))),
        }
    }
}

/// A node's evidence and what verifying it offline needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evidence {
    /// Which TEE made it.
    pub kind: TeeKind,
    /// The quote (TDX, SGX) or attestation report (SEV-SNP), as the hardware signed it.
    #[serde(with = "hex::serde")]
    pub quote: Vec<u8>,
    /// Intel's collateral for the quote (TCB info, QE identity, CRLs, issuer chains).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collateral: Option<QuoteCollateralV3>,
    /// The chip's VCEK certificate (DER, hex) for a SEV-SNP report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcek: Option<String>,
    /// When the node made the evidence unasked (Unix seconds), bound into its report data;
    /// absent when it answers a verifier's nonce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub produced_at: Option<u64>,
}

impl Evidence {
    /// Evidence of `kind` around a raw quote or report.
    pub fn new(kind: TeeKind, quote: Vec<u8>) -> Self {
        Self {
            kind,
            quote,
            collateral: None,
            vcek: None,
            produced_at: None,
        }
    }

    /// Reads an evidence file: a JSON bundle (as `veil node` presents it), or a bare quote or
    /// report, binary or hex, whose kind is read from its header.
    pub fn read(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_EVIDENCE_BYTES {
            return Err(TeeError::BadEvidence(format!(
                "{} bytes, over the {MAX_EVIDENCE_BYTES}-byte limit",
                bytes.len()
            )));
        }
        let text = std::str::from_utf8(bytes).ok().map(str::trim);
        if let Some(json) = text.filter(|t| t.starts_with('{')) {
            let evidence: Self = serde_json::from_str(json)
                .map_err(|e| TeeError::BadEvidence(format!("not an evidence bundle: {e}")))?;
            evidence.check_kind()?;
            return Ok(evidence);
        }
        let quote =
            match text.filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_hexdigit())) {
                Some(hex_text) => hex::decode(hex_text)
                    .map_err(|e| TeeError::BadEvidence(format!("bad hex: {e}")))?,
                None => bytes.to_vec(),
            };
        let kind = TeeKind::detect(&quote).ok_or_else(|| {
            TeeError::BadEvidence(
                "neither a DCAP quote (SGX, TDX) nor a SEV-SNP report: the header matches none"
                    .into(),
            )
        })?;
        Ok(Self::new(kind, quote))
    }

    /// The evidence as a JSON bundle.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Takes DCAP collateral from a JSON file's contents.
    pub fn set_collateral(&mut self, json: &[u8]) -> Result<()> {
        let collateral = serde_json::from_slice(json)
            .map_err(|e| TeeError::BadEvidence(format!("not DCAP collateral: {e}")))?;
        self.collateral = Some(collateral);
        Ok(())
    }

    /// Takes the VCEK certificate (DER, or PEM).
    pub fn set_vcek(&mut self, cert: &[u8]) -> Result<()> {
        let der = match std::str::from_utf8(cert) {
            Ok(text) if text.contains("-----BEGIN") => sev::certs::snp::Certificate::from_pem(cert)
                .and_then(|c| c.to_der())
                .map_err(|e| TeeError::BadEvidence(format!("bad VCEK PEM: {e}")))?,
            _ => cert.to_vec(),
        };
        self.vcek = Some(hex::encode(der));
        Ok(())
    }

    fn check_kind(&self) -> Result<()> {
        match TeeKind::detect(&self.quote) {
            Some(kind) if kind == self.kind => Ok(()),
            Some(kind) => Err(TeeError::BadEvidence(format!(
                "the bundle says {} but the quote is {kind}",
                self.kind
            ))),
            None => Err(TeeError::BadEvidence(format!(
                "the bundle's quote is not a {} quote or report",
                self.kind
            ))),
        }
    }
}
