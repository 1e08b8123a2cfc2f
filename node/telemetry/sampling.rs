//! The trace sampling decision for a request, made before any span exists.
//! At a 1% ratio, 99 requests in 100 are not sampled; asking the SDK to
//! start a span for each only to drop it costs a trace id, a span, a
//! context and a `traceparent` written upstream. Here the same rule the
//! SDK's parent-based ratio sampler applies is applied up front: a request
//! that is not sampled gets no span at all (its client's `traceparent`, if
//! any, goes upstream unchanged), and one that is gets the trace id the
//! SDK's own ratio sampler was asked about, so it decides the same again.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, ShouldSample,
};

/// The configured ratio as f64 bits; `NOT_SET` when the SDK decides alone
/// (a sampler from OTEL_TRACES_SAMPLER, which this rule cannot know).
static RATIO: AtomicU64 = AtomicU64::new(NOT_SET);
const NOT_SET: u64 = u64::MAX;

thread_local! {
    /// The trace id a sampled root request's span must get.
    static PRESET: Cell<Option<TraceId>> = const { Cell::new(None) };
}

/// Applies `ratio` up front from now on (`trace_sample_ratio`).
pub fn set_ratio(ratio: Option<f64>) {
    RATIO.store(ratio.map_or(NOT_SET, f64::to_bits), Ordering::Relaxed);
}

/// Whether a request with this `traceparent` header is traced; when it is
/// a new trace, the id it gets is preset for the span about to start on
/// this thread.
pub fn sample_request(traceparent: Option<&[u8]>) -> bool {
    let bits = RATIO.load(Ordering::Relaxed);
    if bits == NOT_SET {
        return true;
    }
    // Parent-based: a valid incoming traceparent decides by its flag.
    if let Some(sampled) = traceparent.and_then(parent_sampled) {
        return sampled;
    }
    let trace_id = RandomIdGenerator::default().new_trace_id();
    if !ratio_samples(f64::from_bits(bits), trace_id) {
        return false;
    }
    PRESET.with(|preset| preset.set(Some(trace_id)));
    true
}

/// The sampled flag of a W3C `traceparent` (version 00:
/// `00-<32 hex>-<16 hex>-<2 hex flags>`), or None when it is not valid
/// (the SDK then ignores it too, and the request is a new trace).
fn parent_sampled(value: &[u8]) -> Option<bool> {
    let text = std::str::from_utf8(value).ok()?;
    let mut parts = text.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    if parts.next().is_some()
        || version != "00"
        || !hex(trace, 32)
        || !hex(span, 16)
        || !hex(flags, 2)
    {
        return None;
    }
    if trace.bytes().all(|b| b == b'0') || span.bytes().all(|b| b == b'0') {
        return None;
    }
    Some(u8::from_str_radix(flags, 16).ok()? & 1 == 1)
}

/// The SDK's own `TraceIdRatioBased` sampler, asked about this trace id.
fn ratio_samples(ratio: f64, trace_id: TraceId) -> bool {
    let sampler = Sampler::TraceIdRatioBased(ratio);
    let result = sampler.should_sample(None, trace_id, "", &SpanKind::Server, &[], &[]);
    result.decision == SamplingDecision::RecordAndSample
}

/// The SDK's id generator, except that a new trace takes the id a request
/// was sampled on.
#[derive(Debug, Default)]
pub struct PresetIds(RandomIdGenerator);

impl IdGenerator for PresetIds {
    fn new_trace_id(&self) -> TraceId {
        PRESET
            .with(Cell::take)
            .unwrap_or_else(|| self.0.new_trace_id())
    }

    fn new_span_id(&self) -> SpanId {
        self.0.new_span_id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_sampled_flag_of_valid_traceparents_only() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        let span = "00f067aa0ba902b7";
        assert_eq!(
            parent_sampled(format!("00-{id}-{span}-01").as_bytes()),
            Some(true)
        );
        assert_eq!(
            parent_sampled(format!("00-{id}-{span}-00").as_bytes()),
            Some(false)
        );
        assert_eq!(
            parent_sampled(format!("00-{id}-{span}-03").as_bytes()),
            Some(true)
        );
        for invalid in [
            format!("01-{id}-{span}-01"),
            format!("00-{}-{span}-01", "0".repeat(32)),
            format!("00-{id}-{}-01", "0".repeat(16)),
            format!("00-{id}-{span}"),
            format!("00-{id}-{span}-01-extra"),
            format!("00-{id}x-{span}-01"),
            "garbage".to_owned(),
        ] {
            assert_eq!(parent_sampled(invalid.as_bytes()), None, "{invalid}");
        }
    }

    #[test]
    fn the_ratio_rule_samples_about_that_share_of_ids() {
        let ids = RandomIdGenerator::default();
        let sampled = (0..20_000)
            .filter(|_| ratio_samples(0.1, ids.new_trace_id()))
            .count();
        assert!(
            (1_600..2_400).contains(&sampled),
            "{sampled} of 20,000 at 10%"
        );
        assert!(ratio_samples(1.0, ids.new_trace_id()));
        assert!(!ratio_samples(0.0, ids.new_trace_id()));
    }
}
