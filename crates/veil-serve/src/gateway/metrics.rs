//! The gateway's counters, served at `GET /metrics` in Prometheus' text format.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of a finished request: which endpoint and what status it answered.
type RequestLabels = Vec<(String, String)>;

/// Everything `/metrics` reports.
pub struct GatewayMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    /// Tokens generated, over all requests.
    pub generated_tokens: Counter,
    /// Generations running now: model sessions open. A client that disconnects must bring
    /// this back down.
    pub active_generations: Gauge,
    /// Requests waiting for a generation slot.
    pub queued_requests: Gauge,
    /// Generations stopped because their client went away.
    pub cancelled_generations: Counter,
    /// Sessions open on the swarm's nodes for this gateway's generations.
    pub open_node_sessions: Gauge,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl GatewayMetrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let generated_tokens = Counter::default();
        let active_generations = Gauge::default();
        let queued_requests = Gauge::default();
        let cancelled_generations = Counter::default();
        let open_node_sessions = Gauge::default();
        registry.register(
            "veil_requests",
            "Requests answered, by endpoint and status code",
            requests.clone(),
        );
        registry.register(
            "veil_generated_tokens",
            "Tokens generated",
            generated_tokens.clone(),
        );
        registry.register(
            "veil_active_generations",
            "Generations running now (open model sessions)",
            active_generations.clone(),
        );
        registry.register(
            "veil_queued_requests",
            "Requests waiting for a generation slot",
            queued_requests.clone(),
        );
        registry.register(
            "veil_cancelled_generations",
            "Generations stopped because their client went away",
            cancelled_generations.clone(),
        );
        registry.register(
            "veil_open_node_sessions",
            "Sessions open on the swarm's nodes for this gateway's generations",
            open_node_sessions.clone(),
        );
        Self {
            registry,
            cancelled_generations,
            open_node_sessions,
            requests,
            generated_tokens,
            active_generations,
            queued_requests,
        }
    }

    /// Counts one answered request.
    pub fn answered(&self, endpoint: &str, status: u16) {
        self.requests
            .get_or_create(&vec![
                ("endpoint".to_string(), endpoint.to_string()),
                ("status".to_string(), status.to_string()),
            ])
            .inc();
    }

    /// Reports the key rotations of an encrypted model the gateway runs itself.
    pub fn count_key_rotations(&mut self, (done, failed): (Counter, Counter)) {
        self.registry.register(
            "veil_key_rotations",
            "Keys replaced (the model re-encrypted under a fresh key and swapped in)",
            done,
        );
        self.registry.register(
            "veil_key_rotation_failures",
            "Key rotations that failed; the old key kept serving",
            failed,
        );
    }

    /// The text `/metrics` serves.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
