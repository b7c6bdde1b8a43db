//! Prometheus metrics for `/metrics`: one registry per server (no global state, so tests can run
//! several servers in one process).

use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    pub prompt_tokens: Counter<u64, AtomicU64>,
    pub generation_tokens: Counter<u64, AtomicU64>,
    pub queue_depth: Gauge<i64, AtomicI64>,
    pub running: Gauge<i64, AtomicI64>,
    pub open_connections: Gauge<i64, AtomicI64>,
    pub ready: Gauge<i64, AtomicI64>,
    pub time_to_first_token: Histogram,
    pub latency: Histogram,
}

/// Seconds, from 10 ms (a tiny model) to ~5 minutes (long prompts on a 2-core machine).
fn buckets() -> impl Iterator<Item = f64> {
    [
        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    ]
    .into_iter()
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("phi4");
        let requests = Family::<Labels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests by endpoint and status",
            requests.clone(),
        );
        let prompt_tokens = Counter::default();
        registry.register(
            "prompt_tokens",
            "Prompt tokens of accepted requests",
            prompt_tokens.clone(),
        );
        let generation_tokens = Counter::default();
        registry.register(
            "generation_tokens",
            "Tokens generated",
            generation_tokens.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Requests waiting for a batch slot",
            queue_depth.clone(),
        );
        let running = Gauge::default();
        registry.register(
            "running_sequences",
            "Sequences in the decode batch",
            running.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Client connections being served",
            open_connections.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 when the server takes traffic (loaded, not draining)",
            ready.clone(),
        );
        let time_to_first_token = Histogram::new(buckets());
        registry.register(
            "time_to_first_token_seconds",
            "Time from request to first generated token",
            time_to_first_token.clone(),
        );
        let latency = Histogram::new(buckets());
        registry.register(
            "request_latency_seconds",
            "Time from request to last generated token",
            latency.clone(),
        );
        Metrics {
            registry,
            requests,
            prompt_tokens,
            generation_tokens,
            queue_depth,
            running,
            open_connections,
            ready,
            time_to_first_token,
            latency,
        }
    }
}

impl Metrics {
    pub fn count_request(&self, endpoint: &str, status: u16) {
        self.requests
            .get_or_create(&vec![
                ("endpoint".into(), endpoint.into()),
                ("status".into(), status.to_string()),
            ])
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
