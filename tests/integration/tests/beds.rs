//! Accuracy test beds for in-process parent links (see `src/beds.rs`): per runtime, a middle
//! service fans each request out into three backend calls that share no identifier with it, and
//! the agent's parents are scored against the service's own record of what it did. One test per
//! runtime, each under one agent: concurrency 1, 8 and 32 with keep-alive on and off.
//!
//! Needs root, the release agent, python3 and the runtime (node, aiohttp, go, a JDK); skips
//! outside CI when missing, panics with CI=true. Run with `--test-threads=1 --nocapture` to see
//! the scoreboard; `SOCKSPAN_SCOREBOARD=<file>` appends it to a file too.

use std::time::Instant;

use agent_integration_tests::{
    Receiver,
    beds::{self, BedConfig, BedRow, Middle, Runtime, append_scoreboard, format_scoreboard},
    harness::{AgentBuilder, Metrics, Protocol, serial},
    require,
    topology::ClassScore,
};
use anyhow::Result;

/// Minimum in-process recall of a row: what the rules reach today, as measured (docs/accuracy.md
/// says what each runtime lacks and why). Precision is asserted everywhere.
fn recall_floor(rt: Runtime, concurrency: usize, keepalive: bool) -> f64 {
    match (rt, concurrency, keepalive) {
        // One request in flight: the thread rule links every call.
        (Runtime::Node | Runtime::NodePool | Runtime::Asyncio, 1, _) => 0.95,
        // At concurrency 4 stretches hold fewer callbacks: more calls come last in theirs
        // (measured 29-43%), some confirmed by a stretch that read one connection only.
        (Runtime::Node, 4, true) => 0.15,
        // The event-loop rule, when a later read in the same stretch of the loop confirms the
        // call came from an I/O callback (measured 51-76% at c=8-32); with a new connection per
        // call, the connects come in the stretch's last callback and are rarely confirmed.
        (Runtime::Node, _, true) => 0.35,
        // The goroutine rule: the hooks name the goroutine that asked for each call and the
        // ones that created it (measured 100 % in every row); the issue's target is 90 %.
        (Runtime::Go, _, _) => 0.90,
        _ => 0.0,
    }
}

/// A wrong in-process parent is worse than none: it sends a reader down the wrong trace.
const MIN_PRECISION: f64 = 0.995;

/// (concurrency, requests), each with keep-alive on and off.
const RUNS: [(usize, usize); 4] = [(1, 20), (4, 40), (8, 80), (32, 160)];

fn pct(x: f64) -> String {
    format!("{:.2}%", 100.0 * x)
}

/// Start an agent, the backend and M (once per keep-alive setting), run every config, print and
/// record the scoreboard, then assert.
fn bed(rt: Runtime) -> Result<()> {
    let t0 = Instant::now();
    let rx = Receiver::start()?;
    let agent = AgentBuilder::new().otlp(&rx, Protocol::Grpc).metrics().start()?;
    let backend = beds::start_backend()?;
    let mut rows: Vec<BedRow> = Vec::new();
    let mut failures = Vec::new();
    for keepalive in [true, false] {
        let m = Middle::start(rt, backend.port, keepalive)?;
        for (concurrency, count) in RUNS {
            let run = beds::run_config(&rx, &m, &BedConfig { concurrency, count })?;
            let tag = run.tag();
            let (i, x, r) = (&run.row.inproc, &run.row.cross, &run.row.root);
            println!(
                "--- {tag} {count} requests in {:.2}s, {} spans; in-process precision {} recall {}; cross-process precision {} recall {}",
                run.load_time.as_secs_f64(),
                run.spans,
                pct(i.precision()),
                pct(i.recall()),
                pct(x.precision()),
                pct(x.recall()),
            );
            for n in run.notes.iter().chain(&run.wrong) {
                println!("{n}");
            }
            failures.extend(run.problems.iter().map(|p| format!("{tag} {p}")));
            let wrong = run.wrong.join("\n");
            if i.precision() < MIN_PRECISION {
                failures.push(format!(
                    "{tag} in-process precision {} < {}\n{wrong}",
                    pct(i.precision()),
                    pct(MIN_PRECISION)
                ));
            }
            let floor = recall_floor(rt, concurrency, keepalive);
            if i.recall() < floor {
                failures.push(format!(
                    "{tag} in-process recall {} < floor {}",
                    pct(i.recall()),
                    pct(floor)
                ));
            }
            if x.wrong > 0 || r.wrong > 0 {
                failures.push(format!(
                    "{tag} {} wrong cross-process parents (precision {}), {} loadgen roots with a parent\n{wrong}",
                    x.wrong,
                    pct(x.precision()),
                    r.wrong
                ));
            }
            rows.push(run.row);
        }
    }
    drop(backend);
    failures.extend(check_loop_counters(rt, &agent.metrics()?));
    agent.stop()?;
    let table = format_scoreboard(&rows);
    println!(
        "=== {} bed ({:.1}s) ===\n{table}",
        rt.name(),
        t0.elapsed().as_secs_f64()
    );
    append_scoreboard(&table)?;
    assert!(
        failures.is_empty(),
        "{} failed checks:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

/// The event-loop and Go counters are exported, and say what the agent did with this runtime:
/// it named loop causes in Node.js, recognised the Go program as one where it must not, and
/// hooked the Go program.
fn check_loop_counters(rt: Runtime, m: &Metrics) -> Vec<String> {
    let get = |name: &str, label: &str| m.value(name, Some(label)).unwrap_or(-1.0);
    let hints = get("sockspan_loop_hints_total", r#"via="stretch""#);
    let go = get("sockspan_loop_abstained_total", r#"reason="go_program""#);
    println!("loop counters: hints via stretch {hints}, abstained for a Go program {go}");
    let mut failures = Vec::new();
    if hints < 0.0 || go < 0.0 {
        failures.push(format!("loop counters missing from /metrics:\n{}", m.text));
    }
    let hooked = get("sockspan_go_executables_total", r#"result="hooked""#);
    let chains = get("sockspan_go_chains_total", r#"asker="known""#);
    println!("go counters: executables hooked {hooked}, requests with a known asker {chains}");
    match rt {
        Runtime::Node if hints <= 0.0 => failures.push("no loop hints counted for Node.js".into()),
        Runtime::Go if go <= 0.0 => failures.push("no Go program recognised by the loop tracker".into()),
        Runtime::Go if hooked < 1.0 || chains <= 0.0 => {
            failures.push(format!("Go hooks not attached or silent:\n{}", m.text))
        }
        _ => {}
    }
    failures
}

#[test]
fn node_bed() -> Result<()> {
    let _g = serial();
    require!(Python, Node);
    bed(Runtime::Node)
}

#[test]
fn node_pool_bed() -> Result<()> {
    let _g = serial();
    require!(Python, Node);
    bed(Runtime::NodePool)
}

#[test]
fn asyncio_bed() -> Result<()> {
    let _g = serial();
    require!(Python, Aiohttp);
    bed(Runtime::Asyncio)
}

#[test]
fn go_bed() -> Result<()> {
    let _g = serial();
    require!(Python, Go);
    bed(Runtime::Go)
}

/// A Go service already serving, its client pool open, when the agent starts (a DaemonSet rolled
/// out onto running pods): requests written over connections that predate the hooks are
/// followed too, since the hooks key them by request, not by connection.
#[test]
fn go_started_before_the_agent() -> Result<()> {
    let _g = serial();
    require!(Python, Go);
    let rx = Receiver::start()?;
    let backend = beds::start_backend()?;
    let m = Middle::start(Runtime::Go, backend.port, true)?;
    let cfg = BedConfig {
        concurrency: 8,
        count: 80,
    };
    let warm = beds::load(&m, &cfg)?;
    assert!(
        warm.iter().all(|r| r.status == 200),
        "warm-up failed: {}",
        m.output_tail()
    );
    let agent = AgentBuilder::new().otlp(&rx, Protocol::Grpc).metrics().start()?;
    // the hooks attach when the process is first seen moving bytes: give them that moment
    let _ = beds::load(
        &m,
        &BedConfig {
            concurrency: 1,
            count: 2,
        },
    )?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    let run = beds::run_config(&rx, &m, &cfg)?;
    let i = &run.row.inproc;
    println!(
        "--- go, started before the agent: in-process precision {} recall {}",
        pct(i.precision()),
        pct(i.recall())
    );
    let metrics = agent.metrics()?;
    agent.stop()?;
    assert!(run.problems.is_empty(), "{:?}", run.problems);
    assert!(i.precision() >= MIN_PRECISION, "{}", run.wrong.join("\n"));
    assert!(
        i.recall() >= recall_floor(Runtime::Go, 8, true),
        "recall {}",
        pct(i.recall())
    );
    let unknown = metrics.value("sockspan_go_chains_total", Some(r#"asker="unknown""#));
    assert_eq!(unknown, Some(0.0), "calls over pooled connections lost their asker");
    Ok(())
}

#[test]
fn java_bed() -> Result<()> {
    let _g = serial();
    require!(Python, Java);
    bed(Runtime::Java)
}

#[test]
fn pool_bed() -> Result<()> {
    let _g = serial();
    require!(Python);
    bed(Runtime::Pool)
}

/// The scoreboard itself, without the agent.
#[test]
fn scoreboard_format() {
    let score = ClassScore {
        expected: 24,
        correct: 20,
        wrong: 1,
        missing: 2,
        lost: 1,
    };
    let row = |runtime, concurrency, keepalive| BedRow {
        runtime,
        concurrency,
        keepalive,
        inproc: score.clone(),
        cross: ClassScore::default(),
        root: ClassScore::default(),
        links_right: 2,
        links_wrong: 0,
    };
    let t = format_scoreboard(&[
        row(Runtime::Go, 8, false),
        row(Runtime::Node, 8, true),
        row(Runtime::Go, 8, true),
    ]);
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines.len(), 5, "{t}");
    assert!(
        lines[2].starts_with("| node      |    8 | on         |    24 |    95.24% |  83.33% |     1 |       2 |    1 |           2 |           0 |"),
        "{t}"
    );
    assert!(lines[3].starts_with("| go        |    8 | on "), "{t}");
    assert!(lines[4].starts_with("| go        |    8 | off"), "{t}");
    // nothing decided: precision 100%, nothing expected: recall 100%
    assert!(
        lines[2].ends_with("|           0 |         100.00% |      100.00% |"),
        "{t}"
    );
}
