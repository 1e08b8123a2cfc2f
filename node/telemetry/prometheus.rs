//! The Prometheus endpoint, which also answers Kubernetes probes: `GET
//! /healthz` (200 while the process answers: liveness) and `GET /readyz`
//! (200 while it serves a config and is not stopping: readiness). `GET
//! /metrics` collects the OpenTelemetry
//! metrics on demand (a manual reader next to the OTLP one, so both see the
//! same instruments) and writes them in the Prometheus text format 0.0.4.
//! Names follow the OpenTelemetry → Prometheus conventions: dots become
//! underscores, the unit is a suffix (`_seconds`, `_bytes`), counters end
//! in `_total`.

use std::convert::Infallible;
use std::fmt::Write;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry::KeyValue;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{
    AggregatedMetrics, Gauge, Histogram, MetricData, ResourceMetrics, Sum,
};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{InstrumentKind, ManualReader, Pipeline, Temporality};
use tokio::net::TcpListener;

/// A manual reader the meter provider and the endpoint share.
#[derive(Debug, Clone)]
pub struct SharedReader(pub Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// Whether the process should receive traffic, for `/readyz`.
pub type Ready = Arc<dyn Fn() -> bool + Send + Sync>;

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the task
/// is dropped.
pub async fn serve(listener: TcpListener, reader: Arc<ManualReader>, ready: Ready) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let reader = reader.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let reader = reader.clone();
                let ready = ready.clone();
                async move { Ok::<_, Infallible>(answer(&request, &reader, &*ready)) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(
    request: &Request<Incoming>,
    reader: &ManualReader,
    ready: &dyn Fn() -> bool,
) -> Response<Full<Bytes>> {
    let probe = match request.uri().path() {
        "/healthz" => Some(true),
        "/readyz" => Some(ready()),
        _ => None,
    };
    if let Some(ok) = probe {
        let (status, body) = if ok {
            (StatusCode::OK, "ok\n")
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
        };
        let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *response.status_mut() = status;
        return response;
    }
    if request.uri().path() != "/metrics" {
        let mut response = Response::new(Full::new(Bytes::from_static(b"see /metrics\n")));
        *response.status_mut() = StatusCode::NOT_FOUND;
        return response;
    }
    let mut metrics = ResourceMetrics::default();
    if let Err(e) = reader.collect(&mut metrics) {
        let mut response = Response::new(Full::new(Bytes::from(format!("{e}\n"))));
        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        return response;
    }
    let mut response = Response::new(Full::new(Bytes::from(render(&metrics))));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// The Prometheus text format of everything collected.
pub fn render(metrics: &ResourceMetrics) -> String {
    let mut out = String::new();
    for scope in metrics.scope_metrics() {
        for metric in scope.metrics() {
            let name = metric_name(metric.name(), metric.unit());
            let help = metric.description();
            match metric.data() {
                AggregatedMetrics::U64(data) => write_data(&mut out, &name, help, data),
                AggregatedMetrics::I64(data) => write_data(&mut out, &name, help, data),
                AggregatedMetrics::F64(data) => write_data(&mut out, &name, help, data),
            }
        }
    }
    out
}

fn metric_name(name: &str, unit: &str) -> String {
    let mut name: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let suffix = match unit {
        "s" => "_seconds",
        "By" => "_bytes",
        "ms" => "_milliseconds",
        _ => "",
    };
    if !name.ends_with(suffix) {
        name.push_str(suffix);
    }
    name
}

/// Sample values as Prometheus writes them.
trait SampleValue {
    fn sample_value(self) -> f64;
}

impl SampleValue for u64 {
    fn sample_value(self) -> f64 {
        self as f64
    }
}

impl SampleValue for i64 {
    fn sample_value(self) -> f64 {
        self as f64
    }
}

impl SampleValue for f64 {
    fn sample_value(self) -> f64 {
        self
    }
}

fn write_data<T: Copy + SampleValue>(
    out: &mut String,
    name: &str,
    help: &str,
    data: &MetricData<T>,
) {
    match data {
        MetricData::Sum(sum) => write_sum(out, name, help, sum),
        MetricData::Gauge(gauge) => write_gauge(out, name, help, gauge),
        MetricData::Histogram(histogram) => write_histogram(out, name, help, histogram),
        MetricData::ExponentialHistogram(_) => {}
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    if !help.is_empty() {
        let _ = writeln!(
            out,
            "# HELP {name} {}",
            help.replace('\\', "\\\\").replace('\n', "\\n")
        );
    }
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn write_sum<T: Copy + SampleValue>(out: &mut String, name: &str, help: &str, sum: &Sum<T>) {
    let (name, kind) = if sum.is_monotonic() {
        (format!("{name}_total"), "counter")
    } else {
        (name.to_owned(), "gauge")
    };
    header(out, &name, help, kind);
    for point in sum.data_points() {
        sample(
            out,
            &name,
            point.attributes(),
            &[],
            point.value().sample_value(),
        );
    }
}

fn write_gauge<T: Copy + SampleValue>(out: &mut String, name: &str, help: &str, gauge: &Gauge<T>) {
    header(out, name, help, "gauge");
    for point in gauge.data_points() {
        sample(
            out,
            name,
            point.attributes(),
            &[],
            point.value().sample_value(),
        );
    }
}

fn write_histogram<T: Copy + SampleValue>(
    out: &mut String,
    name: &str,
    help: &str,
    histogram: &Histogram<T>,
) {
    header(out, name, help, "histogram");
    let bucket = format!("{name}_bucket");
    for point in histogram.data_points() {
        let mut cumulative = 0;
        let bounds: Vec<f64> = point.bounds().collect();
        for (i, count) in point.bucket_counts().enumerate() {
            cumulative += count;
            let le = bounds
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
            sample(
                out,
                &bucket,
                point.attributes(),
                &[("le", &le)],
                cumulative as f64,
            );
        }
        sample(
            out,
            &format!("{name}_sum"),
            point.attributes(),
            &[],
            point.sum().sample_value(),
        );
        sample(
            out,
            &format!("{name}_count"),
            point.attributes(),
            &[],
            point.count() as f64,
        );
    }
}

fn sample<'a>(
    out: &mut String,
    name: &str,
    attributes: impl Iterator<Item = &'a KeyValue>,
    extra: &[(&str, &str)],
    value: f64,
) {
    out.push_str(name);
    let mut labels: Vec<(String, String)> = attributes
        .map(|kv| (label_name(kv.key.as_str()), kv.value.to_string()))
        .collect();
    labels.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    if !labels.is_empty() {
        out.push('{');
        for (i, (key, value)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let value = value
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            let _ = write!(out, "{key}=\"{value}\"");
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

fn label_name(key: &str) -> String {
    key.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}
