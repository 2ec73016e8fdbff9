//! `--top`: the report of `report`, over the last minute of spans, refreshed every second. On a
//! terminal it is a full-screen table (ratatui): `p`/`r`/`e`/`o`/`n` sort by p99, rate, errors,
//! own time or name; `q` (or Ctrl-C) quits the agent. Anywhere else it is plain text, once per
//! second.
use std::{
    collections::VecDeque,
    io::Write,
    sync::{Arc, atomic::Ordering::Relaxed, mpsc},
    time::{Duration, Instant},
};

use ratatui::{
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Modifier, Style as TuiStyle},
    widgets::{Block, Paragraph, Row, Table},
};

use super::{
    SpanFilter, SpanQueue,
    report::{self, OpStats, Report},
    waterfall::human,
};
use crate::{export::PrintCounts, span::Span};

/// The window the table covers.
pub const WINDOW: Duration = Duration::from_secs(60);
const REFRESH: Duration = Duration::from_secs(1);
/// Spans kept for the window (a busy node's minute keeps its latest ones).
const MAX_SPANS: usize = 50_000;
/// Spans waiting for the view thread; beyond it batches are dropped (counted).
const MAX_QUEUED_SPANS: u64 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    P99,
    Rate,
    Errors,
    Own,
    Name,
}

impl SortKey {
    fn from_key(c: char) -> Option<Self> {
        Some(match c {
            'p' => Self::P99,
            'r' => Self::Rate,
            'e' => Self::Errors,
            'o' => Self::Own,
            'n' => Self::Name,
            _ => return None,
        })
    }

    fn label(self) -> &'static str {
        match self {
            Self::P99 => "p99",
            Self::Rate => "rate",
            Self::Errors => "errors",
            Self::Own => "own time",
            Self::Name => "name",
        }
    }

    pub fn sort(self, ops: &mut [OpStats]) {
        use std::cmp::Reverse;
        match self {
            Self::P99 => ops.sort_by_key(|o| Reverse(o.p99_ns)),
            Self::Rate => ops.sort_by_key(|o| Reverse(o.count)),
            Self::Errors => ops.sort_by_key(|o| Reverse(o.errors * 1000 / o.count.max(1))),
            Self::Own => ops.sort_by_key(|o| Reverse(o.own_ns)),
            Self::Name => ops.sort_by(|a, b| (&a.service, &a.name).cmp(&(&b.service, &b.name))),
        }
    }
}

/// The spans of the last `WINDOW`, slimmed to what the report reads.
#[derive(Default)]
pub struct Window {
    spans: VecDeque<Span>,
    /// Spans shown, then forgotten before their minute was up (beyond the bound).
    pub dropped: u64,
}

impl Window {
    pub fn add(&mut self, s: &Span) {
        if self.spans.len() >= MAX_SPANS {
            self.spans.pop_front();
            self.dropped += 1;
        }
        let keep = |k: &str| {
            matches!(
                k,
                crate::vocab::attr::SERVER_ADDRESS
                    | crate::vocab::attr::SERVER_PORT
                    | crate::vocab::attr::HTTP_RESPONSE_STATUS_CODE
            )
        };
        let mut slim = Span {
            attributes: s.attributes.iter().filter(|(k, _)| keep(k)).cloned().collect(),
            links: Vec::new(),
            upstream_sampled: None,
            ..s.clone()
        };
        slim.attributes.shrink_to_fit();
        self.spans.push_back(slim);
    }

    /// Forgets spans that ended more than `WINDOW` before `now_unix_ns`.
    pub fn expire(&mut self, now_unix_ns: u64) {
        let oldest = now_unix_ns.saturating_sub(WINDOW.as_nanos() as u64);
        while self.spans.front().is_some_and(|s| s.end_unix_ns < oldest) {
            self.spans.pop_front();
        }
    }

    pub fn report(&mut self, filter: &SpanFilter) -> Report {
        let spans = self.spans.make_contiguous();
        report::build(spans, |s| filter.matches(s))
    }
}

fn status_share(o: &OpStats) -> String {
    format!("{:.1}%", o.errors as f64 * 100.0 / o.count.max(1) as f64)
}

/// The top view's thread.
pub struct TopQueue;

impl TopQueue {
    pub fn start(
        filter: SpanFilter,
        tty: bool,
        mut out: impl Write + Send + 'static,
        counts: Arc<PrintCounts>,
    ) -> std::io::Result<(SpanQueue, std::thread::JoinHandle<()>)> {
        let c = counts.clone();
        SpanQueue::spawn("top", counts, MAX_QUEUED_SPANS, move |rx| {
            let mut window = Window::default();
            let mut sort = SortKey::P99;
            let mut terminal = tty.then(ratatui::init);
            let mut next = Instant::now() + REFRESH;
            'view: loop {
                // Take what came, then wait for a key (on a terminal) or the next refresh.
                loop {
                    match rx.try_recv() {
                        Ok(spans) => {
                            let n = spans.len() as u64;
                            c.queued.fetch_sub(n, Relaxed);
                            spans.iter().for_each(|s| window.add(s));
                            c.printed.fetch_add(n, Relaxed);
                        }
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => break 'view,
                    }
                }
                let wait = next
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(100));
                if terminal.is_some() {
                    if event::poll(wait).unwrap_or(false)
                        && let Ok(Event::Key(k)) = event::read()
                        && k.kind == KeyEventKind::Press
                    {
                        match k.code {
                            KeyCode::Char('q') => quit(),
                            KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => quit(),
                            KeyCode::Char(ch) => {
                                if let Some(s) = SortKey::from_key(ch) {
                                    sort = s;
                                    next = Instant::now();
                                }
                            }
                            _ => {}
                        }
                    }
                } else {
                    std::thread::sleep(wait);
                }
                if Instant::now() < next {
                    continue;
                }
                next = Instant::now() + REFRESH;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                window.expire(now);
                let mut r = window.report(&filter);
                sort.sort(&mut r.ops);
                match terminal.as_mut() {
                    Some(t) => {
                        let _ = t.draw(|f| draw(f, &r, sort, window.dropped));
                    }
                    None => {
                        let text = format!(
                            "--- sockspan top, last {} s (sorted by {}) ---\n{}",
                            WINDOW.as_secs(),
                            sort.label(),
                            report::render(&r, 20)
                        );
                        if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
                            break;
                        }
                    }
                }
            }
            if terminal.is_some() {
                ratatui::restore();
            }
        })
    }
}

/// `q` stops the agent as Ctrl-C would (the terminal is raw: no SIGINT from the keyboard).
fn quit() {
    // SAFETY: signalling our own process.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGINT);
    }
}

fn draw(f: &mut ratatui::Frame, r: &Report, sort: SortKey, dropped: u64) {
    let [ops_area, svc_area, help] = Layout::vertical([
        Constraint::Min(6),
        Constraint::Length((r.services.len().min(8) + 3) as u16),
        Constraint::Length(1),
    ])
    .areas(f.area());
    let secs = (r.window_ns as f64 / 1e9).max(1e-9);
    let bold = TuiStyle::default().add_modifier(Modifier::BOLD);
    let rows = r.ops.iter().map(|o| {
        Row::new(vec![
            format!("{} {} {}", o.service, o.kind.as_str(), o.name),
            format!("{:.1}", o.count as f64 / secs),
            status_share(o),
            human(o.p50_ns),
            human(o.p95_ns),
            human(o.p99_ns),
            human(o.own_ns),
        ])
    });
    let ops = Table::new(
        rows,
        [
            Constraint::Min(30),
            Constraint::Length(9),
            Constraint::Length(7),
            Constraint::Length(10),
            Constraint::Length(10),
            Constraint::Length(10),
            Constraint::Length(11),
        ],
    )
    .header(Row::new(vec!["operation", "rate/s", "errors", "p50", "p95", "p99", "own time"]).style(bold))
    .block(Block::bordered().title(format!(
        " sockspan top: operations, last {} s, sorted by {} ",
        WINDOW.as_secs(),
        sort.label()
    )));
    f.render_widget(ops, ops_area);
    let total: u64 = r.services.iter().map(|(_, t)| t).sum::<u64>().max(1);
    let rows = r.services.iter().map(|(who, t)| {
        Row::new(vec![
            who.clone(),
            human(*t),
            format!("{:.1}%", *t as f64 * 100.0 / total as f64),
        ])
    });
    let svc = Table::new(
        rows,
        [Constraint::Min(30), Constraint::Length(11), Constraint::Length(7)],
    )
    .header(Row::new(vec!["service (own time; → callee: calls)", "own time", "share"]).style(bold))
    .block(Block::bordered().title(" time per service "));
    f.render_widget(svc, svc_area);
    let dropped = if dropped > 0 {
        format!("  ({dropped} spans beyond the window's bound left out)")
    } else {
        String::new()
    };
    f.render_widget(
        Paragraph::new(format!(
            "sort: p p99 · r rate · e errors · o own time · n name   q quit{dropped}"
        )),
        help,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::AttrValue;

    #[test]
    fn the_window_keeps_the_last_minute_and_is_bounded() {
        let mut w = Window::default();
        let at = |end_s: u64| {
            let mut s = Span::sample(end_s);
            s.end_unix_ns = end_s * 1_000_000_000;
            s.attributes.push(("user_agent.original", AttrValue::fixed("curl")));
            s.attributes.push((crate::vocab::attr::SERVER_PORT, AttrValue::Int(80)));
            s
        };
        for t in [10, 50, 100] {
            w.add(&at(t));
        }
        assert_eq!(w.spans[0].attributes.len(), 1, "only what the report reads is kept");
        w.expire(100 * 1_000_000_000);
        assert_eq!(w.spans.len(), 2, "the span that ended 90 s ago is gone");
        for i in 0..MAX_SPANS as u64 {
            w.add(&at(100 + i));
        }
        assert_eq!(w.spans.len(), MAX_SPANS);
        assert_eq!(w.dropped, 2);
    }

    #[test]
    fn sort_keys() {
        let op = |name: &str, count: u64, errors: u64, p99: u64, own: u64| OpStats {
            service: "s".into(),
            kind: crate::span::SpanKind::Server,
            name: name.into(),
            count,
            errors,
            p50_ns: 0,
            p95_ns: 0,
            p99_ns: p99,
            own_ns: own,
        };
        let mut ops = vec![op("a", 10, 5, 1, 9), op("b", 20, 0, 3, 1), op("c", 5, 1, 2, 5)];
        let names = |ops: &[OpStats]| ops.iter().map(|o| o.name.clone()).collect::<Vec<_>>().join("");
        SortKey::P99.sort(&mut ops);
        assert_eq!(names(&ops), "bca");
        SortKey::Rate.sort(&mut ops);
        assert_eq!(names(&ops), "bac");
        SortKey::Errors.sort(&mut ops);
        assert_eq!(names(&ops), "acb");
        SortKey::Own.sort(&mut ops);
        assert_eq!(names(&ops), "acb");
        SortKey::Name.sort(&mut ops);
        assert_eq!(names(&ops), "abc");
        assert_eq!(SortKey::from_key('r'), Some(SortKey::Rate));
        assert_eq!(SortKey::from_key('x'), None);
    }
}
