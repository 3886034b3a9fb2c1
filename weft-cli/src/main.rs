//! `weft observe`: the mesh's flows, live, from every node's tunnel.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::mpsc;
use tunnel_proto::flow_merge::Merger;
use tunnel_proto::flows::{FlowFilter, FlowQuery, now_ms};
use weft::render::{Output, text};
use weft::source::{Line, Source};

#[derive(Parser)]
#[command(name = "weft", version, about = "Weft, for the mesh's users")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show connections, HTTP requests and verdicts as the tunnels see them, merged in time
    /// order (the filters are applied by each tunnel, where the events are made).
    Observe(ObserveArgs),
}

#[derive(clap::Args)]
struct ObserveArgs {
    /// A tunnel's admin endpoint to ask, HOST:PORT, or HOST:PORT@/run/netns/NAME to reach it
    /// from inside a network namespace (one machine's simulated nodes); repeatable.
    #[arg(long = "tunnel", default_value = "127.0.0.1:15000")]
    tunnels: Vec<Source>,
    /// The controller's flow relay instead, which merges every node's flows: HOST:PORT (on a
    /// cluster, after `kubectl -n weft-system port-forward deploy/weft-controller 15010`,
    /// 127.0.0.1:15010), or HOST:PORT@/run/netns/NAME.
    #[arg(long, conflicts_with = "tunnels")]
    relay: Option<Source>,
    /// Only flows with either end in this namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Only flows from this pod (namespace/name).
    #[arg(long)]
    from_pod: Option<String>,
    /// Only flows to this pod (namespace/name).
    #[arg(long)]
    to_pod: Option<String>,
    /// Only flows from this SPIFFE ID.
    #[arg(long)]
    from_identity: Option<String>,
    /// Only TCP connection events or only HTTP requests.
    #[arg(long = "type", value_parser = ["tcp", "http"])]
    protocol: Option<String>,
    /// Only flows allowed, only flows denied, or only requests an Audit policy matched.
    #[arg(long, value_parser = ["allowed", "denied", "audited"])]
    verdict: Option<String>,
    /// Only events this recent (e.g. 30s, 5m).
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// The last N events (of all tunnels together) first.
    #[arg(long)]
    last: Option<usize>,
    /// Keep printing new events as they happen.
    #[arg(long, short)]
    follow: bool,
    #[arg(long, short, value_enum, default_value = "text")]
    output: Output,
}

/// How long an event is held so that another tunnel's earlier one can come first.
const WINDOW_MS: u64 = 250;

/// The tunnels' question: the filters as given (each checked as the tunnels check it), and
/// `--since` as a time.
fn question(args: &ObserveArgs) -> anyhow::Result<FlowQuery> {
    let mut filter = FlowFilter::default();
    for (name, value) in [
        ("namespace", &args.namespace),
        ("from_pod", &args.from_pod),
        ("to_pod", &args.to_pod),
        ("from_identity", &args.from_identity),
        ("type", &args.protocol),
        ("verdict", &args.verdict),
    ] {
        if let Some(value) = value {
            filter
                .set(name, value)
                .with_context(|| format!("--{}", name.replace('_', "-")))?;
        }
    }
    filter.since_ms = args
        .since
        .map(|since| now_ms().saturating_sub(since.as_millis() as u64));
    Ok(FlowQuery {
        filter,
        last: args.last,
        follow: args.follow,
    })
}

fn main() -> std::process::ExitCode {
    let Command::Observe(args) = Args::parse().command;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weft: cannot start: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(observe(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn observe(args: ObserveArgs) -> anyhow::Result<()> {
    let question = question(&args)?;
    let query = question.to_query();
    let (tx, mut rx) = mpsc::channel(4096);
    let through_relay = args.relay.is_some();
    let sources = match args.relay {
        Some(relay) => vec![relay],
        None => args.tunnels,
    };
    let names: Vec<String> = sources.iter().map(ToString::to_string).collect();
    for (i, source) in sources.into_iter().enumerate() {
        tokio::spawn(source.stream(query.clone(), tx.clone(), i));
    }
    drop(tx);
    let colour = args.output == Output::Text && std::io::stdout().is_terminal();
    let mut out = std::io::stdout().lock();
    let mut print = |event: &serde_json::Value| -> anyhow::Result<()> {
        match args.output {
            Output::Json => writeln!(out, "{event}"),
            Output::Text => writeln!(out, "{}", text(event, colour)),
        }
        .and_then(|()| out.flush())
        .context("cannot write to standard output")
    };
    let mut merger = Merger::new(WINDOW_MS);
    let mut open = names.len();
    let mut failures = Vec::new();
    let mut first = true;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    while open > 0 {
        tokio::select! {
            line = rx.recv() => match line {
                Some((i, Line::Json(value))) => {
                    if let Some(lost) = value["lost"].as_u64() {
                        eprintln!("weft: {} lost {lost} events on the way: a reader (this command, or the relay) read too slowly", names[i]);
                    } else if let Some(notice) = value["notice"].as_str() {
                        eprintln!("weft: {}: {notice}", names[i]);
                    } else {
                        merger.push(value["time_ms"].as_u64().unwrap_or(0), value);
                    }
                }
                Some((i, Line::Ended(error))) => {
                    open -= 1;
                    if let Some(error) = error {
                        eprintln!("weft: {error}");
                        failures.push(names[i].clone());
                    }
                }
                None => break,
            },
            _ = tick.tick(), if question.follow => {
                // The ring's events first (at most --last of all tunnels together), then live
                // ones once the window has passed.
                let ready = if first {
                    first = false;
                    tokio::time::sleep(Duration::from_millis(WINDOW_MS)).await;
                    merger.drain(question.last)
                } else {
                    merger.ready(now_ms())
                };
                for event in &ready {
                    print(event)?;
                }
            }
        }
    }
    for event in &merger.drain(question.last) {
        print(event)?;
    }
    anyhow::ensure!(
        failures.len() < names.len(),
        "{} ({})",
        if through_relay {
            "the relay did not answer: on a cluster, is `kubectl -n weft-system port-forward deploy/weft-controller 15010` running?"
        } else {
            "no tunnel answered"
        },
        failures.join(", ")
    );
    Ok(())
}
