//! The generated references under `docs/reference/`, one source each: `flags.md`
//! from the clap definition of the `ferrite` command line (`ferrite_agent::cli`),
//! `metrics.md` from the agent's Prometheus registry (`telemetry::Telemetry`, as
//! `/metrics` encodes it). The test renders both and compares them with the files;
//! `FERRITE_DOCS_UPDATE=1` rewrites the files instead. No root needed.
use std::{fmt::Write as _, fs, path::Path};

use clap::{Arg, CommandFactory};
use ferrite_agent::{cli::Cli, telemetry::Telemetry};

const DOCS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/reference");
const UPDATE: &str = "FERRITE_DOCS_UPDATE";
const REGENERATE: &str = "FERRITE_DOCS_UPDATE=1 cargo test -p ferrite-agent --test docs_reference";

/// A markdown table cell: one line, no unescaped `|`.
fn cell(text: &str) -> String {
    let joined = text
        .split("\n\n")
        .map(|paragraph| paragraph.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("<br>");
    joined.replace('|', "\\|")
}

/// `--flag <VALUE>`, `-o, --output <OUTPUT>`, or `<TABLE>` for a positional.
fn flag(arg: &Arg) -> String {
    let value = || {
        let names: Vec<String> = match arg.get_value_names() {
            Some(names) => names.iter().map(|n| format!("<{n}>")).collect(),
            None => vec![format!("<{}>", arg.get_id().as_str().to_uppercase())],
        };
        names.join(" ")
    };
    if arg.is_positional() {
        return value();
    }
    let mut out = String::new();
    if let Some(short) = arg.get_short() {
        write!(out, "-{short}, ").unwrap();
    }
    if let Some(long) = arg.get_long() {
        write!(out, "--{long}").unwrap();
    }
    if arg.get_action().takes_values() {
        write!(out, " {}", value()).unwrap();
    }
    if matches!(arg.get_action(), clap::ArgAction::Append) {
        out.push_str(" (repeatable)");
    }
    out
}

fn description(arg: &Arg) -> String {
    let help = arg
        .get_long_help()
        .or(arg.get_help())
        .map(|h| h.to_string())
        .unwrap_or_default();
    let mut text = cell(&help);
    let values: Vec<String> = arg
        .get_possible_values()
        .iter()
        .filter(|v| !v.is_hide_set())
        .map(|v| match v.get_help() {
            Some(help) => format!("`{}`: {}", v.get_name(), cell(&help.to_string())),
            None => format!("`{}`", v.get_name()),
        })
        .collect();
    if !values.is_empty() && arg.get_action().takes_values() {
        if !text.is_empty() {
            text.push_str("<br>");
        }
        write!(text, "Values: {}.", values.join("; ")).unwrap();
    }
    if arg.is_required_set() {
        text.insert_str(0, "**Required.** ");
    }
    text.trim_end().to_string()
}

fn render_flags() -> String {
    let mut cmd = Cli::command().name("ferrite").bin_name("ferrite");
    cmd.build();
    let mut out = String::new();
    writeln!(out, "# `ferrite` command-line reference\n").unwrap();
    writeln!(
        out,
        "Generated from the clap definitions in `agent/src/cli.rs` by \
         `agent/tests/docs_reference.rs`, which fails when this file is stale; do not \
         edit it by hand: `{REGENERATE}` rewrites it. What the flags are for: \
         [operations](../operations.md); the debugging commands in use: \
         [README](../../README.md#debugging).\n"
    )
    .unwrap();
    if let Some(about) = cmd.get_about() {
        writeln!(out, "{}\n", cell(&about.to_string())).unwrap();
    }
    writeln!(out, "| command | what it does |\n|---|---|").unwrap();
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = sub.get_name();
        let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
        writeln!(
            out,
            "| [`ferrite {name}`](#ferrite-{name}) | {} |",
            cell(&about)
        )
        .unwrap();
    }
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = sub.get_name();
        writeln!(out, "\n## `ferrite {name}`\n").unwrap();
        let about = sub
            .get_long_about()
            .or(sub.get_about())
            .map(|a| a.to_string())
            .unwrap_or_default();
        writeln!(out, "{}\n", cell(&about).replace("<br>", "\n\n")).unwrap();
        let usage = sub.clone().render_usage().to_string();
        writeln!(out, "```\n{}\n```\n", usage.trim()).unwrap();
        writeln!(
            out,
            "| flag | default | env | description |\n|---|---|---|---|"
        )
        .unwrap();
        for arg in sub
            .get_arguments()
            .filter(|a| !a.is_hide_set() && !matches!(a.get_id().as_str(), "help" | "version"))
        {
            let default: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            let default = if default.is_empty() {
                String::new()
            } else {
                format!("`{}`", default.join(" "))
            };
            let env = arg
                .get_env()
                .map(|e| format!("`{}`", e.to_string_lossy()))
                .unwrap_or_default();
            writeln!(
                out,
                "| `{}` | {} | {} | {} |",
                flag(arg),
                default,
                env,
                description(arg)
            )
            .unwrap();
        }
    }
    out
}

#[derive(Debug, Default)]
struct Metric {
    name: String,
    kind: String,
    labels: Vec<String>,
    help: String,
}

fn render_metrics() -> String {
    let telemetry = Telemetry::new("/nonexistent".into(), Default::default());
    telemetry.add_a_series_to_every_family();
    let encoded = telemetry.render().expect("encode the registry");
    // In registration order, from the `# HELP` / `# TYPE` lines and the label names
    // of the series after them.
    let mut metrics: Vec<Metric> = Vec::new();
    for line in encoded.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            metrics.push(Metric {
                name: name.to_string(),
                help: help.to_string(),
                ..Metric::default()
            });
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
            let metric = metrics.last_mut().expect("# TYPE after # HELP");
            assert_eq!(metric.name, name, "{encoded}");
            metric.kind = kind.to_string();
        } else if let (Some(metric), Some((_, labels))) = (metrics.last_mut(), line.split_once('{'))
        {
            let labels = labels.split_once('}').map_or(labels, |(l, _)| l);
            for label in labels.split(',').filter_map(|l| l.split_once('=')) {
                if label.0 != "le" && !metric.labels.iter().any(|l| l == label.0) {
                    metric.labels.push(label.0.to_string());
                }
            }
        }
    }
    assert!(metrics.len() >= 20, "metrics found: {metrics:?}\n{encoded}");
    let mut out = String::new();
    writeln!(out, "# Metrics reference\n").unwrap();
    writeln!(
        out,
        "The agent's Prometheus metrics on `/metrics` (`--http-addr`, default \
         `127.0.0.1:9965`). Generated from the registry in `agent/src/telemetry.rs` \
         (prometheus-client's text encoding) by `agent/tests/docs_reference.rs`, which \
         fails when this file is stale; do not edit it by hand: `{REGENERATE}` \
         rewrites it. Labels and what the values mean: \
         [operations](../operations.md#metrics).\n"
    )
    .unwrap();
    writeln!(
        out,
        "Counters are exposed with the `_total` suffix (`ferrite_syncs_total`), \
         histograms as `_bucket`, `_sum` and `_count` series.\n"
    )
    .unwrap();
    writeln!(
        out,
        "The `reason` label of `ferrite_datapath_packets` and `ferrite_datapath_bytes` \
         takes the datapath's counter names (`ferrite_common::stat::NAMES`, also \
         `ferrite inspect stats`): {}.\n",
        ferrite_common::stat::NAMES
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    )
    .unwrap();
    writeln!(out, "| metric | type | labels | help |\n|---|---|---|---|").unwrap();
    for metric in metrics {
        let labels: Vec<String> = metric.labels.iter().map(|l| format!("`{l}`")).collect();
        writeln!(
            out,
            "| `{}` | {} | {} | {} |",
            metric.name,
            metric.kind,
            labels.join(", "),
            cell(&metric.help)
        )
        .unwrap();
    }
    out
}

/// Compare `generated` with the file, or rewrite it under `FERRITE_DOCS_UPDATE`.
fn check(file: &str, generated: &str) -> Result<(), String> {
    let path = Path::new(DOCS).join(file);
    if std::env::var_os(UPDATE).is_some() {
        fs::create_dir_all(DOCS).expect("docs/reference");
        fs::write(&path, generated).expect("write the reference");
        return Ok(());
    }
    let current = fs::read_to_string(&path).unwrap_or_default();
    if current == generated {
        return Ok(());
    }
    let first = current
        .lines()
        .zip(generated.lines())
        .position(|(a, b)| a != b)
        .unwrap_or_else(|| current.lines().count().min(generated.lines().count()));
    Err(format!(
        "docs/reference/{file} is stale (first difference at line {}):\n  in the file: {:?}\n  generated:   {:?}\nRegenerate it with `{REGENERATE}` and commit it.",
        first + 1,
        current.lines().nth(first).unwrap_or("<end of file>"),
        generated.lines().nth(first).unwrap_or("<end of file>"),
    ))
}

#[test]
fn the_flags_and_metrics_references_are_generated_from_their_sources() {
    let failures: Vec<String> = [
        check("flags.md", &render_flags()),
        check("metrics.md", &render_metrics()),
    ]
    .into_iter()
    .filter_map(Result::err)
    .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
