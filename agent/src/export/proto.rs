//! sockspan's span straight into OTLP protobuf bytes (`ExportTraceServiceRequest`), without the
//! SDK's two conversions (span → `SpanData` → the generated types), which cost three times
//! this (`bench-pipeline`): the bytes the SDK sends for the same spans, checked by decoding
//! both with the official `opentelemetry-proto` types. [`super::http`] sends them.
//! Field numbers: opentelemetry/proto/{collector/trace,trace,resource,common}/v1/*.proto.
use opentelemetry::Value;
use opentelemetry_sdk::Resource;

use crate::span::{Span, SpanKind, SpanLink, ValueRef};

const LEN: u8 = 2;
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const FIXED32: u8 = 5;

/// `SpanFlags`: the span's context says whether it is remote (it never is: sockspan's spans
/// are local), and the W3C sampled flag.
const LOCAL_SAMPLED_FLAGS: u32 = 0x100 | 0x01;
/// `Span.SpanKind`.
const KIND_SERVER: u64 = 2;
const KIND_CLIENT: u64 = 3;
/// `Status.StatusCode`.
const STATUS_ERROR: u64 = 2;

/// Appends one `ResourceSpans` (the process's resource, one scope given as its name and
/// version, its spans) to an `ExportTraceServiceRequest` being written in `out`, calling
/// `each_span` before each span is written.
pub fn write_resource_spans(
    out: &mut Vec<u8>,
    resource: &Resource,
    scope: (&str, &str),
    spans: &[Span],
    mut each_span: impl FnMut(),
) {
    let resource_len: usize = resource
        .iter()
        .map(|(k, v)| field_len(1, attr_len(k.as_str(), resource_value(v))))
        .sum();
    let scope_len = str_field_len(1, scope.0) + str_field_len(2, scope.1);
    // The spans are written first, each once, and copied after the headers that need their
    // lengths: a pass that only measured them cost as much as writing them (the exporter
    // meets each span cold, and the copy is of bytes just written).
    let mut body = Vec::with_capacity(spans.len() * 512);
    let mut ends = Vec::with_capacity(spans.len());
    for s in spans {
        each_span();
        write_span(&mut body, s);
        ends.push(body.len());
    }
    let spans_len: usize = ranges(&ends).map(|r| field_len(2, r.len())).sum();
    let scope_spans_len = field_len(1, scope_len) + spans_len;
    let resource_spans_len = field_len(1, resource_len) + field_len(2, scope_spans_len);

    header(out, 1, resource_spans_len);
    header(out, 1, resource_len);
    for (k, v) in resource.iter() {
        let v = resource_value(v);
        header(out, 1, attr_len(k.as_str(), v));
        write_attr(out, k.as_str(), v);
    }
    header(out, 2, scope_spans_len);
    header(out, 1, scope_len);
    write_str(out, 1, scope.0);
    write_str(out, 2, scope.1);
    for r in ranges(&ends) {
        header(out, 2, r.len());
        out.extend_from_slice(&body[r]);
    }
}

/// The ranges of back-to-back items, from where each ends.
fn ranges(ends: &[usize]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    ends.iter()
        .scan(0, |start, &end| Some(std::mem::replace(start, end)..end))
}

fn write_span(out: &mut Vec<u8>, s: &Span) {
    write_bytes(out, 1, &s.trace_id);
    write_bytes(out, 2, &s.span_id);
    if let Some(p) = parent(s) {
        write_bytes(out, 4, &p);
    }
    write_str(out, 5, &s.name);
    tag(out, 6, VARINT);
    varint(out, kind(s.kind));
    tag(out, 7, FIXED64);
    out.extend_from_slice(&s.start_unix_ns.to_le_bytes());
    tag(out, 8, FIXED64);
    out.extend_from_slice(&s.end_unix_ns.to_le_bytes());
    for (k, v) in &s.attributes {
        let v = Some(v.borrowed());
        header(out, 9, attr_len(k, v));
        write_attr(out, k, v);
    }
    for l in &s.links {
        header(out, 13, link_len(l));
        write_link(out, l);
    }
    header(out, 15, status_len(s.error));
    if s.error {
        tag(out, 3, VARINT);
        varint(out, STATUS_ERROR);
    }
    tag(out, 16, FIXED32);
    out.extend_from_slice(&LOCAL_SAMPLED_FLAGS.to_le_bytes());
}

/// The parent's id, if it is a valid one (all zeros is none, as the SDK writes it).
fn parent(s: &Span) -> Option<[u8; 8]> {
    s.parent_span_id.filter(|p| *p != [0; 8])
}

fn kind(k: SpanKind) -> u64 {
    match k {
        SpanKind::Server => KIND_SERVER,
        SpanKind::Client => KIND_CLIENT,
    }
}

fn status_len(error: bool) -> usize {
    if error { 1 + varint_len(STATUS_ERROR) } else { 0 }
}

fn link_len(l: &SpanLink) -> usize {
    field_len(1, 16) + field_len(2, 8) + field_len(4, link_source_len(l)) + 1 + 4
}

/// The link's one attribute: the rule that made it.
fn link_source_len(l: &SpanLink) -> usize {
    attr_len(crate::vocab::attr::SOCKSPAN_LINK_SOURCE, Some(ValueRef::Str(l.source)))
}

fn write_link(out: &mut Vec<u8>, l: &SpanLink) {
    write_bytes(out, 1, &l.trace_id);
    write_bytes(out, 2, &l.span_id);
    header(out, 4, link_source_len(l));
    write_attr(
        out,
        crate::vocab::attr::SOCKSPAN_LINK_SOURCE,
        Some(ValueRef::Str(l.source)),
    );
    tag(out, 6, FIXED32);
    out.extend_from_slice(&LOCAL_SAMPLED_FLAGS.to_le_bytes());
}

/// A resource attribute (the SDK's value types; resources use strings and ints). `None`: a
/// type sockspan never sets, written as an empty `AnyValue`.
fn resource_value(v: &Value) -> Option<ValueRef<'_>> {
    match v {
        Value::String(s) => Some(ValueRef::Str(s.as_str())),
        Value::I64(i) => Some(ValueRef::Int(*i)),
        Value::Bool(b) => Some(ValueRef::Bool(*b)),
        _ => None,
    }
}

/// `KeyValue`: the key, then the `AnyValue`.
fn attr_len(key: &str, v: Option<ValueRef>) -> usize {
    str_field_len(1, key) + field_len(2, any_value_len(v))
}

/// An `AnyValue`: a string (1), bool (2) or int (3).
fn any_value_len(v: Option<ValueRef>) -> usize {
    match v {
        Some(ValueRef::Str(s)) => field_len(1, s.len()),
        Some(ValueRef::Bool(_)) => 2,
        Some(ValueRef::Int(i)) => 1 + varint_len(i as u64),
        None => 0,
    }
}

fn write_attr(out: &mut Vec<u8>, key: &str, v: Option<ValueRef>) {
    write_str(out, 1, key);
    header(out, 2, any_value_len(v));
    match v {
        // A oneof member is written even when it holds its type's default.
        Some(ValueRef::Str(s)) => {
            header(out, 1, s.len());
            out.extend_from_slice(s.as_bytes());
        }
        Some(ValueRef::Bool(b)) => {
            tag(out, 2, VARINT);
            out.push(u8::from(b));
        }
        Some(ValueRef::Int(i)) => {
            tag(out, 3, VARINT);
            varint(out, i as u64);
        }
        None => {}
    }
}

/// A length-delimited field's bytes: tag, length, payload.
fn field_len(field: u32, len: usize) -> usize {
    varint_len(u64::from(field << 3)) + varint_len(len as u64) + len
}

/// A string field, left out when empty (proto3).
fn str_field_len(field: u32, s: &str) -> usize {
    if s.is_empty() { 0 } else { field_len(field, s.len()) }
}

fn write_str(out: &mut Vec<u8>, field: u32, s: &str) {
    if !s.is_empty() {
        write_bytes(out, field, s.as_bytes());
    }
}

fn write_bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    header(out, field, b.len());
    out.extend_from_slice(b);
}

fn header(out: &mut Vec<u8>, field: u32, len: usize) {
    tag(out, field, LEN);
    varint(out, len as u64);
}

fn tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, u64::from(field << 3 | u32::from(wire)));
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::AttrValue;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message as _;

    fn spans() -> Vec<Span> {
        let mut a = Span::sample(1);
        a.attributes.push(("sockspan.incomplete", AttrValue::Bool(true)));
        a.attributes.push(("http.response.status_code", AttrValue::Int(-3)));
        a.attributes.push(("url.path", AttrValue::text("x".repeat(300))));
        let mut b = Span::sample(2);
        b.kind = SpanKind::Client;
        b.parent_span_id = Some([7; 8]);
        b.error = true;
        b.links.push(SpanLink {
            trace_id: [9; 16],
            span_id: [8; 8],
            source: "loop",
        });
        let mut c = Span::sample(3);
        c.parent_span_id = Some([0; 8]);
        c.resource = b.resource.clone();
        vec![a, b, c]
    }

    /// The request the SDK's conversions build for the same spans.
    fn sdk_request(spans: Vec<Span>) -> ExportTraceServiceRequest {
        let bytes = super::super::otlp::encode_with_sdk(spans);
        ExportTraceServiceRequest::decode(bytes.as_slice()).expect("the SDK's bytes decode")
    }

    fn sorted(mut r: ExportTraceServiceRequest) -> ExportTraceServiceRequest {
        for rs in &mut r.resource_spans {
            if let Some(res) = &mut rs.resource {
                res.attributes.sort_by(|a, b| a.key.cmp(&b.key));
            }
        }
        r
    }

    #[test]
    fn decodes_to_what_the_sdk_sends() {
        let direct = super::super::otlp::encode_direct(spans());
        let ours = ExportTraceServiceRequest::decode(direct.as_slice()).expect("our bytes decode");
        assert_eq!(sorted(ours), sorted(sdk_request(spans())));
    }

    #[test]
    fn varint_lengths() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
        }
    }
}
