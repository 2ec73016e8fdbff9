//! `sockspan analyze FILE`: the report and the slowest traces' timelines, after the fact, from
//! spans saved with `--print=json` or from a recording made with `--record`.
use std::{collections::HashMap, io::BufRead, path::Path, sync::Arc};

use serde_json::Value;
use thiserror::Error;

use super::{SpanFilter, Style, report, trace_shown, waterfall};
use crate::{
    pipeline::Processor,
    process::ProcessInfo,
    span::{AttrValue, Span, SpanKind, SpanLink},
    telemetry::Metrics,
};

#[derive(Debug, Error)]
pub enum AnalyzeError {
    #[error("cannot read {path}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is neither JSON spans (`--print=json`) nor a recording (`--record`): {why}")]
    Format { path: String, why: String },
}

/// Attribute keys sockspan writes (a span keeps `&'static str` keys; others are skipped).
const KEYS: &[&str] = &[
    crate::vocab::attr::HTTP_REQUEST_METHOD,
    crate::vocab::attr::URL_PATH,
    crate::vocab::attr::URL_QUERY,
    crate::vocab::attr::URL_SCHEME,
    crate::vocab::attr::NETWORK_PROTOCOL_VERSION,
    crate::vocab::attr::SERVER_ADDRESS,
    crate::vocab::attr::SERVER_PORT,
    crate::vocab::attr::CLIENT_ADDRESS,
    crate::vocab::attr::CLIENT_PORT,
    crate::vocab::attr::NETWORK_PEER_ADDRESS,
    crate::vocab::attr::NETWORK_PEER_PORT,
    "user_agent.original",
    crate::vocab::attr::HTTP_REQUEST_BODY_SIZE,
    crate::vocab::attr::HTTP_RESPONSE_STATUS_CODE,
    crate::vocab::attr::HTTP_RESPONSE_BODY_SIZE,
    crate::vocab::attr::HTTP_REQUEST_RESEND_COUNT,
    crate::vocab::attr::ERROR_TYPE,
    crate::vocab::attr::SOCKSPAN_INCOMPLETE,
    crate::vocab::attr::SOCKSPAN_PARENT_SOURCE,
];
const LINK_SOURCES: &[&str] = &[crate::stitch::LINK_LOOP_UNCONFIRMED];

fn hex_bytes<const N: usize>(v: &Value) -> Option<[u8; N]> {
    let s = v.as_str()?;
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A span from one `--print=json` line; None if the line is not one.
pub fn span_from_json(line: &str, processes: &mut HashMap<(u32, String), Arc<ProcessInfo>>) -> Option<Span> {
    let v: Value = serde_json::from_str(line).ok()?;
    let r = &v["resource"];
    let pid = r["process.pid"].as_u64().unwrap_or(0) as u32;
    let service = r["service.name"].as_str().unwrap_or("?").to_owned();
    let resource = processes
        .entry((pid, service.clone()))
        .or_insert_with(|| {
            Arc::new(ProcessInfo {
                pid,
                service_name: service,
                executable_name: r["process.executable.name"].as_str().unwrap_or("").to_owned(),
                host_name: r["host.name"].as_str().unwrap_or("").into(),
                container_id: r["container.id"].as_str().map(str::to_owned),
                pod: None,
            })
        })
        .clone();
    let attributes = v["attributes"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, val)| {
                    let key = *KEYS.iter().find(|known| **known == k)?;
                    let val = match val {
                        Value::String(s) => AttrValue::text(s.as_str()),
                        Value::Number(n) => AttrValue::Int(n.as_i64()?),
                        Value::Bool(b) => AttrValue::Bool(*b),
                        _ => return None,
                    };
                    Some((key, val))
                })
                .collect()
        })
        .unwrap_or_default();
    let links = v["links"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| {
                    let src = l["attributes"][crate::vocab::attr::SOCKSPAN_LINK_SOURCE]
                        .as_str()
                        .unwrap_or("");
                    Some(SpanLink {
                        trace_id: hex_bytes(&l["trace_id"])?,
                        span_id: hex_bytes(&l["span_id"])?,
                        source: LINK_SOURCES.iter().find(|k| **k == src).copied().unwrap_or("link"),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Some(Span {
        trace_id: hex_bytes(&v["trace_id"])?,
        span_id: hex_bytes(&v["span_id"])?,
        parent_span_id: hex_bytes(&v["parent_span_id"]),
        kind: match v["kind"].as_str()? {
            "SERVER" => SpanKind::Server,
            "CLIENT" => SpanKind::Client,
            _ => return None,
        },
        name: v["name"].as_str()?.to_owned(),
        start_unix_ns: v["start_time_unix_nano"].as_u64()?,
        end_unix_ns: v["end_time_unix_nano"].as_u64()?,
        attributes,
        error: v["status"].as_str() == Some("ERROR"),
        resource,
        links,
        upstream_sampled: None,
    })
}

/// The spans of `path`: JSON lines (others counted as skipped), or a recording replayed.
pub fn load(path: &Path) -> Result<(Vec<Span>, u64), AnalyzeError> {
    let read_err = |source| AnalyzeError::Read {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut reader = std::io::BufReader::new(file);
    let first = reader.fill_buf().map_err(read_err)?.first().copied();
    if first == Some(b'{') {
        let (mut spans, mut skipped, mut processes) = (Vec::new(), 0u64, HashMap::new());
        for line in reader.lines() {
            let line = line.map_err(read_err)?;
            match span_from_json(&line, &mut processes) {
                Some(s) => spans.push(s),
                None if line.trim().is_empty() => {}
                None => skipped += 1,
            }
        }
        return Ok((spans, skipped));
    }
    let batches = crate::replay::read_recording(reader, 1024).map_err(|e| AnalyzeError::Format {
        path: path.display().to_string(),
        why: e.to_string(),
    })?;
    let mut processor = Processor::offline(Metrics::new());
    let mut spans = Vec::new();
    for batch in &batches {
        processor.process(batch, &mut spans);
    }
    processor.finish(&mut spans);
    Ok((spans, 0))
}

/// The report, then the `traces` slowest traces shown by `filter`.
pub fn analyze(spans: Vec<Span>, filter: &SpanFilter, traces: usize, (style, width): (Style, Option<usize>)) -> String {
    let mut out = report::render(&report::build(&spans, |s| filter.matches(s)), 15);
    let mut by_trace: HashMap<[u8; 16], Vec<Span>> = HashMap::new();
    for s in spans {
        by_trace.entry(s.trace_id).or_default().push(s);
    }
    let mut all: Vec<Vec<Span>> = by_trace.into_values().filter(|t| trace_shown(filter, t)).collect();
    let length = |t: &Vec<Span>| {
        let start = t.iter().map(|s| s.start_unix_ns).min().unwrap_or(0);
        t.iter().map(|s| s.end_unix_ns).max().unwrap_or(start) - start
    };
    all.sort_by_key(|t| std::cmp::Reverse(length(t)));
    for t in all.iter().take(traces) {
        out.push('\n');
        out.push_str(&waterfall::render(t, width, style));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::print::json_line;

    #[test]
    fn spans_survive_a_json_round_trip() {
        let mut s = Span::sample(3);
        s.trace_id = [9; 16];
        s.parent_span_id = Some([4; 8]);
        s.kind = SpanKind::Client;
        s.start_unix_ns = 1_000;
        s.end_unix_ns = 5_000;
        s.error = true;
        s.attributes = vec![
            (crate::vocab::attr::HTTP_RESPONSE_STATUS_CODE, AttrValue::Int(503)),
            (crate::vocab::attr::SOCKSPAN_PARENT_SOURCE, AttrValue::fixed("thread")),
        ];
        let line = json_line(&s);
        let back = span_from_json(&line, &mut HashMap::new()).expect("parses");
        assert_eq!(
            (back.trace_id, back.span_id, back.parent_span_id, back.kind),
            (s.trace_id, s.span_id, s.parent_span_id, s.kind)
        );
        assert_eq!((back.start_unix_ns, back.end_unix_ns, back.error), (1_000, 5_000, true));
        assert_eq!(back.attributes, s.attributes);
        assert_eq!(back.resource.service_name, "s");
        assert_eq!(back.resource.container_id, None);
        let mut c = s.clone();
        c.resource = Arc::new(ProcessInfo {
            container_id: Some("ab".repeat(32)),
            pod: None,
            ..(*s.resource).clone()
        });
        let back = span_from_json(&json_line(&c), &mut HashMap::new()).expect("parses");
        assert_eq!(back.resource.container_id, Some("ab".repeat(32)));
        assert!(span_from_json("not json", &mut HashMap::new()).is_none());
        assert!(span_from_json("{\"name\": 1}", &mut HashMap::new()).is_none());
    }
}
