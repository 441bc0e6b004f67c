//! Prometheus metrics, served as text on the operations listener. Labels carry route templates,
//! algorithms and outcomes, never ids, names or hashes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// The daemon's metrics.
#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    http_requests: IntCounterVec,
    http_latency: HistogramVec,
    hsm_latency: HistogramVec,
    signatures: IntCounterVec,
    audit_append_latency: HistogramVec,
    pub(crate) pending_requests: IntGauge,
    pub(crate) checkpoint_age: IntGauge,
    pub(crate) audit_tree_size: IntGauge,
    /// How long the last lifecycle sweep took, and when it ended.
    pub(crate) sweep_duration: prometheus::Gauge,
    pub(crate) sweep_last_run: IntGauge,
    pub(crate) leader: IntGauge,
    /// 1 while the daemon waits for the officers' unseal shares.
    pub(crate) sealed: IntGauge,
    connections_open: IntGaugeVec,
    connections_closed: IntCounterVec,
    rate_limited: IntCounterVec,
    client_crl_next_update: IntGauge,
    /// HSM jobs waiting, by lane (`signing`, `background`).
    pub(crate) hsm_queued: IntGaugeVec,
    /// Signatures with a wrapped key, by whether a worker had it unwrapped already.
    hsm_key_cache: IntCounterVec,
    /// Store writes that succeeded, and the commits (fsyncs) that made them durable.
    store_writes: prometheus::IntCounter,
    store_commits: prometheus::IntCounter,
    store_round_trips: prometheus::IntCounter,
    /// Serialises [`Metrics::key_cache`]'s catch-up of concurrent scrapes.
    catch_up_lock: Arc<std::sync::Mutex<()>>,
    status: Arc<StatusMetrics>,
}

/// What the certificate status checker reports: cache use, CA requests and the CRL's age.
#[derive(Debug)]
pub(crate) struct StatusMetrics {
    cache: IntCounterVec,
    ca_latency: HistogramVec,
    ca_errors: IntCounterVec,
    crl_age: IntGauge,
    /// Whether the latest request to the CA (CMP, OCSP or CRL) succeeded, for `/readyz`.
    last_ok: AtomicBool,
}

impl StatusMetrics {
    /// `None` while the CA answers; otherwise why not.
    pub(crate) fn problem(&self) -> Option<String> {
        (!self.last_ok.load(Ordering::Relaxed))
            .then(|| "the latest request to the CA (CMP, OCSP or CRL) failed".to_owned())
    }
}

impl ca_bridge::status::StatusObserver for StatusMetrics {
    fn cache_lookup(&self, hit: bool) {
        self.cache
            .with_label_values(&[if hit { "hit" } else { "miss" }])
            .inc();
    }

    fn ca_request(&self, kind: &'static str, elapsed: Duration, ok: bool) {
        self.ca_latency
            .with_label_values(&[kind])
            .observe(elapsed.as_secs_f64());
        if !ok {
            self.ca_errors.with_label_values(&[kind]).inc();
        }
        self.last_ok.store(ok, Ordering::Relaxed);
    }

    fn crl_age(&self, age: Duration) {
        self.crl_age
            .set(i64::try_from(age.as_secs()).unwrap_or(i64::MAX));
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// A request method as a label: the methods the API uses, every other one as `other`, so that
/// no label value comes from a client.
fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        _ => "other",
    }
}

impl Metrics {
    pub(crate) fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("smartsign".into()), None)?;
        let http_requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "API requests by route template and status",
            ),
            &["route", "method", "status"],
        )?;
        let http_latency = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "API request latency by route template",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "method"],
        )?;
        let hsm_latency = HistogramVec::new(
            HistogramOpts::new(
                "hsm_operation_duration_seconds",
                "HSM operation latency as the daemon sees it",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["operation"],
        )?;
        let signatures = IntCounterVec::new(
            Opts::new(
                "signatures_total",
                "User signatures by algorithm and outcome",
            ),
            &["algorithm", "outcome"],
        )?;
        let audit_append_latency = HistogramVec::new(
            HistogramOpts::new(
                "audit_append_duration_seconds",
                "Time for an audit record to become durable",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["event"],
        )?;
        let pending_requests = IntGauge::new(
            "signing_requests_pending",
            "Signing requests waiting for the user's authorisation",
        )?;
        let checkpoint_age = IntGauge::new(
            "audit_checkpoint_age_seconds",
            "Seconds since the latest signed audit checkpoint",
        )?;
        let audit_tree_size = IntGauge::new("audit_tree_size", "Records in the audit log")?;
        let sweep_duration = prometheus::Gauge::new(
            "sweep_duration_seconds",
            "How long the last lifecycle sweep run took",
        )?;
        let sweep_last_run = IntGauge::new(
            "sweep_last_run_timestamp_seconds",
            "When the last lifecycle sweep run that finished ended (unix time, daemon clock)",
        )?;
        let leader = IntGauge::new(
            "leader",
            "1 while this node runs the sweeps and signs the audit checkpoints (always, on SQLite)",
        )?;
        let sealed = IntGauge::new(
            "sealed",
            "1 while the daemon is sealed, waiting for the officers' unseal shares",
        )?;
        let connections_open = IntGaugeVec::new(
            Opts::new("connections_open", "Open connections by listener"),
            &["listener"],
        )?;
        let connections_closed = IntCounterVec::new(
            Opts::new(
                "connections_cut_total",
                "Connections the daemon closed on a client, by listener and reason \
                 (per_address, handshake_timeout, handshake_failed, idle)",
            ),
            &["listener", "reason"],
        )?;
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "rate_limited_total",
                "API requests refused with rate_limited, by role and limit (rate or concurrency)",
            ),
            &["role", "limit"],
        )?;
        let client_crl_next_update = IntGauge::new(
            "client_crl_next_update_timestamp_seconds",
            "nextUpdate of the client CRL in force (Unix time; 0 without one): past it, every \
             API handshake fails until a fresh CRL is loaded (SIGHUP)",
        )?;
        let hsm_queued = IntGaugeVec::new(
            Opts::new(
                "hsm_queued_jobs",
                "HSM jobs waiting for a worker, by lane: signing (user signatures, served first) \
                 or background (CA, OCSP, CRL, checkpoints)",
            ),
            &["lane"],
        )?;
        let hsm_key_cache = IntCounterVec::new(
            Opts::new(
                "hsm_key_cache_total",
                "Signatures with a wrapped user key, by result: hit (a worker had the key \
                 unwrapped) or miss (it was unwrapped for this signature)",
            ),
            &["result"],
        )?;
        let store_writes = prometheus::IntCounter::new(
            "store_writes_total",
            "Store writes that succeeded (each all or nothing)",
        )?;
        let store_commits = prometheus::IntCounter::new(
            "store_commits_total",
            "Store commits, each one fsync: writes waiting together share one (group commit)",
        )?;
        let store_round_trips = prometheus::IntCounter::new(
            "store_round_trips_total",
            "Round trips to the PostgreSQL server (one a statement, two a transaction)",
        )?;
        let status = Arc::new(StatusMetrics {
            cache: IntCounterVec::new(
                Opts::new(
                    "status_cache_total",
                    "Certificate status lookups by cache result (hit or miss)",
                ),
                &["result"],
            )?,
            ca_latency: HistogramVec::new(
                HistogramOpts::new(
                    "ca_request_duration_seconds",
                    "Latency of requests to the CA, by kind (cmp, ocsp or crl)",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["kind"],
            )?,
            ca_errors: IntCounterVec::new(
                Opts::new(
                    "ca_request_errors_total",
                    "Failed requests to the CA, by kind (cmp, ocsp or crl)",
                ),
                &["kind"],
            )?,
            crl_age: IntGauge::new(
                "crl_age_seconds",
                "Seconds since the thisUpdate of the latest CRL fetched",
            )?,
            last_ok: AtomicBool::new(true),
        });
        // The error and refusal counters exist from the start at zero, so that alert rules and
        // dashboards find them before the first failure (and a rate over them is 0, not empty).
        for kind in ["cmp", "ocsp", "crl"] {
            status.ca_errors.with_label_values(&[kind]);
        }
        for role in ["registrar", "service", "gateway", "officer", "auditor"] {
            for limit in ["rate", "concurrency"] {
                rate_limited.with_label_values(&[role, limit]);
            }
        }
        for listener in ["api", "operations"] {
            for reason in [
                "per_address",
                "handshake_timeout",
                "handshake_failed",
                "idle",
            ] {
                connections_closed.with_label_values(&[listener, reason]);
            }
        }
        registry.register(Box::new(status.cache.clone()))?;
        registry.register(Box::new(status.ca_latency.clone()))?;
        registry.register(Box::new(status.ca_errors.clone()))?;
        registry.register(Box::new(status.crl_age.clone()))?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_latency.clone()))?;
        registry.register(Box::new(hsm_latency.clone()))?;
        registry.register(Box::new(signatures.clone()))?;
        registry.register(Box::new(audit_append_latency.clone()))?;
        registry.register(Box::new(pending_requests.clone()))?;
        registry.register(Box::new(checkpoint_age.clone()))?;
        registry.register(Box::new(audit_tree_size.clone()))?;
        registry.register(Box::new(sealed.clone()))?;
        registry.register(Box::new(connections_open.clone()))?;
        registry.register(Box::new(connections_closed.clone()))?;
        registry.register(Box::new(rate_limited.clone()))?;
        registry.register(Box::new(client_crl_next_update.clone()))?;
        registry.register(Box::new(hsm_queued.clone()))?;
        registry.register(Box::new(hsm_key_cache.clone()))?;
        registry.register(Box::new(sweep_duration.clone()))?;
        registry.register(Box::new(store_writes.clone()))?;
        registry.register(Box::new(store_commits.clone()))?;
        registry.register(Box::new(store_round_trips.clone()))?;
        registry.register(Box::new(sweep_last_run.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        Ok(Self {
            registry,
            http_requests,
            http_latency,
            hsm_latency,
            signatures,
            audit_append_latency,
            pending_requests,
            checkpoint_age,
            audit_tree_size,
            sealed,
            connections_open,
            connections_closed,
            rate_limited,
            client_crl_next_update,
            hsm_queued,
            hsm_key_cache,
            sweep_duration,
            sweep_last_run,
            leader,
            store_writes,
            store_commits,
            store_round_trips,
            catch_up_lock: Arc::new(std::sync::Mutex::new(())),
            status,
        })
    }

    /// Brings the counters kept by the parts up to their counts since open: the adapter's
    /// wrapped-key cache (hits, misses) and the store's (writes, commits).
    pub(crate) fn catch_up(
        &self,
        key_cache: (u64, u64),
        store: Option<(u64, u64)>,
        round_trips: Option<u64>,
    ) {
        let _serial = self
            .catch_up_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (hits, misses) = key_cache;
        for (label, count) in [("hit", hits), ("miss", misses)] {
            let counter = self.hsm_key_cache.with_label_values(&[label]);
            counter.inc_by(count.saturating_sub(counter.get()));
        }
        if let Some((writes, commits)) = store {
            for (counter, count) in [(&self.store_writes, writes), (&self.store_commits, commits)] {
                counter.inc_by(count.saturating_sub(counter.get()));
            }
        }
        if let Some(count) = round_trips {
            let counter = &self.store_round_trips;
            counter.inc_by(count.saturating_sub(counter.get()));
        }
    }

    /// What `GET /v1/admin/status` reports of the counters: the wrapped-key cache, the CA and
    /// the certificate status cache, the last lifecycle sweep.
    pub(crate) fn status_report(&self) -> serde_json::Value {
        let count = |vec: &IntCounterVec, label: &str| vec.with_label_values(&[label]).get();
        let last_sweep = self.sweep_last_run.get();
        serde_json::json!({
            "key_cache": {
                "hits": count(&self.hsm_key_cache, "hit"),
                "misses": count(&self.hsm_key_cache, "miss"),
            },
            "ca": {
                "ok": self.status.problem().is_none(),
                "problem": self.status.problem(),
                "errors": {
                    "cmp": count(&self.status.ca_errors, "cmp"),
                    "ocsp": count(&self.status.ca_errors, "ocsp"),
                    "crl": count(&self.status.ca_errors, "crl"),
                },
                "crl_age_seconds": self.status.crl_age.get(),
            },
            "status_cache": {
                "hits": count(&self.status.cache, "hit"),
                "misses": count(&self.status.cache, "miss"),
            },
            "sweep": {
                "last_run": (last_sweep > 0)
                    .then(|| time::OffsetDateTime::from_unix_timestamp(last_sweep).ok())
                    .flatten()
                    .map(crate::accounts::rfc3339),
                "duration_seconds": self.sweep_duration.get(),
            },
        })
    }

    /// A CMP transaction with the CA (issue or revoke), in the same series as the status
    /// requests (`kind="cmp"`).
    pub(crate) fn observe_cmp(&self, elapsed: Duration, ok: bool) {
        use ca_bridge::status::StatusObserver as _;
        self.status.ca_request("cmp", elapsed, ok);
    }

    /// The status checker's observer.
    pub(crate) fn status(&self) -> Arc<StatusMetrics> {
        Arc::clone(&self.status)
    }

    pub(crate) fn observe_request(
        &self,
        route: &str,
        method: &str,
        status: u16,
        elapsed: Duration,
    ) {
        let method = method_label(method);
        self.http_requests
            .with_label_values(&[route, method, &status.to_string()])
            .inc();
        self.http_latency
            .with_label_values(&[route, method])
            .observe(elapsed.as_secs_f64());
    }

    /// A connection opened (`+1`) or closed (`-1`) on `listener`.
    pub(crate) fn connection(&self, listener: &'static str, delta: i64) {
        self.connections_open
            .with_label_values(&[listener])
            .add(delta);
    }

    /// A connection the daemon cut: a fixed `reason`, never anything from the client.
    pub(crate) fn connection_cut(&self, listener: &'static str, reason: &'static str) {
        self.connections_closed
            .with_label_values(&[listener, reason])
            .inc();
    }

    /// A request refused with `rate_limited`.
    pub(crate) fn count_rate_limited(&self, role: &'static str, limit: &'static str) {
        self.rate_limited.with_label_values(&[role, limit]).inc();
    }

    /// The client CRL now in force, by its nextUpdate.
    pub(crate) fn client_crl_loaded(&self, next_update: Option<std::time::SystemTime>) {
        let seconds = next_update
            .and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |since| {
                i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
            });
        self.client_crl_next_update.set(seconds);
    }

    pub(crate) fn observe_hsm(&self, operation: &str, elapsed: Duration) {
        self.hsm_latency
            .with_label_values(&[operation])
            .observe(elapsed.as_secs_f64());
    }

    pub(crate) fn count_signature(&self, algorithm: &str, outcome: &str) {
        self.signatures
            .with_label_values(&[algorithm, outcome])
            .inc();
    }

    pub(crate) fn observe_audit(&self, event: &str, elapsed: Duration) {
        self.audit_append_latency
            .with_label_values(&[event])
            .observe(elapsed.as_secs_f64());
    }

    /// The Prometheus text exposition.
    pub(crate) fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail on I/O; a metric that fails to encode is left out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}
