//! Obtaining evidence on real hardware through Linux's `configfs-tsm` interface
//! (`Documentation/ABI/testing/configfs-tsm` in the kernel): make a report entry, write the 64
//! bytes of report data to `inblob`, read the signed quote or report from `outblob`, and check
//! `generation` did not move meanwhile (another writer would have changed the request).

use std::path::{Path, PathBuf};

use crate::error::{Result, TeeError};
use crate::evidence::TeeKind;

/// Where the kernel offers the interface.
pub const TSM_REPORT_DIR: &str = "/sys/kernel/config/tsm/report";

/// What the kernel handed back.
#[derive(Debug, Clone, PartialEq)]
pub struct TsmReport {
    /// The TEE, from the entry's `provider`.
    pub kind: TeeKind,
    /// The quote (TDX) or attestation report (SEV-SNP).
    pub outblob: Vec<u8>,
    /// Extra data (SEV-SNP: the certificate table), when the provider gives any.
    pub auxblob: Option<Vec<u8>>,
}

/// Asks the TEE under `root` for evidence carrying `report_data`.
pub fn obtain(root: &Path, report_data: &[u8; 64]) -> Result<TsmReport> {
    let error = |reason: String| TeeError::Tsm {
        path: root.display().to_string(),
        reason,
    };
    if !root.is_dir() {
        return Err(error(
            "not present: this machine offers no TEE report interface".into(),
        ));
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let entry = root.join(format!("veil-{}-{nanos}", std::process::id()));
    std::fs::create_dir(&entry).map_err(|e| error(format!("cannot make a report entry: {e}")))?;
    let result = read_entry(&entry, report_data).map_err(error);
    // configfs removes an entry (and its attribute files) with rmdir alone.
    if std::fs::remove_dir(&entry).is_err() {
        let _ = std::fs::remove_dir_all(&entry);
    }
    result
}

fn read_entry(entry: &Path, report_data: &[u8; 64]) -> std::result::Result<TsmReport, String> {
    let file = |name: &str| -> PathBuf { entry.join(name) };
    let read =
        |name: &str| std::fs::read(file(name)).map_err(|e| format!("cannot read {name}: {e}"));
    std::fs::write(file("inblob"), report_data).map_err(|e| format!("cannot write inblob: {e}"))?;
    // On configfs the attribute files exist as soon as the entry does; a directory that only
    // mimics the layout (tests) may fill them a moment later.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !file("outblob").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let generation = read("generation")?;
    let outblob = read("outblob")?;
    if read("generation")? != generation {
        return Err("the request changed while it was read (another writer?); try again".into());
    }
    if outblob.is_empty() {
        return Err("the TEE returned empty evidence".into());
    }
    let provider = String::from_utf8_lossy(&read("provider")?)
        .trim()
        .to_string();
    let kind = TeeKind::of_provider(&provider)
        .ok_or_else(|| format!("unknown provider {provider:?} (tdx_guest or sev_guest)"))?;
    let auxblob = std::fs::read(file("auxblob"))
        .ok()
        .filter(|b| !b.is_empty());
    Ok(TsmReport {
        kind,
        outblob,
        auxblob,
    })
}

/// Where a node running in a TEE gets its evidence, and what it sends beside each quote so
/// that verifiers need nothing online (DCAP collateral, or the chip's VCEK).
#[derive(Debug, Clone)]
pub struct EvidenceSource {
    /// The configfs-tsm report directory.
    pub report_dir: PathBuf,
    /// Intel's collateral for this platform.
    pub collateral: Option<dcap_qvl::QuoteCollateralV3>,
    /// This chip's VCEK (DER, hex).
    pub vcek: Option<String>,
}

impl EvidenceSource {
    /// A source reading `report_dir`, sending the collateral (JSON) or VCEK (DER or PEM) given.
    pub fn new(
        report_dir: PathBuf,
        collateral: Option<&[u8]>,
        vcek: Option<&[u8]>,
    ) -> Result<Self> {
        // The setters check the files; an evidence value is the simplest holder for them.
        let mut holder = crate::Evidence::new(TeeKind::Tdx, Vec::new());
        if let Some(json) = collateral {
            holder.set_collateral(json)?;
        }
        if let Some(cert) = vcek {
            holder.set_vcek(cert)?;
        }
        Ok(Self {
            report_dir,
            collateral: holder.collateral,
            vcek: holder.vcek,
        })
    }

    /// Evidence naming the node with `public_key` (libp2p, protobuf encoding) and `freshness`.
    pub fn evidence(
        &self,
        public_key: &[u8],
        freshness: crate::Freshness,
    ) -> Result<crate::Evidence> {
        let report = obtain(
            &self.report_dir,
            &crate::report_data(public_key, &freshness),
        )?;
        let mut evidence = crate::Evidence::new(report.kind, report.outblob);
        evidence.collateral = self.collateral.clone();
        evidence.vcek = self.vcek.clone();
        if let crate::Freshness::Time(at) = freshness {
            evidence.produced_at = Some(at);
        }
        Ok(evidence)
    }
}
