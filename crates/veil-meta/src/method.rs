//! The acceleration methods a request can run with: a catalogue of named configurations.

use crate::error::{MetaError, Result};
use crate::features::WorkloadFeatures;

/// One way to run a workload: the weight format and threads (fixed when the model loads) and
/// the runtime methods (batching, prefix cache, chunked prefill, prompt lookup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Method {
    /// The name users type (`--accel NAME`) and records carry.
    pub name: &'static str,
    /// Weight format: `stored`, `q8_0`, `f16` or `f32`.
    pub format: &'static str,
    /// Decode concurrent requests together (continuous batching).
    pub batch: bool,
    /// Reuse the keys and values of a shared prompt prefix.
    pub prefix_cache: bool,
    /// Run prompts in chunks of this many tokens.
    pub prefill_chunk: Option<usize>,
    /// Draft this many tokens by prompt lookup (greedy requests).
    pub lookup_drafts: Option<usize>,
}

impl Method {
    /// The method this one is on `workload`: a mechanism with nothing to work on (batching a
    /// single request, a prefix cache with nothing shared, chunks longer than the prompt) is
    /// dropped, so two names for the same computation count as one method.
    pub fn on(&'static self, workload: &WorkloadFeatures) -> &'static Method {
        let reduced = Method {
            name: "",
            batch: self.batch && workload.batch > 1,
            prefix_cache: self.prefix_cache && workload.shared_prefix > 0.0,
            prefill_chunk: self
                .prefill_chunk
                .filter(|&c| (workload.prompt_tokens as usize) > c),
            ..*self
        };
        METHODS
            .iter()
            .find(|m| Method { name: "", ..**m } == reduced)
            .unwrap_or(self)
    }

    /// Whether this method is its own on `workload` (nothing in it is idle).
    pub fn applies_to(&'static self, workload: &WorkloadFeatures) -> bool {
        self.on(workload).name == self.name
    }

    /// Whether the method only picks a weight format (no runtime mechanism): what a node
    /// serving steps one at a time runs.
    pub fn is_format_only(&self) -> bool {
        !self.batch
            && !self.prefix_cache
            && self.prefill_chunk.is_none()
            && self.lookup_drafts.is_none()
    }

    const PLAIN: Method = Method {
        name: "plain",
        format: "stored",
        batch: false,
        prefix_cache: false,
        prefill_chunk: None,
        lookup_drafts: None,
    };
}

/// Every method, the default (`plain`: as stored, one request at a time) first.
pub static METHODS: &[Method] = &[
    Method::PLAIN,
    Method {
        name: "q8_0",
        format: "q8_0",
        ..Method::PLAIN
    },
    Method {
        name: "f32",
        format: "f32",
        ..Method::PLAIN
    },
    Method {
        name: "chunked",
        prefill_chunk: Some(128),
        ..Method::PLAIN
    },
    Method {
        name: "batch",
        batch: true,
        ..Method::PLAIN
    },
    Method {
        name: "prefix",
        prefix_cache: true,
        ..Method::PLAIN
    },
    Method {
        name: "lookup",
        lookup_drafts: Some(6),
        ..Method::PLAIN
    },
    Method {
        name: "batch+prefix",
        batch: true,
        prefix_cache: true,
        ..Method::PLAIN
    },
    Method {
        name: "prefix+lookup",
        prefix_cache: true,
        lookup_drafts: Some(6),
        ..Method::PLAIN
    },
    Method {
        name: "q8_0+batch",
        format: "q8_0",
        batch: true,
        ..Method::PLAIN
    },
];

/// The method called `name`.
pub fn method(name: &str) -> Result<&'static Method> {
    METHODS
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| MetaError::UnknownMethod(name.to_string()))
}

/// The default fixed configuration, what runs without a selector.
pub fn default_method() -> &'static Method {
    &METHODS[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        for m in METHODS {
            assert_eq!(method(m.name).unwrap(), m);
            assert_eq!(METHODS.iter().filter(|o| o.name == m.name).count(), 1);
        }
        assert_eq!(default_method().name, "plain");
        assert!(matches!(method("warp"), Err(MetaError::UnknownMethod(_))));
    }

    #[test]
    fn idle_mechanisms_reduce_to_the_simpler_method() {
        let workload = |batch, shared, prompt| WorkloadFeatures {
            prompt_tokens: prompt,
            output_tokens: 16,
            batch,
            shared_prefix: shared,
            rewrite: false,
        };
        let on = |name: &str, w: &WorkloadFeatures| method(name).unwrap().on(w).name;
        let single = workload(1, 0.0, 40);
        assert_eq!(on("batch", &single), "plain");
        assert_eq!(on("batch+prefix", &single), "plain");
        assert_eq!(on("prefix+lookup", &single), "lookup");
        assert_eq!(on("q8_0+batch", &single), "q8_0");
        assert_eq!(on("chunked", &single), "plain");
        assert_eq!(on("lookup", &single), "lookup");
        let busy = workload(4, 0.7, 400);
        for m in METHODS {
            assert!(m.applies_to(&busy), "{}", m.name);
        }
        assert_eq!(on("batch+prefix", &workload(4, 0.0, 40)), "batch");
    }
}
