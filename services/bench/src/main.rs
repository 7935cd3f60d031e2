//! rt-bench: load generator and benchmarks.
//!
//! `rt-bench publish` measures publish throughput (events committed per
//! second) on one hot topic and on 100 topics, next to a raw batched INSERT
//! into the same Postgres in the same run.
//!
//! `rt-bench poll` measures long-poll wake-up: 1,000 waiters long-poll one
//! topic while events are published to it one at a time; it reports publish →
//! response latency, poll round trips and events delivered per second, and
//! checks that every waiter got every event exactly once and in order. In
//! the same run, the same waiters and publisher measure a long-poll ceiling
//! (a minimal server answering from memory), and the server's figures are
//! also given as a ratio of it.
//!
//! `rt-bench sse` measures Server-Sent Events with 1,000 and 10,000 streams on
//! one topic, served by the `realtime` binary in a process of its own: the
//! server's memory per idle stream, publish → event latency at a fixed rate
//! (every stream must get every event exactly once and in order), and
//! deliveries per second under a burst of batch publishes.
//!
//! `rt-bench ws` measures WebSockets the same way, with 1,000 and 10,000
//! sockets subscribed to one topic on a `realtime` process of its own:
//! memory per idle socket, publish → event latency at a fixed rate (checked
//! exactly once and in order), deliveries per second under a burst, and the
//! latency from a publish sent over a WebSocket to its ack.
//!
//! With `--distributed` (and `--nats-url`), `sse` and `ws` run the services
//! as deployments do instead: the `publisher` and the edge (`sse-edge`,
//! `ws-edge`) as two processes over NATS, the clients on the edge and the
//! HTTP publishes to the publisher; the memory and server CPU are the edge's.
//!
//! `rt-bench push` measures Web Push delivery: 10,000 push subscriptions on
//! one topic, registered over HTTP, then a few events published to it; the
//! dispatcher (in this process, over a fresh Postgres database) delivers
//! every event to every subscription on a push-service emulator (in this
//! process too) that verifies VAPID and decrypts each body. It reports
//! deliveries per second, publish → delivery latency and the registration
//! rate, checks every (event, subscription) pair arrived exactly once, and
//! gives the process's CPU time, which dispatcher and emulator share.
//!
//! `rt-bench raw` measures the raw ceiling the same way: a minimal tokio
//! server (`rt-bench raw-server`, in a process of its own) writing the same
//! pre-encoded SSE-shaped frame to 1,000 and 10,000 loopback sockets, with no
//! protocol logic, so that the edges' figures can be given as a ratio of it.
//!
//! `rt-bench compare` runs `raw`, `sse` and `ws` in turn for the same
//! connection counts (default 1,000, one run each), each as a child process
//! of its own, one after the other, and reports every edge figure next to the
//! ceiling's from the same invocation and as a ratio of it, against the
//! project's targets: burst deliveries/s at least 0.5× the ceiling's at 1,000
//! subscribers, latency p99 at most 2× the ceiling's, and at most 8 KiB per
//! idle connection.

mod compare;
mod http1;
mod plot;
mod poll;
mod poll_ceiling;
mod publish;
mod push;
mod raw;
mod server;
mod sse;
mod sse_client;
mod ws;
mod ws_client;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "rt-bench",
    version,
    about = "Benchmarks for the realtime services"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Publish throughput against a raw batched INSERT baseline.
    Publish(publish::Args),
    /// Long-poll wake-up latency with many waiters on one topic.
    Poll(poll::Args),
    /// Web Push deliveries per second to a push-service emulator, many
    /// subscriptions on one topic, dispatcher and emulator in this process.
    Push(push::Args),
    /// SSE memory per stream, latency and saturation, server in its own process.
    Sse(sse::Args),
    /// WebSocket memory per socket, latency, saturation and publish acks,
    /// server in its own process.
    Ws(ws::Args),
    /// The raw ceiling: a minimal server writing one pre-encoded frame to N
    /// sockets, measured like `sse`, server in its own process.
    Raw(raw::Args),
    /// The raw ceiling, SSE and WebSocket in turn, one process each, for the
    /// same connection counts: the edges' figures as ratios of the ceiling's,
    /// against the targets.
    Compare(compare::Args),
    /// The raw ceiling's server (started by `raw`).
    #[command(hide = true)]
    RawServer(raw::ServerArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    run(Cli::parse().scenario).await
}

async fn run(scenario: Scenario) -> anyhow::Result<()> {
    match scenario {
        Scenario::Publish(args) => publish::run(args).await,
        Scenario::Poll(args) => poll::run(args).await,
        Scenario::Push(args) => push::run(args).await,
        Scenario::Sse(args) => sse::run(args).await,
        Scenario::Ws(args) => ws::run(args).await,
        Scenario::Raw(args) => raw::run(args).await,
        Scenario::RawServer(args) => raw::serve(args).await,
        Scenario::Compare(args) => compare::run(args).await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn only_the_edge_scenarios_take_distributed() {
        let nats = ["--distributed", "--nats-url", "nats://127.0.0.1:4222"];
        for scenario in ["sse", "ws", "compare"] {
            let argv = [&["rt-bench", scenario][..], &nats[..]].concat();
            if let Err(e) = Cli::try_parse_from(argv) {
                panic!("rt-bench {scenario} --distributed: {e}");
            }
        }
        for scenario in ["publish", "poll", "push", "raw"] {
            let kind = Cli::try_parse_from(["rt-bench", scenario, "--distributed"])
                .err()
                .map(|e| e.kind());
            assert_eq!(
                kind,
                Some(clap::error::ErrorKind::UnknownArgument),
                "rt-bench {scenario} --distributed"
            );
        }
    }

    #[tokio::test]
    async fn distributed_without_nats_is_refused_before_anything_starts() {
        for name in ["sse", "ws", "compare"] {
            let cli =
                Cli::try_parse_from(["rt-bench", name, "--distributed", "--connections", "1"]);
            let mut scenario = cli.unwrap_or_else(|e| panic!("{e}")).scenario;
            // Whatever RT_BENCH_NATS_URL holds.
            match &mut scenario {
                Scenario::Sse(args) => args.deploy.services.nats_url = None,
                Scenario::Ws(args) => args.deploy.services.nats_url = None,
                Scenario::Compare(args) => args.nats_url = None,
                _ => panic!("rt-bench {name} parsed as another scenario"),
            }
            let err = tokio::time::timeout(Duration::from_secs(10), run(scenario))
                .await
                .unwrap_or_else(|_| panic!("rt-bench {name} was not refused at once"))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                err.contains("--distributed needs --nats-url"),
                "rt-bench {name}: {err:?}"
            );
        }
    }
}
