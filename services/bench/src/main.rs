//! rt-bench: load generator and benchmarks.
//!
//! `rt-bench publish` measures publish throughput (events committed per
//! second) on one hot topic and on 100 topics, next to a raw batched INSERT
//! into the same Postgres in the same run.

mod publish;

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().scenario {
        Scenario::Publish(args) => publish::run(args).await,
    }
}
