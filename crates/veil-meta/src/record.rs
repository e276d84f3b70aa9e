//! The performance history: one record per measured run, kept in a redb database and
//! exported as JSON lines (one record per line) for the committed dataset and for peers.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{MetaError, Result};
use crate::features::Features;
use crate::method::method;

/// Runs, by sequence number; values are records as JSON.
const RUNS: TableDefinition<u64, &[u8]> = TableDefinition::new("meta_runs");

/// The largest record accepted (a peer's or a file's line).
pub const MAX_RECORD_BYTES: usize = 16 * 1024;

/// One workload run with one method, and what it took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// What it ran on.
    pub features: Features,
    /// The method's name (see [`crate::METHODS`]).
    pub method: String,
    /// Wall time for the whole workload, seconds.
    pub seconds: f64,
    /// Tokens generated over the whole workload.
    pub tokens: u64,
    /// Mean time from a request's arrival to its last token, milliseconds.
    pub latency_ms: f64,
    /// Perplexity of the method's weights on held-out text (the quality cost of a format).
    pub perplexity: f64,
    /// Who measured it.
    pub node: String,
    /// When, seconds since the Unix epoch.
    pub at_unix: u64,
}

impl RunRecord {
    /// Generated tokens per second.
    pub fn throughput(&self) -> f64 {
        self.tokens as f64 / self.seconds
    }

    /// What the run cost per generated token: runtime × the machine's price.
    pub fn cost(&self) -> f64 {
        self.seconds * self.features.hardware.price_per_hour / 3600.0 / self.tokens as f64
    }

    /// Checks a record before it is used or stored.
    pub fn check(&self) -> Result<()> {
        self.features.check()?;
        method(&self.method)?;
        let ok = |x: f64| x.is_finite() && x > 0.0;
        if !ok(self.seconds) || self.tokens == 0 || !ok(self.latency_ms) || !ok(self.perplexity) {
            return Err(MetaError::BadRecord(
                "seconds, tokens, latency and perplexity must be positive".into(),
            ));
        }
        if self.node.len() > 200 {
            return Err(MetaError::BadRecord("node name over 200 characters".into()));
        }
        Ok(())
    }

    /// Parses and checks one JSON record.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(MetaError::BadRecord(format!(
                "{} bytes, over the {MAX_RECORD_BYTES}-byte limit",
                bytes.len()
            )));
        }
        let record: RunRecord =
            serde_json::from_slice(bytes).map_err(|e| MetaError::BadRecord(e.to_string()))?;
        record.check()?;
        Ok(record)
    }
}

/// A node's performance history, in its embedded database.
pub struct RecordStore {
    db: Arc<Database>,
    path: PathBuf,
}

impl RecordStore {
    /// Opens (or creates) the history at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let db = Database::create(path).map_err(|e| MetaError::Database {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::within(Arc::new(db), path)
    }

    /// The history in a database another part of the program already holds open (a node keeps
    /// it beside its identity and peers: redb lets one process open a file once).
    pub fn within(db: Arc<Database>, path: &Path) -> Result<Self> {
        let store = Self {
            db,
            path: path.to_path_buf(),
        };
        let txn = store.db.begin_write().map_err(|e| store.error(e))?;
        txn.open_table(RUNS).map_err(|e| store.error(e))?;
        txn.commit().map_err(|e| store.error(e))?;
        Ok(store)
    }

    /// How many records are kept.
    pub fn len(&self) -> Result<u64> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(RUNS).map_err(|e| self.error(e))?;
        table.len().map_err(|e| self.error(e))
    }

    /// Whether no record is kept.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    fn error(&self, e: impl std::fmt::Display) -> MetaError {
        MetaError::Database {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        }
    }

    /// Adds checked records, in one transaction.
    pub fn append(&self, records: &[RunRecord]) -> Result<()> {
        for r in records {
            r.check()?;
        }
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        {
            let mut table = txn.open_table(RUNS).map_err(|e| self.error(e))?;
            let first = table
                .last()
                .map_err(|e| self.error(e))?
                .map_or(0, |(k, _)| k.value() + 1);
            for (key, r) in (first..).zip(records) {
                let bytes = serde_json::to_vec(r).map_err(|e| self.error(e))?;
                table
                    .insert(key, bytes.as_slice())
                    .map_err(|e| self.error(e))?;
            }
        }
        txn.commit().map_err(|e| self.error(e))
    }

    /// Every record, oldest first.
    pub fn all(&self) -> Result<Vec<RunRecord>> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(RUNS).map_err(|e| self.error(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.error(e))? {
            let (_, value) = entry.map_err(|e| self.error(e))?;
            out.push(RunRecord::from_json(value.value())?);
        }
        Ok(out)
    }
}

/// Writes records as JSON lines.
pub fn write_jsonl(path: &Path, records: &[RunRecord]) -> Result<()> {
    let error = |e: std::io::Error| MetaError::Dataset {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).map_err(error)?);
    for r in records {
        let line = serde_json::to_string(r).map_err(|e| MetaError::BadRecord(e.to_string()))?;
        writeln!(file, "{line}").map_err(error)?;
    }
    file.flush().map_err(error)
}

/// Reads records from JSON lines, checking each; a bad line is an error naming it.
pub fn read_jsonl(path: &Path) -> Result<Vec<RunRecord>> {
    let error = |reason: String| MetaError::Dataset {
        path: path.display().to_string(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| error(e.to_string()))?;
    parse_jsonl(std::io::BufReader::new(file)).map_err(|e| error(e.to_string()))
}

/// Records from JSON lines (blank lines skipped).
pub fn parse_jsonl(reader: impl BufRead) -> Result<Vec<RunRecord>> {
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| MetaError::BadRecord(format!("line {}: {e}", i + 1)))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            RunRecord::from_json(line.as_bytes())
                .map_err(|e| MetaError::BadRecord(format!("line {}: {e}", i + 1)))?,
        );
    }
    Ok(out)
}
