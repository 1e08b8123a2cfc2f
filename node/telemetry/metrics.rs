//! Every metric tether reports, in one place. Instruments come from the
//! global meter provider (a no-op one when telemetry is off) and are made
//! once; what the node already counts (open connections, health state,
//! generations) is read by observable gauges at collection time rather
//! than counted again on the request path.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use opentelemetry::metrics::{Counter, Histogram, Meter};
use opentelemetry::KeyValue;

use crate::events::{ConfigSource, Health};

fn meter() -> Meter {
    opentelemetry::global::meter("tether")
}

/// Request duration buckets, in seconds: 0.5 ms … 30 s.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub struct NodeMetrics {
    /// By listener, route, upstream, status class.
    pub requests: Counter<u64>,
    pub request_duration: Histogram<f64>,
    /// By upstream server, check kind and result.
    pub health_checks: Counter<u64>,
    /// By result (`applied`, `invalid`, `bind`, …) and source.
    pub config_applies: Counter<u64>,
    pub config_apply_duration: Histogram<f64>,
    pub access_log_dropped: Counter<u64>,
}

pub fn node() -> &'static NodeMetrics {
    static METRICS: OnceLock<NodeMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let meter = meter();
        NodeMetrics {
            requests: meter
                .u64_counter("tether.requests")
                .with_description(
                    "Requests answered, by listener, route, upstream and status class",
                )
                .build(),
            request_duration: meter
                .f64_histogram("tether.request.duration")
                .with_unit("s")
                .with_description("Time from the request to its response headers")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            health_checks: meter
                .u64_counter("tether.health_checks")
                .with_description("Active health check results")
                .build(),
            config_applies: meter
                .u64_counter("tether.config.applies")
                .with_description("Config applies (start, reloads, pushes) by result")
                .build(),
            config_apply_duration: meter
                .f64_histogram("tether.config.apply.duration")
                .with_unit("s")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            access_log_dropped: meter
                .u64_counter("tether.access_log.dropped")
                .with_description("Access log lines dropped because the writer fell behind")
                .build(),
        }
    })
}

/// Bytes from (`received`) and to (`sent`) the clients of one listener
/// name, kept across generations so the counter only goes up.
#[derive(Default)]
pub struct ByteCounters {
    pub received: AtomicU64,
    pub sent: AtomicU64,
}

fn byte_registry() -> &'static Mutex<BTreeMap<String, Arc<ByteCounters>>> {
    static REGISTRY: OnceLock<Mutex<BTreeMap<String, Arc<ByteCounters>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

pub fn byte_counters(listener: &str) -> Arc<ByteCounters> {
    let mut registry = byte_registry().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(counters) = registry.get(listener) {
        return counters.clone();
    }
    let counters = Arc::new(ByteCounters::default());
    registry.insert(listener.to_owned(), counters.clone());
    counters
}

/// The HTTP status class label: "2xx", "5xx"…
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Gauges read from the node's state at each collection.
/// What the node's gauges read. The supervisor's handle provides it, so
/// that telemetry stays below everything that records into it.
pub trait NodeGauges: Send + Sync + 'static {
    /// Calls `each` with (upstream, server, health) for every server of
    /// the generation in force.
    fn each_server_health(&self, each: &mut dyn FnMut(&str, String, Health));
    /// The generation in force: number, config version, source.
    fn generation(&self) -> Option<(u64, String, ConfigSource)>;
    /// Retired generations still draining.
    fn draining(&self) -> u64;
    /// Calls `each` with (listener, open connections), draining
    /// generations included (a listener may appear more than once).
    fn each_listener_connections(&self, each: &mut dyn FnMut(&str, u64));
}

pub fn observe_node(node: Arc<dyn NodeGauges>) {
    let meter = meter();
    let handle = node.clone();
    meter
        .i64_observable_gauge("tether.upstream.server.health")
        .with_description("1 healthy, 0 unhealthy, -1 not yet checked")
        .with_callback(move |observer| {
            handle.each_server_health(&mut |upstream, server, health| {
                let value = match health {
                    Health::Healthy => 1,
                    Health::Unhealthy => 0,
                    Health::Unknown => -1,
                };
                observer.observe(
                    value,
                    &[
                        KeyValue::new("upstream", upstream.to_owned()),
                        KeyValue::new("server", server),
                    ],
                );
            });
        })
        .build();
    let handle = node.clone();
    meter
        .u64_observable_gauge("tether.config.generation")
        .with_description("The generation in force, labelled with its config version and source")
        .with_callback(move |observer| {
            if let Some((number, version, source)) = handle.generation() {
                let source = match source {
                    ConfigSource::Controller(_) => "controller",
                    ConfigSource::File(_) => "file",
                    ConfigSource::Inline => "inline",
                };
                observer.observe(
                    number,
                    &[
                        KeyValue::new("version", version),
                        KeyValue::new("source", source),
                    ],
                );
            }
        })
        .build();
    meter
        .u64_observable_counter("tether.bytes")
        .with_unit("By")
        .with_description("Bytes from clients (in) and to clients (out), by listener")
        .with_callback(|observer| {
            let registry = byte_registry().lock().unwrap_or_else(|e| e.into_inner());
            for (listener, counters) in registry.iter() {
                for (direction, count) in [("in", &counters.received), ("out", &counters.sent)] {
                    observer.observe(
                        count.load(Ordering::Relaxed),
                        &[
                            KeyValue::new("listener", listener.clone()),
                            KeyValue::new("direction", direction),
                        ],
                    );
                }
            }
        })
        .build();
    let handle = node.clone();
    meter
        .u64_observable_gauge("tether.generations.draining")
        .with_description("Retired generations still draining")
        .with_callback(move |observer| observer.observe(handle.draining(), &[]))
        .build();
    let handle = node;
    meter
        .u64_observable_gauge("tether.connections.active")
        .with_description("Open client connections, by listener (draining generations included)")
        .with_callback(move |observer| {
            let mut by_listener: std::collections::BTreeMap<String, u64> = Default::default();
            handle.each_listener_connections(&mut |listener, open| {
                *by_listener.entry(listener.to_owned()).or_default() += open;
            });
            for (listener, open) in by_listener {
                observer.observe(open, &[KeyValue::new("listener", listener)]);
            }
        })
        .build();
}

pub struct ControllerMetrics {
    pub pushes: Counter<u64>,
    /// By result: `ack` or `nack`.
    pub answers: Counter<u64>,
    pub publishes: Counter<u64>,
    /// From PublishConfig to each node's ACK.
    pub publish_to_ack: Histogram<f64>,
}

pub fn controller() -> &'static ControllerMetrics {
    static METRICS: OnceLock<ControllerMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let meter = meter();
        ControllerMetrics {
            pushes: meter
                .u64_counter("tether.controller.pushes")
                .with_description("Pushes sent to nodes")
                .build(),
            answers: meter
                .u64_counter("tether.controller.answers")
                .with_description("ACKs and NACKs received")
                .build(),
            publishes: meter.u64_counter("tether.controller.publishes").build(),
            publish_to_ack: meter
                .f64_histogram("tether.controller.publish_to_ack")
                .with_unit("s")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
        }
    })
}

/// The controller's gauges: connected nodes.
pub fn observe_controller(connected: Arc<dyn Fn() -> usize + Send + Sync>) {
    meter()
        .u64_observable_gauge("tether.controller.nodes.connected")
        .with_callback(move |observer| observer.observe(connected() as u64, &[]))
        .build();
}
