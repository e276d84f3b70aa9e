//! TEE attestation for Veil nodes.
//!
//! A node running inside Intel TDX or SGX, or AMD SEV-SNP, presents hardware-signed evidence
//! whose report data carries a hash of its libp2p public key and the verifier's nonce, so the
//! evidence proves something about *this* node *now* and cannot be replayed by another. This
//! crate verifies such evidence fully offline with maintained verifiers (`dcap-qvl` for Intel
//! quotes and their collateral, `sev` for AMD reports and their certificate chain), judges it
//! against a policy (allowed measurements, debug off, minimum TCB, maximum age), and obtains
//! evidence on real hardware through Linux `configfs-tsm`.

mod binding;
mod configfs;
mod error;
mod evidence;
mod policy;
mod verify;

pub use binding::{report_data, Freshness};
pub use configfs::{obtain, EvidenceSource, TsmReport, TSM_REPORT_DIR};
pub use error::{Result, TeeError};
pub use evidence::{Evidence, TeeKind, MAX_EVIDENCE_BYTES};
pub use policy::{AllowedMeasurement, AmdTcb, Policy};
pub use verify::{verify, Check, Expectation, Verdict};
