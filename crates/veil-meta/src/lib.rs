//! MetaInf: learn from recorded runs which acceleration method serves a model, machine and
//! workload fastest, and pick it for each request.
//!
//! Pure logic and the run database; no model code. The runtime methods live in `veil-model`,
//! the sweep that measures them (`veil meta collect`) in the `veil` binary.

mod error;
mod eval;
mod features;
mod method;
mod record;
mod selector;

pub use error::{MetaError, Result};
pub use eval::{evaluate, HeldOut, Miss, Score};
pub use features::{Features, HardwareFeatures, ModelFeatures, WorkloadFeatures};
pub use method::{default_method, method, Method, METHODS};
pub use record::{parse_jsonl, read_jsonl, write_jsonl, RecordStore, RunRecord, MAX_RECORD_BYTES};
pub use selector::{cases, Case, Chooser, CostModel, Learner, SelectionRules, Selector};
