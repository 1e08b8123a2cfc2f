//! Spans outside the request path: config applies, controller publishes
//! and the pushes and ACKs that follow them. A publish's trace context
//! travels in each Push (`traceparent`), so one trace holds the publish,
//! every node's apply, and every ACK the controller receives.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// Starts a span, a child of `traceparent` when one is given. `None`
/// when tracing is off.
pub fn start(
    name: String,
    kind: SpanKind,
    traceparent: &str,
    attributes: Vec<KeyValue>,
) -> Option<Context> {
    if !super::tracing_enabled() {
        return None;
    }
    let parent = if traceparent.is_empty() {
        Context::new()
    } else {
        let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
        TraceContextPropagator::new().extract(&carrier)
    };
    let span = super::tracer()
        .span_builder(name)
        .with_kind(kind)
        .with_attributes(attributes)
        .start_with_context(super::tracer(), &parent);
    Some(parent.with_span(span))
}

/// The W3C `traceparent` of a span's context ("" without one).
pub fn traceparent(context: Option<&Context>) -> String {
    let Some(context) = context else {
        return String::new();
    };
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(context, &mut carrier);
    carrier.remove("traceparent").unwrap_or_default()
}

/// Ends a span, marking it failed with `error` if given.
pub fn end(context: Option<Context>, error: Option<String>) {
    if let Some(context) = context {
        let span = context.span();
        if let Some(error) = error {
            span.set_status(opentelemetry::trace::Status::error(error));
        }
        span.end();
    }
}
