//! Logs, traces and metrics.
//!
//! Logs: one `tracing` subscriber for the process, filtered by `RUST_LOG`
//! (default `info`), human-readable on stderr or JSON lines with
//! `TETHER_LOG_FORMAT=json`.
//!
//! Traces and metrics: OpenTelemetry, exported over OTLP/gRPC when an
//! endpoint is configured (`[telemetry] otlp_endpoint` or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT`), and metrics also as Prometheus text
//! (`[telemetry] prometheus`). With neither, the global providers stay the
//! no-op ones and requests skip span creation entirely. Exports run on the
//! SDK's own threads with bounded queues: a backend that is down costs
//! dropped telemetry, never a slower request.

pub mod access_log;
pub mod answers;
pub mod metrics;
pub mod prometheus;
pub mod request;
mod sampling;
pub mod spans;

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::metrics::{ManualReader, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_subscriber::EnvFilter;

use crate::config::TelemetrySettings;

pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if std::env::var("TETHER_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().flatten_event(true).try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
}

static TRACING: AtomicBool = AtomicBool::new(false);
static METRICS: AtomicBool = AtomicBool::new(false);

/// Whether metrics are collected; when not, request paths skip building
/// their labels.
pub fn metrics_enabled() -> bool {
    METRICS.load(Ordering::Relaxed)
}

/// Whether spans are exported; when not, none are created.
pub fn tracing_enabled() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// The one tracer every span comes from, made once.
fn tracer() -> &'static opentelemetry::global::BoxedTracer {
    static TRACER: std::sync::OnceLock<opentelemetry::global::BoxedTracer> =
        std::sync::OnceLock::new();
    TRACER.get_or_init(|| opentelemetry::global::tracer("tether"))
}

/// What runs the exports; flushed and stopped by `shutdown`.
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
    /// The Prometheus endpoint's address and the reader it collects from.
    prometheus: Option<(std::net::SocketAddr, Arc<ManualReader>)>,
    /// The endpoint, once served.
    prometheus_task: Option<tokio::task::JoinHandle<()>>,
}

/// Who is reporting: the resource attributes of every span and metric.
pub struct Identity<'a> {
    /// `tether-node` or `tether-controller`, unless OTEL_SERVICE_NAME or
    /// `[telemetry] service_name` says otherwise.
    pub service: &'a str,
    pub instance_id: &'a str,
}

/// The OTLP endpoint from the config, else the environment.
fn otlp_endpoint(settings: &TelemetrySettings) -> Option<String> {
    settings.otlp_endpoint.clone().or_else(|| {
        [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    })
}

/// Sets up the exporters `settings` and the environment ask for. Must run
/// inside the tokio runtime (the OTLP client lives there).
pub fn start(settings: &TelemetrySettings, identity: Identity<'_>) -> Result<Telemetry, String> {
    let endpoint = otlp_endpoint(settings);
    let mut telemetry = Telemetry {
        tracer_provider: None,
        meter_provider: None,
        prometheus: None,
        prometheus_task: None,
    };
    if endpoint.is_none() && settings.prometheus.is_none() {
        return Ok(telemetry);
    }
    let resource = resource(settings, &identity);
    if let Some(endpoint) = &endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("OTLP trace exporter: {e}"))?;
        let mut builder = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_id_generator(sampling::PresetIds::default())
            .with_resource(resource.clone());
        // Otherwise OTEL_TRACES_SAMPLER / _ARG, read by the SDK.
        if let Some(ratio) = settings.trace_sample_ratio {
            builder = builder.with_sampler(Sampler::ParentBased(Box::new(
                Sampler::TraceIdRatioBased(ratio),
            )));
        }
        sampling::set_ratio(settings.trace_sample_ratio);
        let provider = builder.build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        TRACING.store(true, Ordering::Relaxed);
        telemetry.tracer_provider = Some(provider);
    }
    let mut meters = SdkMeterProvider::builder().with_resource(resource);
    if let Some(endpoint) = &endpoint {
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("OTLP metric exporter: {e}"))?;
        let mut reader = PeriodicReader::builder(exporter);
        if let Some(interval) = settings.metrics_interval {
            reader = reader.with_interval(interval);
        }
        meters = meters.with_reader(reader.build());
    }
    if let Some(addr) = settings.prometheus {
        let reader = Arc::new(ManualReader::builder().build());
        meters = meters.with_reader(prometheus::SharedReader(reader.clone()));
        telemetry.prometheus = Some((addr, reader));
    }
    let provider = meters.build();
    opentelemetry::global::set_meter_provider(provider.clone());
    METRICS.store(true, Ordering::Relaxed);
    telemetry.meter_provider = Some(provider);
    tracing::info!(
        otlp = endpoint.as_deref().unwrap_or("off"),
        prometheus = ?settings.prometheus,
        "telemetry on"
    );
    Ok(telemetry)
}

fn resource(settings: &TelemetrySettings, identity: &Identity<'_>) -> Resource {
    let mut builder = Resource::builder().with_attributes([
        KeyValue::new("service.instance.id", identity.instance_id.to_owned()),
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("host.name", crate::config::hostname()),
    ]);
    // OTEL_SERVICE_NAME, read by the builder, wins over the defaults.
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        let name = settings
            .service_name
            .clone()
            .unwrap_or_else(|| identity.service.to_owned());
        builder = builder.with_service_name(name);
    }
    builder.build()
}

/// How long a stopping process waits for the last exports: a collector that
/// is down must not hold a node past its termination grace.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

impl Telemetry {
    /// Binds and serves the Prometheus endpoint, if one is configured;
    /// `ready` answers `/readyz`.
    pub async fn serve_prometheus(&mut self, ready: prometheus::Ready) -> Result<(), String> {
        let Some((addr, reader)) = &self.prometheus else {
            return Ok(());
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot bind the Prometheus endpoint {addr}: {e}"))?;
        tracing::info!(address = %listener.local_addr().unwrap_or(*addr), "prometheus endpoint listening");
        self.prometheus_task = Some(tokio::spawn(prometheus::serve(
            listener,
            reader.clone(),
            ready,
        )));
        Ok(())
    }

    /// Stops the endpoint and exports what is queued, for at most
    /// `SHUTDOWN_GRACE`.
    pub fn shutdown(&self) {
        if let Some(task) = &self.prometheus_task {
            task.abort();
        }
        let tracer = self.tracer_provider.clone();
        let meter = self.meter_provider.clone();
        if tracer.is_none() && meter.is_none() {
            return;
        }
        let (done, finished) = std::sync::mpsc::channel();
        let _ = std::thread::Builder::new()
            .name("tether-telemetry-flush".into())
            .spawn(move || {
                if let Some(provider) = tracer {
                    let _ = provider.shutdown();
                }
                if let Some(provider) = meter {
                    let _ = provider.shutdown();
                }
                let _ = done.send(());
            });
        if finished.recv_timeout(SHUTDOWN_GRACE).is_err() {
            tracing::warn!("telemetry not flushed within {SHUTDOWN_GRACE:?}; exiting anyway");
        }
    }
}
