//! The configuration file (`--config FILE`, `SOCKSPAN_CONFIG`): YAML, one key per flag, named as
//! the flag in snake_case (`memory_limit: 128MiB`, `print: traces`, `service: [checkout, pay*]`,
//! `keep_path: true`). Precedence: defaults < file < `SOCKSPAN_*` environment < flags. A file's
//! values go through the flags' own parsers, so a bad value is refused as the flag would be,
//! naming the key and its line; an unknown key is refused the same way.
use std::{
    collections::BTreeSet,
    ffi::OsString,
    path::{Path, PathBuf},
};

use clap::{ArgAction, CommandFactory, FromArgMatches, parser::ValueSource};
use serde_json::{Value as Json, json};
use thiserror::Error;

use crate::config::Cli;

#[derive(Debug, Error)]
pub enum ConfigFileError {
    #[error("config {path}: {why}")]
    Read { path: String, why: String },
    #[error(
        "config {path}, line {line}: unknown key `{key}` (keys are the flags' long names in snake_case, see `sockspan --help`)"
    )]
    UnknownKey { path: String, line: usize, key: String },
    #[error("config {path}, line {line}: `{key}`: {why}")]
    BadValue {
        path: String,
        line: usize,
        key: String,
        why: String,
    },
}

/// Flags that are not settings: never in the file, never printed.
const NOT_SETTINGS: &[&str] = &["config", "print-config", "help", "version"];

/// Where each effective value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Default,
    File,
    Env,
    Flag,
}

/// The parsed command line with the file applied, and what `--print-config` shows.
pub struct Parsed {
    pub cli: Cli,
    /// (key, raw values, source) of every setting, in `--help` order.
    pub effective: Vec<(String, Vec<String>, Source)>,
}

/// Parses `args` (program name first), applying the file `--config` names.
pub fn parse(args: Vec<OsString>) -> Result<Result<Parsed, ConfigFileError>, clap::Error> {
    let first = Cli::command().try_get_matches_from(&args)?;
    let Some(path) = first.get_one::<PathBuf>("config").cloned() else {
        return finish(&first, &BTreeSet::new()).map(Ok);
    };
    let (file_args, from_file) = match file_args(&path, &first) {
        Ok(v) => v,
        Err(e) => return Ok(Err(e)),
    };
    let mut all = vec![args[0].clone()];
    all.extend(file_args);
    all.extend(args.into_iter().skip(1));
    let m = Cli::command().try_get_matches_from(&all)?;
    finish(&m, &from_file).map(Ok)
}

fn finish(m: &clap::ArgMatches, from_file: &BTreeSet<String>) -> Result<Parsed, clap::Error> {
    let cli = Cli::from_arg_matches(m)?;
    let mut effective = Vec::new();
    for arg in Cli::command().get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if NOT_SETTINGS.contains(&long) {
            continue;
        }
        let id = arg.get_id().as_str();
        let raw: Vec<String> = m
            .get_raw(id)
            .map(|v| v.map(|s| s.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let key = long.replace('-', "_");
        let source = match m.value_source(id) {
            _ if from_file.contains(&key) => Source::File,
            Some(ValueSource::EnvVariable) => Source::Env,
            Some(ValueSource::CommandLine) => Source::Flag,
            _ => Source::Default,
        };
        effective.push((key, raw, source));
    }
    Ok(Parsed { cli, effective })
}

/// The file's settings as flags, for the keys neither a flag nor the environment set.
fn file_args(path: &Path, first: &clap::ArgMatches) -> Result<(Vec<OsString>, BTreeSet<String>), ConfigFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigFileError::Read {
        path: shown.clone(),
        why: e.to_string(),
    })?;
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|e| ConfigFileError::Read {
        path: shown.clone(),
        why: e.to_string(),
    })?;
    let map = match doc {
        serde_yaml::Value::Mapping(m) => m,
        serde_yaml::Value::Null => serde_yaml::Mapping::new(),
        _ => {
            return Err(ConfigFileError::Read {
                path: shown,
                why: "not a mapping of keys to values".into(),
            });
        }
    };
    let cmd = Cli::command();
    let (mut args, mut keys) = (Vec::new(), BTreeSet::new());
    for (k, v) in map {
        let key = match k {
            serde_yaml::Value::String(s) => s,
            other => format!("{other:?}"),
        };
        let line = line_of(&text, &key);
        let unknown = || ConfigFileError::UnknownKey {
            path: shown.clone(),
            line,
            key: key.clone(),
        };
        let long = key.replace('_', "-");
        if NOT_SETTINGS.contains(&long.as_str()) {
            return Err(unknown());
        }
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()))
            .ok_or_else(unknown)?;
        let bad = |why: String| ConfigFileError::BadValue {
            path: shown.clone(),
            line,
            key: key.clone(),
            why,
        };
        let values: Vec<String> = match v {
            serde_yaml::Value::Sequence(items) => items.iter().map(scalar).collect::<Option<_>>(),
            one => scalar(&one).map(|s| vec![s]),
        }
        .ok_or_else(|| bad("expected a value or a list of values".into()))?;
        let these: Vec<OsString> = match arg.get_action() {
            ArgAction::SetTrue => match values.as_slice() {
                [b] if b == "true" => vec![format!("--{long}").into()],
                [b] if b == "false" => Vec::new(),
                _ => return Err(bad("expected true or false".into())),
            },
            _ => values.iter().map(|v| format!("--{long}={v}").into()).collect(),
        };
        // Checked alone with the flag's own parser, so an error names this key.
        let mut alone = vec![OsString::from("sockspan")];
        alone.extend(these.iter().cloned());
        if let Err(e) = Cli::command().try_get_matches_from(&alone) {
            return Err(bad(first_line(&e)));
        }
        let id = arg.get_id().as_str();
        if matches!(
            first.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        keys.insert(key.clone());
        args.extend(these);
    }
    Ok((args, keys))
}

/// A clap error's first line, without its `error: ` prefix (not its usage block).
pub fn first_line(e: &clap::Error) -> String {
    let msg = e.to_string();
    msg.lines()
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ")
        .to_owned()
}

fn scalar(v: &serde_yaml::Value) -> Option<String> {
    match v {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The 1-based line where top-level `key` is set (0 if not found as such).
fn line_of(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
                || l.strip_prefix(&format!("\"{key}\""))
                    .is_some_and(|r| r.trim_start().starts_with(':'))
        })
        .map_or(0, |i| i + 1)
}

/// Environment variables whose values are secrets: shown masked.
const SECRET_ENV: &[&str] = &["OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"];

/// `--print-config`: every setting with its value and where it came from, then the OpenTelemetry
/// variables in effect, secrets masked.
pub fn render(p: &Parsed, env: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::from("# sockspan's effective configuration: value  # where it came from\n");
    for (key, values, source) in &p.effective {
        let value = match values.as_slice() {
            [] => "~".to_owned(),
            [one] => yaml_scalar(one),
            many => format!(
                "[{}]",
                many.iter().map(|v| yaml_scalar(v)).collect::<Vec<_>>().join(", ")
            ),
        };
        let source = match source {
            Source::Default => "default",
            Source::File => "file",
            Source::Env => "env",
            Source::Flag => "flag",
        };
        out.push_str(&format!("{key}: {value}  # {source}\n"));
    }
    out.push_str("# OpenTelemetry variables (environment)\n");
    for var in OTEL_VARS {
        if let Some(v) = env(var) {
            let v = if SECRET_ENV.contains(var) { mask_headers(&v) } else { v };
            out.push_str(&format!("# {var}={v}\n"));
        }
    }
    out
}

const OTEL_VARS: &[&str] = &[
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_BSP_EXPORT_TIMEOUT",
    "OTEL_BSP_MAX_CONCURRENT_EXPORTS",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_KEY",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
];

/// `k=v,k2=v2` with every value replaced by `***`.
fn mask_headers(v: &str) -> String {
    v.split(',')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) => format!("{k}=***"),
            None => "***".to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn yaml_scalar(v: &str) -> String {
    let plain = !v.is_empty()
        && v.chars().all(|c| c.is_ascii_alphanumeric() || "._-/:".contains(c))
        && !v.starts_with(['-', ':']);
    if plain { v.to_owned() } else { format!("{v:?}") }
}

/// The JSON schema of the file (docs/config.schema.json), from the flags themselves.
pub fn schema() -> Json {
    let mut props = serde_json::Map::new();
    for arg in Cli::command().get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if NOT_SETTINGS.contains(&long) {
            continue;
        }
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        let one = json!({"type": ["string", "number"]});
        let mut p = match arg.get_action() {
            ArgAction::SetTrue => json!({"type": "boolean"}),
            ArgAction::Append => json!({"oneOf": [one, {"type": "array", "items": one}]}),
            _ => one,
        };
        let values: Vec<String> = arg
            .get_possible_values()
            .iter()
            .map(|v| v.get_name().to_owned())
            .collect();
        if !values.is_empty() && !matches!(arg.get_action(), ArgAction::SetTrue) {
            p = json!({"enum": values});
        }
        p["description"] = Json::String(help);
        if let Some(d) = arg.get_default_values().first() {
            p["default"] = Json::String(d.to_string_lossy().into_owned());
        }
        props.insert(long.replace('-', "_"), p);
    }
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "sockspan configuration file (--config)",
        "type": "object",
        "additionalProperties": false,
        "properties": props,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("sockspan-config-{}-{n}.yaml", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    fn parse_with(file: &str, args: &[&str]) -> Result<Parsed, String> {
        let path = write(file);
        let mut all: Vec<OsString> = vec!["sockspan".into(), "--config".into(), path.clone().into()];
        all.extend(args.iter().map(OsString::from));
        let r = match parse(all) {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => Err(e.to_string().replace(&path.display().to_string(), "FILE")),
            Err(e) => Err(e.to_string()),
        };
        let _ = std::fs::remove_file(path);
        r
    }

    fn source(p: &Parsed, key: &str) -> Source {
        p.effective.iter().find(|(k, _, _)| k == key).map(|e| e.2).unwrap()
    }

    /// Environment variables are read by clap at parse time; the tests below use keys whose
    /// `SOCKSPAN_*` twins no test sets, and flags for the higher precedence.
    #[test]
    fn file_values_sit_between_defaults_and_flags() {
        let p = parse_with(
            "memory_limit: 128MiB\nkeep_path: true\nservice: [checkout, 'pay*']\nprint: traces\nunhealthy_after: 30\n",
            &["--unhealthy-after", "90"],
        )
        .unwrap();
        assert_eq!(p.cli.memory_limit, 128 << 20);
        assert!(p.cli.keep_path);
        assert_eq!(p.cli.filter.services, vec!["checkout", "pay*"]);
        assert_eq!(p.cli.print, Some(crate::config::PrintArg::Traces));
        assert_eq!(p.cli.unhealthy_after, 90, "the flag wins over the file");
        assert_eq!(source(&p, "memory_limit"), Source::File);
        assert_eq!(source(&p, "unhealthy_after"), Source::Flag);
        assert_eq!(source(&p, "capture_bytes"), Source::Default);
        let shown = render(&p, |_| None);
        assert!(shown.contains("memory_limit: 128MiB  # file"), "{shown}");
        assert!(shown.contains("service: [checkout, \"pay*\"]  # file"), "{shown}");
    }

    #[test]
    fn a_bad_file_names_the_key_and_its_line() {
        let e = parse_with("memory_limit: 128MiB\ncapture_bites: 512\n", &[])
            .err()
            .unwrap();
        assert!(e.starts_with("config FILE, line 2: unknown key `capture_bites`"), "{e}");
        let e = parse_with("# comment\n\nstatus: 7\n", &[]).err().unwrap();
        assert!(e.starts_with("config FILE, line 3: `status`: invalid value '7'"), "{e}");
        let e = parse_with("keep_path: maybe\n", &[]).err().unwrap();
        assert!(e.contains("line 1: `keep_path`: expected true or false"), "{e}");
        let e = parse_with("- just\n- a list\n", &[]).err().unwrap();
        assert!(e.contains("not a mapping"), "{e}");
        let e = parse_with("config: other.yaml\n", &[]).err().unwrap();
        assert!(e.contains("unknown key `config`"), "{e}");
        let e = parse_with("memory_limit: [1, {a: b}]\n", &[]).err().unwrap();
        assert!(e.contains("expected a value or a list"), "{e}");
    }

    #[test]
    fn secrets_are_masked() {
        let p = parse_with("", &[]).unwrap();
        let env = |k: &str| (k == "OTEL_EXPORTER_OTLP_HEADERS").then(|| "api-key=s3cret,x-team=blue".to_owned());
        let shown = render(&p, env);
        assert!(
            shown.contains("# OTEL_EXPORTER_OTLP_HEADERS=api-key=***,x-team=***"),
            "{shown}"
        );
        assert!(!shown.contains("s3cret"));
    }

    /// docs/config.schema.json is the schema of the flags as they are (regenerate with
    /// `SOCKSPAN_WRITE_SCHEMA=1 cargo test -p agent config_file`).
    #[test]
    fn the_documented_schema_is_current() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config.schema.json");
        let want = serde_json::to_string_pretty(&schema()).unwrap() + "\n";
        if std::env::var_os("SOCKSPAN_WRITE_SCHEMA").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "docs/config.schema.json is stale: SOCKSPAN_WRITE_SCHEMA=1 cargo test -p agent config_file"
        );
    }
}
